"""The full-precision teacher: the model before quantization, and what recovery learns from it.

* :func:`teacher_model` — the recipe's model loaded again (with the run's rotation, so its blocks and weights are in
  the quantized model's basis), kept on the CPU beside the student; block-wise reconstruction and STE's latent
  weights read it.
* :func:`teacher_topk` — its top-k log-probabilities for the training blocks, computed once and cached on disk under
  a fingerprint of the weights, the blocks, k and the temperature: every method, seed and rerun reuses them.
* :func:`kd_loss` — KL(teacher ‖ student) on those k tokens plus one bucket for the rest of the vocabulary (exact KL
  between the two distributions coarsened to k + 1 outcomes; the full KL when k is the vocabulary).
* :func:`kd_loss_full` — the full-vocabulary KL from the teacher's logits, when the teacher runs beside the student
  (``kd_top_k: null``: nothing cached, one more forward per step).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .distributed import rank0_first
from .fingerprint import tensor_bytes

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


def teacher_topk(state, blocks: torch.Tensor, k: int, temperature: float
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((log-probs, token ids), each (n_blocks, seq_len, k), of the teacher at ``temperature`` on ``blocks``;
    whether any block had to be computed now). Blocks are cached one by one under a hash of their tokens, so a
    longer or reordered training text reuses every block it shares with an earlier one. With several processes
    rank 0 computes and caches them, the others read its cache."""
    with rank0_first():
        return _teacher_topk(state, blocks, k, temperature)


def _teacher_topk(state, blocks: torch.Tensor, k: int, temperature: float
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    folder = _cache_folder(state, k, temperature)
    paths = [folder / f"{hashlib.sha256(tensor_bytes(b)).hexdigest()[:24]}.safetensors" for b in blocks]
    found = [_read(p) if p.is_file() else None for p in paths]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        model, device = teacher_model(state), state.device
        home = next(model.parameters()).device
        model.to(device)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for i in tqdm(missing, desc=f"teacher top-{k} logits"):
                logits = model(input_ids=blocks[i][None].to(device), use_cache=False).logits[0].float()
                top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
                found[i] = top.values.half().cpu(), top.indices.to(torch.int32).cpu()
                tmp = paths[i].with_suffix(".tmp")
                save_file({"logp": found[i][0], "ids": found[i][1]}, tmp)
                tmp.replace(paths[i])
        model.to(home)
    return (torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])), bool(missing)


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
