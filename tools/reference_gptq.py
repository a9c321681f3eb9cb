"""Plain reference GPTQ: Frantar et al. 2022 (Algorithm 1 without lazy batching), float64, one column at a time.

Deliberately independent of ``gift_quant`` (it imports nothing from it, its uniform quantizer included): instead of the Cholesky trick it keeps the explicit inverse Hessian of
the not-yet-quantized columns and removes each quantized column with the OBS downdate (paper, eq. 3)

    H_F^-1  <-  H_F^-1 - H_F^-1[:, q] H_F^-1[q, :] / H_F^-1[q, q]

after updating the remaining weights with  W -= (w_q - quant(w_q)) / H_F^-1[q, q] * H_F^-1[q, :].
Options mirror ``GPTQ.quantize``: salient columns processed last and never quantized, act-order (non-salient columns
by diag(H) descending, stable), per-channel / static / dynamic groups (dynamic + act-order: groups by processing
position), dead columns (diag(H) == 0 → H_jj = 1, W[:, j] = 0), damping percdamp · mean(diag H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor



# ---------------------------------------------------------------- the uniform quantizer, transcribed on its own
# (GPTQ's min-max quantizer with the clip search of its `mse` option, in float64; `spec` is any object with bits,
# group_size, sym, mse, grid, max_shrink, norm, so this file imports nothing from the package it checks)


def _range_params(xmin: Tensor, xmax: Tensor, spec) -> tuple[Tensor, Tensor]:
    maxq = 2**spec.bits - 1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if spec.sym else torch.round(-xmin / scale)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (codes - zero)


def find_params(w: Tensor, spec) -> tuple[Tensor, Tensor]:
    """(scale, zero), each (rows, 1): the range [min(w, 0), max(w, 0)] (symmetric: ±max|w|; an all-zero row: ±1),
    then, with `mse`, the first shrink factor p = 1 - i/grid (i < max_shrink·grid) minimising Σ|q(w) - w|^norm."""
    w = w.double()
    if w.shape[1] == 0:
        w = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    xmin, xmax = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale, zero = _range_params(xmin, xmax, spec)
    if spec.mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(spec.max_shrink * spec.grid)):
            p = 1 - i / spec.grid
            s1, z1 = _range_params(p * xmin, p * xmax, spec)
            q = dequantize(quantize(w, s1[:, None], z1[:, None], 2**spec.bits - 1), s1[:, None], z1[:, None])
            err = (q - w).abs().pow(spec.norm).sum(1)
            better = err < best
            best, scale, zero = torch.where(better, err, best), torch.where(better, s1, scale), torch.where(better, z1,
                                                                                                           zero)
    return scale[:, None], zero[:, None]


@dataclass
class ReferenceResult:
    codes: Tensor  # (out, in) int64; salient columns hold their group's zero point
    scales: Tensor  # (out, n_groups) float64
    zeros: Tensor  # (out, n_groups) float64
    g_idx: Tensor  # (in,) int64
    salient_idx: Tensor  # (k,) int64, sorted
    salient_weight: Tensor  # (out, k) float64, after absorbing the error compensation
    weight: Tensor  # (out, in) float64: quantized columns dequantized, salient columns fp
    loss: float  # sum over quantized columns of (w - q)^2 / (2 H_F^-1[q, q])
    order: Tensor  # (in,) int64: the columns in processing order (salient ones last)
    margin: Tensor  # (out, in) float64: distance of each rounding decision (w / scale, and for asymmetric groups
    # the zero point when the group's parameters are set) from a tie; inf for salient columns


def hessian(x: Tensor) -> Tensor:
    """H = 2/n Σ x xᵀ in float64 from inputs (..., in)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


