"""Peak device memory of the KD teacher's top-k pass, resident against layer by layer, on a small Llama built here,
beside what ``gift_quant.estimate`` says for the same shape and for Llama-2-70B on one 80 GB GPU (docs/scaling.md).

The pass is the product's: ``teacher.teacher_topk`` on the model, caching its targets in a temporary folder; the
two placements' targets are checked equal up to float rounding (``same_targets``). On a GPU (``--device cuda``) the
figure is CUDA's max allocated bytes. On a CPU host and device are one memory, so what the pass puts on "the device"
is tracked instead: every tensor an op creates while the pass runs (the layer copies that visit the device, hidden
states, logits, top-k), alive from its creation to the release of its storage, at their peak; the resident placement
adds the model's own bytes, which ``model.to(device)`` allocates on a GPU and which are already there on a CPU.

    OMP_NUM_THREADS=1 python tools/measure_teacher.py [--device cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_quant.config import RecoverConfig, SelectConfig  # noqa: E402
from gift_quant.estimate import BUILTIN, GB, Context, Shape, recover, teacher_parts  # noqa: E402
from gift_quant.teacher import module_bytes, teacher_topk  # noqa: E402

SHAPE = dict(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512)
WINDOWS, SEQ, GROUP, TOP_K = 32, 256, 8, 64
MB = 2**20


class TrackedBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create inside the block (a storage counts once, until it is freed)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in existing}
        self._keep = [t.untyped_storage() for t in existing]  # their ids stay theirs while we compare
        self.now = self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.known.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.known:
                    self.known.add(id(storage))
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out


def same_targets(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], rtol: float = 2**-9,
                 atol: float = 1e-3) -> bool:
    """Whether two sets of cached top-k targets (log-probs, ids) are the same teacher's up to float rounding: the
    sorted log-probs close, a token in both with close log-probs, and a token in only one a tie at the other's k-th
    (rounding may swap which of two near-equal tokens makes the cut). The log-probs are stored in fp16, hence rtol."""
    (lp_a, lp_b), (id_a, id_b) = (a[0].float(), b[0].float()), (a[1].long(), b[1].long())
    if id_a.shape != id_b.shape or not torch.allclose(lp_a, lp_b, rtol=rtol, atol=atol):
        return False
    vocab = int(max(id_a.max(), id_b.max())) + 1
    full_a, full_b = (torch.full((*i.shape[:-1], vocab), float("nan")).scatter(-1, i, lp)
                      for i, lp in ((id_a, lp_a), (id_b, lp_b)))
    close = torch.isclose(full_a, full_b, rtol=rtol, atol=atol) | full_a.isnan() | full_b.isnan()

    def missed(full: torch.Tensor, other: torch.Tensor, other_lp: torch.Tensor) -> torch.Tensor:
        kth = other_lp[..., -1:]  # a token only here must not beat the other's cut by more than rounding
        return other.isnan() & ~full.isnan() & (full - kth > atol + rtol * kth.abs())

    return bool(close.all() and not missed(full_a, full_b, lp_b).any() and not missed(full_b, full_a, lp_a).any())


def small_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(use_cache=False, **SHAPE)).to(dtype).eval()


def measure(model, windows: torch.Tensor, device: torch.device, where: str, cache: Path):
    """(targets, peak device bytes, weights counted as already on the device) of one top-k pass."""
    import os

    os.environ["GIFT_QUANT_CACHE"] = str(cache)
    state = SimpleNamespace(weights_digest=where, recipe=SimpleNamespace(model=SimpleNamespace(dtype="float32")),
                            teacher=model, device=device, rotation=None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        targets, _ = teacher_topk(state, windows, TOP_K, 1.0, where, GROUP)
        return targets, torch.cuda.max_memory_allocated(device) - base, 0
    tracked = TrackedBytes([*model.parameters(), *model.buffers(), windows])
    with tracked:
        targets, _ = teacher_topk(state, windows, TOP_K, 1.0, where, GROUP)
    weights = module_bytes(model) if where == "resident" else 0
    return targets, tracked.peak + weights, weights


def estimates(dtype_bytes: int) -> dict:
    """The estimate's teacher parts for the small shape, and the recover rows of Llama-2-70B KD on one 80 GB GPU."""
    small = Context(Shape.from_config(SHAPE), dtype_bytes, cuda=True)
    cfg = RecoverConfig(loss="kd", kd_top_k=TOP_K, seq_len=SEQ, batch_size=1, teacher_windows=GROUP)
    out = {"small": {where: teacher_parts(small, cfg.model_copy(update={"teacher": where}), live=False,
                                          windows=WINDOWS) for where in ("resident", "layered")}}
    big = dict(method="gift_sw", batch_size=4, gradient_accumulation_steps=4, seq_len=1024,  # recipes/llama2_3bit
               gradient_checkpointing=True, max_steps=250, frozen="packed", train_scales=True, train_norms=True,
               noise_bits=4)
    for label, extra in {"lm": dict(loss="lm"), "kd top-64 (auto: layered)": dict(loss="kd"),
                         "kd top-64, teacher: resident": dict(loss="kd", teacher="resident"),
                         "kd full vocabulary (auto: layered)": dict(loss="kd", kd_top_k=None)}.items():
        ctx = Context(Shape.from_config(BUILTIN["meta-llama/Llama-2-70b-hf"]), 2, cuda=True, bits=3,
                      select=SelectConfig(count=128))
        ctx.form = "dense"  # after quantize
        row = recover(ctx, RecoverConfig(**big, **extra))
        out[f"70B {label}"] = {"peak_gb": round(row.peak / GB, 1), "host_gb": round(row.host / GB, 1),
                               "hours": round(row.seconds / 3600, 1),
                               "parts_gb": {k: round(v / GB, 2) for k, v in row.parts.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = small_llama(torch.float32)
    windows = torch.randint(0, SHAPE["vocab_size"], (WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))
    layer = module_bytes(model.model.layers[0])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for where in ("resident", "layered"):
            targets, peak, weights = measure(model, windows, device, where, Path(tmp) / where)
            rows[where] = {"peak_mb": round(peak / MB, 1), "weights_counted_mb": round(weights / MB, 1),
                           "targets": targets}
    same = same_targets(rows["resident"].pop("targets"), rows["layered"].pop("targets"))
    est = estimates(4)
    report = {"device": str(device), "torch": torch.__version__, "shape": SHAPE, "windows": WINDOWS, "seq_len": SEQ,
              "teacher_windows": GROUP, "top_k": TOP_K, "model_mb": round(module_bytes(model) / MB, 1),
              "one_layer_mb": round(layer / MB, 1), "targets_same": same, "measured": rows,
              "estimate_small_mb": {w: {k: round(v / MB, 1) for k, v in p.items()} | {"total": round(
                  sum(p.values()) / MB, 1)} for w, p in est.pop("small").items()},
              "estimate_llama2_70b": est}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if not same:
        sys.exit("measure_teacher: the layered pass's targets differ from the resident pass's")


if __name__ == "__main__":
    main()
