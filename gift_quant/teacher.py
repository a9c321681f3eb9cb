"""The full-precision teacher: the model before quantization, and what recovery learns from it.

* :func:`teacher_model` — the recipe's model loaded again (with the run's rotation, so its blocks and weights are in
  the quantized model's basis), kept on the CPU beside the student; block-wise reconstruction and STE's latent
  weights read it.
* :func:`teacher_topk` — its top-k log-probabilities for the training blocks, computed once and cached on disk under
  a fingerprint of the weights, the blocks, k and the temperature: every method, seed and rerun reuses them.
* :func:`kd_loss` — KL(teacher ‖ student) on those k tokens plus one bucket for the rest of the vocabulary (exact KL
  between the two distributions coarsened to k + 1 outcomes; the full KL when k is the vocabulary).
* :func:`kd_loss_full` — the full-vocabulary KL from the teacher's logits, when the teacher runs beside the student
  (``kd_top_k: null``: nothing cached, one more forward per step; :func:`live_teacher`).

Where the teacher's forward runs is the recipe's ``teacher`` (:func:`placement`): ``resident`` moves the whole model
onto the device for the pass; ``layered`` leaves it in host memory and visits one decoder layer at a time
(``layered.py``), with the same logits; ``auto`` takes ``layered`` on a GPU where the teacher does not fit beside the
student (Llama-2-70B: 138 GB in fp16 against one 80 GB GPU).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .distributed import rank0_first
from .fingerprint import tensor_bytes
from .layered import layered_logits

log = logging.getLogger(__name__)


def teacher_model(state):
    """The model before quantization, rotated as the run rotated it; loaded once per run, on the CPU, frozen."""
    if state.teacher is None:
        from .models import load_model
        from .rotate import RotateSpec, rotate_model

        log.info("loading the full-precision teacher")
        model, _ = load_model(state.recipe.model)
        check_same_weights(state, model)
        if state.rotation is not None:
            fields = RotateSpec.__dataclass_fields__
            rotate_model(model, RotateSpec(**{k: v for k, v in state.rotation.items() if k in fields}))
        state.teacher = model.requires_grad_(False).eval()
    return state.teacher


def check_same_weights(state, model) -> None:
    """The teacher is the model the run started from, read again: weights replaced on disk meanwhile would teach
    (and be cached under the first weights' digest for every later run) something else."""
    from .errors import UserError
    from .models import weights_digest

    if weights_digest(model) != state.weights_digest:
        raise UserError(f"the weights of model '{state.recipe.model.name}' changed on disk since this run loaded "
                        f"them; rerun once the model folder stays unchanged")


def fp_weights(state):
    """module name -> the teacher's weight for it (what STE's latent weights start from)."""
    model = teacher_model(state)
    return lambda name: model.get_submodule(name).weight.detach()


def _cache_folder(state, k: int, temperature: float) -> Path:
    """One folder per teacher (its weights and dtype) and distillation setting; one file per training block in it."""
    from .models import cache_dir

    key = hashlib.sha256(f"{state.weights_digest}:{state.recipe.model.dtype}".encode()).hexdigest()[:24]
    return cache_dir() / "teacher" / f"{key}-top{k}-t{temperature:g}"


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with safe_open(path, "pt") as f:
            return f.get_tensor("logp"), f.get_tensor("ids")
    except (SafetensorError, OSError) as err:
        log.warning("teacher cache %s unreadable (%s); computing it again", path, err)
        return None


def module_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# Of the device memory the student leaves, the most a resident teacher may take under ``teacher: auto``: for its own
# pass (the rest holds one window's activations and logits), or ``live`` beside training at every step.
PASS_SHARE, LIVE_SHARE = 0.9, 0.5


def placement(setting: str, teacher: nn.Module, student: nn.Module | None, device: torch.device,
              live: bool) -> str:
    """``resident`` or ``layered`` for the recipe's ``teacher`` setting. ``auto``: resident unless the device is a
    GPU whose free memory, less the student's weights when they are not there yet, cannot give the teacher its share
    of what is left (PASS_SHARE, LIVE_SHARE)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":  # host and device are one memory: visiting layers would save nothing
        return "resident"
    free = torch.cuda.mem_get_info(device)[0]
    on_device = student is not None and next(student.parameters()).device.type == "cuda"
    left = free - (0 if student is None or on_device else module_bytes(student))
    return "resident" if module_bytes(teacher) <= (LIVE_SHARE if live else PASS_SHARE) * left else "layered"


@contextmanager
def resident(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` on ``device`` for the block, back in its home afterwards (also when the block fails)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


@torch.no_grad()
def teacher_logits(model: nn.Module, windows: torch.Tensor, device: torch.device, where: str,
                   group: int) -> Iterator[torch.Tensor]:
    """The teacher's logits (seq_len, vocab) of each window, in order: window by window with the whole model on the
    device (``resident``), or ``group`` windows per layer-by-layer pass (``layered``)."""
    if where == "resident":
        with resident(model, device):
            for window in windows:
                yield model(input_ids=window[None].to(device), use_cache=False).logits[0]
        return
    for part in windows.split(group):
        for logits in layered_logits(model, part, device):
            yield logits[0]


def teacher_topk(state, blocks: torch.Tensor, k: int, temperature: float, setting: str = "resident",
                 group: int = 64, student: nn.Module | None = None
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], str | None]:
    """((log-probs, token ids), each (n_blocks, seq_len, k), of the teacher at ``temperature`` on ``blocks``; where
    the blocks missing from the cache were computed, None when none was). Blocks are cached one by one under a hash
    of their tokens, so a longer or reordered training text reuses every block it shares with an earlier one. With
    several processes rank 0 computes and caches them, the others read its cache. ``setting`` (the recipe's
    ``teacher``) is resolved by :func:`placement` beside ``student`` only when a block is missing (the teacher is
    not even loaded otherwise); ``group``: see :func:`teacher_logits`."""
    with rank0_first():
        return _teacher_topk(state, blocks, k, temperature, setting, group, student)


def _teacher_topk(state, blocks: torch.Tensor, k: int, temperature: float, setting: str, group: int,
                  student: nn.Module | None) -> tuple[tuple[torch.Tensor, torch.Tensor], str | None]:
    folder = _cache_folder(state, k, temperature)
    paths = [folder / f"{hashlib.sha256(tensor_bytes(b)).hexdigest()[:24]}.safetensors" for b in blocks]
    found = [_read(p) if p.is_file() else None for p in paths]
    missing = [i for i, f in enumerate(found) if f is None]
    where = None
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        model = teacher_model(state)
        where = placement(setting, model, student, state.device, live=False)
        passes = teacher_logits(model, blocks[missing], state.device, where, group)
        # closing: a resident teacher goes home even when saving a block fails
        with closing(passes), tqdm(total=len(missing), desc=f"teacher top-{k} logits ({where})") as bar:
            for logits, i in zip(passes, missing):
                top = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
                found[i] = top.values.half().cpu(), top.indices.to(torch.int32).cpu()
                tmp = paths[i].with_suffix(".tmp")
                save_file({"logp": found[i][0], "ids": found[i][1]}, tmp)
                tmp.replace(paths[i])
                bar.update()
    return (torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])), where


def live_teacher(model: nn.Module, device: torch.device, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids (batch, seq) -> the teacher's logits, for the full-vocabulary loss at every step: the model moved
    onto the device for good (``resident``), or visiting it layer by layer for each batch (``layered``)."""
    if where == "resident":
        model.to(device)
        return lambda ids: model(input_ids=ids, use_cache=False).logits
    return lambda ids: torch.cat(list(layered_logits(model, ids, device, batch_size=ids.shape[0])))


def kd_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ q_student) on the teacher's top-k tokens plus the rest as one outcome,
    times T² (so gradients keep their scale across temperatures, as in Hinton et al.)."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logq_top = logq.gather(-1, teacher_ids.long())
    logp_top = teacher_logp.float()
    p_top = logp_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp(min=0)
    q_rest = (1 - logq_top.exp().sum(-1)).clamp(min=1e-12)
    kl_top = (p_top * (logp_top - logq_top)).sum(-1)
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), 0.0)
    return (kl_top + kl_rest).mean() * temperature**2


def kd_loss_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ q_student) over the whole vocabulary, times T²."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean() * temperature**2
