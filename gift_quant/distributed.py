"""Several processes on one recipe (``torchrun --nproc_per_node N -m gift_quant.recipe R.yaml``, or ``accelerate
launch``): who computes what, and who writes.

Every rank runs the whole recipe on its own replica of the model. The rules:

* one process group per run, made at the start of ``pipeline.run`` (gloo on CPU, nccl on CUDA, one GPU per rank from
  ``LOCAL_RANK``); the Trainer uses it as it is (DDP: the gradients of the trainable tensors are averaged);
* stages whose result is saved to disk (``quantize``, ``reconstruct``) run on rank 0 first; the others wait and then
  run the same stage, which finds every result on disk and loads it (quantize then computes no activations);
* stages that write a checkpoint (``export``) run on rank 0 alone; after a stage led by rank 0 the others take its
  result rows, so every rank's ``state.results`` is rank 0's;
* evaluations share their batches out over the ranks and gather the per-batch NLLs, so every rank holds the same
  number, summed in the single-process order (equal to the one-process number) at 1/N of the work;
* files (results, report, logs, exports, teacher cache, training checkpoints) are written by rank 0 only.

Waiting ranks block on a gloo group of their own with a long timeout: quantizing a 70B model takes hours, far past
the default 30 minutes. If rank 0 fails, torchrun stops the others.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

WAIT_TIMEOUT = timedelta(days=2)  # longest a rank waits for rank 0 (a 70B quantization with a slow disk fits)
_state: dict[str, Any] = {"group": None, "owned": False, "alone": False}


def world_size() -> int:
    """Processes in the run (WORLD_SIZE, set by torchrun and by accelerate launch on GPUs; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files (rank 0; the only process of a plain run)."""
    return rank() == 0


def active() -> bool:
    """Whether this run has several processes and their process group is up."""
    import torch.distributed as dist

    return world_size() > 1 and not _state["alone"] and dist.is_available() and dist.is_initialized()


def setup(device: str) -> None:
    """Start the process group once (no-op for a single process): nccl with one GPU per rank on CUDA, gloo on CPU."""
    if world_size() == 1 or _state["group"] is not None:
        return
    import torch
    import torch.distributed as dist

    from .errors import UserError

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and ":" in device:
        raise UserError(f"model.device '{device}' names one GPU, but {world_size()} processes run: use 'cuda' "
                        f"(each process takes the GPU of its LOCAL_RANK)")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        _state["owned"] = True
    _state["group"] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def teardown() -> None:
    """End the process group this module started (the process exits cleanly, without a warning)."""
    import torch.distributed as dist

    if _state["owned"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(group=None, owned=False, alone=False)


@contextmanager
def alone() -> Iterator[None]:
    """This process works by itself in the block (evaluations take no share from the others, who are elsewhere)."""
    _state["alone"] = True
    try:
        yield
    finally:
        _state["alone"] = False


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier(group=_state["group"])


@contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block while the others wait; then the others run it (finding what rank 0 saved)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` for a single process)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_state["group"])
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_state["group"])
    return box[0]


def my_share(n: int) -> range:
    """The items of ``n`` this rank works on (round-robin; all of them for a single process)."""
    return range(rank(), n, world_size()) if active() else range(n)