def reference_gptq(
    weight: Tensor,
    H: Tensor,
    spec,
    salient_idx: Tensor | None = None,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> ReferenceResult:
    W = weight.detach().double().cpu().clone()
    H = H.detach().double().cpu().clone()
    rows, n = W.shape
    salient = sorted({int(j) for j in salient_idx.tolist()}) if salient_idx is not None else []

    for j in range(n):  # dead inputs
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0

    normal = [j for j in range(n) if j not in set(salient)]
    if act_order:
        normal = sorted(normal, key=lambda j: -H[j, j].item())  # Python's sort is stable: ties keep index order
    order = normal + salient

    gs = n if spec.group_size == -1 else spec.group_size
    if n % gs:
        raise ValueError(f"group_size={gs} does not divide {n}")
    group = [0] * n
    for pos, j in enumerate(order):
        group[j] = pos // gs if (act_order and not static_groups and spec.group_size != -1) else j // gs
    dynamic = spec.group_size != -1 and not static_groups

    # Work in processing order so the not-yet-quantized columns are always the trailing block: eliminated rows and
    # columns of H_F^-1 are exactly zero, so restricting both updates to that block (in place) changes no value.
    perm = torch.tensor(order)
    pos_of = {j: i for i, j in enumerate(order)}
    Wp = W[:, perm].clone()
    Hp = H[perm][:, perm]
    Hinv = torch.linalg.inv(Hp + percdamp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64))
    codes = torch.zeros(rows, n, dtype=torch.int64)
    margin = torch.full((rows, n), float("inf"), dtype=torch.float64)
    loss = 0.0

    def params_of(g: int) -> tuple[Tensor, Tensor]:
        cols = [pos_of[j] for j in normal if group[j] == g]
        return find_params(Wp[:, cols], spec)

    params: dict[int, tuple[Tensor, Tensor]] = {}
    if not dynamic:  # computed once on the dead-zeroed, not yet updated weight
        params = {g: params_of(g) for g in range(n // gs)}

    zero_margin = {g: _zero_margin(Wp, [pos_of[k] for k in normal if group[k] == g], spec) for g in params}
    for i, j in enumerate(normal):
        if group[j] not in params:  # dynamic group reached for the first time: use the current (updated) weights
            params[group[j]] = params_of(group[j])
            zero_margin[group[j]] = _zero_margin(Wp, [pos_of[k] for k in normal if group[k] == group[j]], spec)
        scale, zero = params[group[j]]
        margin[:, j] = torch.minimum(_tie_distance(Wp[:, i] / scale[:, 0]), zero_margin[group[j]])
        c = quantize(Wp[:, i : i + 1], scale, zero, 2**spec.bits - 1)
        q = dequantize(c, scale, zero)[:, 0]
        codes[:, j] = c[:, 0].long()
        d = Hinv[i, i].item()
        diff = Wp[:, i] - q
        loss += float((diff**2).sum() / (2 * d))
        row = Hinv[i, i:].clone()
        Wp[:, i:].addr_(diff / d, row, alpha=-1.0)  # column i becomes q
        Hinv[i:, i:].addr_(Hinv[i:, i].clone(), row, alpha=-1.0 / d)
    W = torch.empty_like(Wp)
    W[:, perm] = Wp

    for g in range(n // gs):  # groups with no quantized column
        params.setdefault(g, find_params(W[:, []], spec))
    scales = torch.cat([params[g][0] for g in range(n // gs)], dim=1)
    zeros = torch.cat([params[g][1] for g in range(n // gs)], dim=1)
    g_idx = torch.tensor(group, dtype=torch.int64)
    for j in salient:
        codes[:, j] = zeros[:, group[j]].long()
    return ReferenceResult(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        salient_idx=torch.tensor(salient, dtype=torch.int64),
        salient_weight=W[:, salient].clone(),
        weight=W,
        loss=loss,
        order=perm,
        margin=margin,
    )


def _tie_distance(x: Tensor) -> Tensor:
    """How far x is from a rounding tie (k + 1/2): 0.5 for an integer, 0 at a tie."""
    return (x - x.floor() - 0.5).abs()


def _zero_margin(Wp: Tensor, cols: list[int], spec) -> Tensor:
    """(rows,) tie distance of the zero point round(-xmin / scale) of a group (min-max range; inf when symmetric,
    whose zero point is fixed). With ``mse`` the chosen clip is a decision too; it is not covered here."""
    if spec.sym or not cols:
        return torch.full((Wp.shape[0],), float("inf"), dtype=torch.float64)
    w = Wp[:, cols]
    xmin, xmax = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    return _tie_distance(-xmin / ((xmax - xmin) / (2**spec.bits - 1)))
