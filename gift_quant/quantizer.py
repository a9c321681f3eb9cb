"""Uniform integer quantizer (GPTQ conventions): scales, zero points, MSE clip search, fake-quant and RTN.

Conventions (as in IST-DASLab's GPTQ): the range always contains 0 (``xmin <= 0 <= xmax``) and
``scale = (xmax-xmin)/maxq``. Symmetric: ``xmin = -xmax = -max(|min|, max)`` and ``zero = (maxq+1)/2`` (unlike IST, a
row with no negative value is still made symmetric, so its maximum is not clipped to half the range). Asymmetric:
``zero = round(-xmin/scale)``.
Rows that are all zero get the range [-1, 1] so the scale is never 0. Codes are ``clamp(round(w/scale)+zero, 0, maxq)``
and dequantize as ``scale * (code - zero)``.

Because the range always contains 0 and ``zero`` is an integer in [0, maxq], a weight equal to 0 is represented
exactly and changes neither the range nor the MSE objective. :func:`group_params` uses that to exclude salient columns
from the statistics by zeroing them.

Computation happens in float64 for float64 inputs and in float32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gift_quant.quantized import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)  # what the quantize stage stores and packs
GRID_BITS = tuple(range(2, 9))  # what a grid that is only measured may have (the GIFT-SW noise's Δ)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to; the recipe's pydantic config is converted into this elsewhere."""

    bits: int = 4
    group_size: int = -1  # -1: one group per output row; otherwise must divide in_features
    sym: bool = True
    mse: bool = False  # search a clip factor p in (1 - max_shrink, 1] minimising sum |w - q(w)|^norm per row
    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4

    allowed_bits = SUPPORTED_BITS

    def __post_init__(self) -> None:
        if self.bits not in self.allowed_bits:
            raise ValueError(f"bits must be one of {self.allowed_bits}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per output channel) or a positive integer, got {self.group_size}")
        if self.grid < 1 or not 0.0 < self.max_shrink <= 1.0 or self.norm <= 0:
            raise ValueError(
                f"invalid MSE search settings: grid={self.grid} max_shrink={self.max_shrink} norm={self.norm}"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def columns_per_group(self, in_features: int) -> int:
        """Width of one group; raises ValueError when group_size does not divide in_features."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                f"choose a divisor of {in_features} or -1 (per output channel)"
            )
        return self.group_size

    def n_groups(self, in_features: int) -> int:
        return in_features // self.columns_per_group(in_features)

    def group_index(self, in_features: int, device: torch.device | str | None = None) -> Tensor:
        """g_idx (in,) int32 for groups of consecutive original columns: column j is in group j // group_size."""
        width = self.columns_per_group(in_features)
        return (torch.arange(in_features, device=device) // width).to(torch.int32)


class GridSpec(QuantSpec):
    """A grid that is measured, never stored (e.g. the step of a 5-bit grid for GIFT-SW's noise): any width."""

    allowed_bits = GRID_BITS


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (reference computations); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _params_from_range(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of every row of ``w`` (rows, cols) → two (rows, 1) tensors.

    An empty ``w`` (no columns) behaves like an all-zero one and gets the guard range [-1, 1].
    """
    w = w.detach().to(compute_dtype(w))
    if w.shape[1] == 0:
        w = w.new_zeros(w.shape[0], 1)
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # all-zero rows: avoid a zero scale
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale, zero = _params_from_range(xmin, xmax, spec)
    if spec.mse:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, spec)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _mse_search(w: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec):
    """Shrink the range by p = 1, 1 - 1/grid, ... (> 1 - max_shrink); keep the first p with the smallest error."""
    best = torch.full_like(scale, float("inf"))
    buf = torch.empty_like(w)  # one scratch tensor, in-place ops: this loop dominates per-layer CPU time
    for i in range(int(spec.max_shrink * spec.grid)):
        p = 1 - i / spec.grid
        scale1, zero1 = _params_from_range(p * xmin, p * xmax, spec)
        s, z = scale1.unsqueeze(1), zero1.unsqueeze(1)
        torch.div(w, s, out=buf).round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s).sub_(w).abs_()
        err = (buf.square_() if spec.norm == 2 else buf.pow_(spec.norm)).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes ``clamp(round(w/scale) + zero, 0, maxq)``, returned as a float tensor (cast to uint8 to store)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (codes - zero)`` in the scale's dtype; codes may be float or uint8."""
    return scale * (codes.to(scale.dtype) - zero)


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def salient_index(salient_idx: Tensor | None, in_features: int, device: torch.device | str | None = None) -> Tensor:
    """Sorted, unique int64 column indices (empty when None); raises ValueError for out-of-range indices."""
    if salient_idx is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    idx = torch.as_tensor(salient_idx, dtype=torch.int64, device=device).flatten().unique(sorted=True)
    if idx.numel() and (idx[0] < 0 or idx[-1] >= in_features):
        raise ValueError(f"salient indices must lie in [0, {in_features}), got range [{idx[0]}, {idx[-1]}]")
    return idx


def group_params(w: Tensor, spec: QuantSpec, salient_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scales and zeros (rows, n_groups) of groups of consecutive original columns, salient columns excluded.

    Excluding a column is the same as setting it to 0 (see the module docstring), which keeps this vectorised.
    """
    rows, cols = w.shape
    n_groups = spec.n_groups(cols)
    masked = w.detach().to(compute_dtype(w), copy=True)
    masked[:, salient_index(salient_idx, cols, w.device)] = 0
    scale, zero = find_params(masked.reshape(rows * n_groups, cols // n_groups), spec)
    return scale.reshape(rows, n_groups), zero.reshape(rows, n_groups)


def rtn(weight: Tensor, spec: QuantSpec, salient_idx: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of the non-salient columns; salient columns stay fp in ``salient_weight``."""
    w = weight.detach().to(compute_dtype(weight))
    cols = w.shape[1]
    sal = salient_index(salient_idx, cols, w.device)
    scales, zeros = group_params(w, spec, sal)
    g_idx = spec.group_index(cols, w.device)
    g = g_idx.long()
    codes = quantize(w, scales[:, g], zeros[:, g], spec.maxq)
    codes[:, sal] = zeros[:, g[sal]]  # quantized part exactly 0 on salient columns
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.float(),
        zeros=zeros.float(),
        g_idx=g_idx,
        salient_idx=sal,
        salient_weight=w[:, sal].float(),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
    )
