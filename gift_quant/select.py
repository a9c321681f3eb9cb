"""Stage `select`: how many and which input columns of each linear stay in full precision.

The stage itself only fixes the policy; the quantize stage's layer-by-layer pass applies it with each linear's own
calibration statistics (``choose_salient``), because GPTQ needs them from the already-quantized preceding layers.
"""

from __future__ import annotations

import re

import torch

from .config import SelectConfig
from .saliency import num_salient, select_salient, sensitivity


def select_stage(state, cfg: SelectConfig) -> None:
    state.selection = cfg


def salient_count(name: str, in_features: int, cfg: SelectConfig | None) -> int:
    """Per-module count: the first matching override (count if >= 1, fraction if < 1), else the default."""
    if cfg is None:
        return 0
    for pattern, value in cfg.overrides.items():
        if re.search(pattern, name):
            return num_salient(in_features, None, value) if value < 1 else num_salient(in_features, int(value), None)
    return num_salient(in_features, cfg.count, cfg.fraction)


def choose_salient(name: str, weight: torch.Tensor, bits: int, cfg: SelectConfig | None, *, x_linf: torch.Tensor,
                   x_l2: torch.Tensor, h_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the salient columns of one linear (empty when none are asked for)."""
    k = salient_count(name, weight.shape[1], cfg)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    free = {}
    if cfg.metric == "custom":
        free = {"tau": float(cfg.tau or "inf"), "rho": float(cfg.rho or "inf"), "gamma": cfg.gamma or 1.0}
    scores = sensitivity(weight, bits, x_linf=x_linf, x_l2=x_l2, h_diag=h_diag, metric=cfg.metric, **free)
    return select_salient(scores.cpu(), k)


