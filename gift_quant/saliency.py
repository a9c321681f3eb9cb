"""GIFT-SW generalized sensitivity of input columns and salient-column selection.

Column j's sensitivity is s_j = ‖D_j‖_τ^p · a_j, with D = W − Q(W) the quantization error of a symmetric per-row
quantizer whose clip is chosen by MSE search, and a_j an activation statistic ‖X_j‖_ρ^γ (or diag(H)_j for OWQ).
Presets:
  gift: τ = ∞, ρ = ∞, γ = 1          (GIFT-SW's default)
  quik: ‖X_j‖_∞ alone                 (no weight term)
  owq:  diag(H)_j · ‖D_j‖₂²           (falls back to ‖X_j‖₂², which is proportional, when diag(H) is not given)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gift_quant.quantizer import QuantSpec, compute_dtype, fake_quant, find_params

INF = math.inf
TAUS = (1.0, 2.0, INF)
RHOS = (2.0, INF)
GAMMAS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Preset:
    tau: float | None  # norm of D_j; None drops the weight term
    rho: float  # norm of X_j
    gamma: float  # power of ‖X_j‖_ρ
    weight_power: float = 1.0  # power of ‖D_j‖_τ
    use_h_diag: bool = False  # activation term diag(H)_j instead of ‖X_j‖_ρ^γ when available


PRESETS: dict[str, Preset] = {
    "gift": Preset(tau=INF, rho=INF, gamma=1.0),
    "quik": Preset(tau=None, rho=INF, gamma=1.0),
    "owq": Preset(tau=2.0, rho=2.0, gamma=2.0, weight_power=2.0, use_h_diag=True),
}


class ChannelNorms:
    """Per-input-channel ‖X_j‖_∞ and ‖X_j‖₂ over every token seen."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._linf: Tensor | None = None
        self._sumsq: Tensor | None = None  # float64: long calibration runs add many small terms

    def add_batch(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return
        linf, sumsq = x.abs().amax(dim=0), x.square().sum(dim=0).double()
        if self._linf is None:
            self._linf, self._sumsq = linf, sumsq
        else:
            self._linf = torch.maximum(self._linf, linf)
            self._sumsq += sumsq

    def clone(self) -> "ChannelNorms":
        """An independent copy (linears that read the same input share one accumulation)."""
        other = ChannelNorms(self.in_features)
        if self._linf is not None:
            other._linf, other._sumsq = self._linf.clone(), self._sumsq.clone()
        return other

    def _require(self) -> None:
        if self._linf is None:
            raise RuntimeError("no inputs seen: call add_batch() first")

    @property
    def linf(self) -> Tensor:
        self._require()
        return self._linf

    @property
    def l2(self) -> Tensor:
        self._require()
        return self._sumsq.sqrt().float()


def quant_error(weight: Tensor, bits: int) -> Tensor:
    """D = W − Q(W) for a symmetric per-row quantizer whose clip minimises ‖W_i − Q(W_i)‖² by grid search."""
    spec = QuantSpec(bits=bits, group_size=-1, sym=True, mse=True, norm=2.0)
    w = weight.detach().to(compute_dtype(weight))
    scale, zero = find_params(w, spec)
    return w - fake_quant(w, scale, zero, spec.maxq)


def _resolve(metric: str, tau: float, rho: float, gamma: float) -> Preset:
    if metric == "custom":
        if tau not in TAUS or rho not in RHOS or gamma not in GAMMAS:
            raise ValueError(f"custom metric needs tau in {TAUS}, rho in {RHOS}, gamma in {GAMMAS}; "
                             f"got tau={tau}, rho={rho}, gamma={gamma}")
        return Preset(tau=float(tau), rho=float(rho), gamma=float(gamma))
    if metric not in PRESETS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(PRESETS)} or 'custom'")
    if (tau, rho, gamma) != (INF, INF, 1.0):
        raise ValueError(f"tau/rho/gamma are fixed by the {metric!r} preset; use metric='custom' to set them")
    return PRESETS[metric]


def sensitivity(
    weight: Tensor,
    bits: int,
    *,
    x_linf: Tensor,
    x_l2: Tensor,
    h_diag: Tensor | None = None,
    metric: str = "gift",
    tau: float = INF,
    rho: float = INF,
    gamma: float = 1.0,
) -> Tensor:
    """Score (in,) of every input column of ``weight`` (out, in); larger means more salient."""
    p = _resolve(metric, tau, rho, gamma)
    dtype = compute_dtype(weight)
    if p.use_h_diag and h_diag is not None:
        act = h_diag.to(weight.device, dtype)
    else:
        x = x_linf if p.rho == INF else x_l2
        act = x.to(weight.device, dtype).pow(p.gamma)
    if p.tau is None:
        return act.clone()
    d_norm = torch.linalg.vector_norm(quant_error(weight, bits), ord=p.tau, dim=0)
    return d_norm.pow(p.weight_power) * act


def num_salient(in_features: int, count: int | None, fraction: float | None) -> int:
    """Number of salient columns from an absolute count or a fraction of in_features (rounded); 0 when neither."""
    if count is not None and fraction is not None:
        raise ValueError("give either a salient count or a fraction, not both")
    if count is not None:
        if not 0 <= count <= in_features:
            raise ValueError(f"salient count must lie in [0, {in_features}], got {count}")
        return int(count)
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"salient fraction must lie in [0, 1], got {fraction}")
        return min(in_features, round(fraction * in_features))
    return 0


def select_salient(scores: Tensor, k: int) -> Tensor:
    """Sorted int64 indices of the k largest scores; ties go to the lower index (stable sort): deterministic."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must lie in [0, {scores.numel()}], got {k}")
    if torch.isnan(scores).any():
        raise ValueError("sensitivity scores contain NaN")
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    return top.sort().values.to(torch.int64)
