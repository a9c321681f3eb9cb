"""GPTQ for one weight matrix (Frantar et al. 2022, IST-DASLab style), with salient columns kept in full precision.

Salient columns are never quantized; they are processed *last*, so every quantized column's error compensation flows
into them (QUIK/OWQ style) and their final values are the optimal fp correction given the quantized part.

Processing order: non-salient columns (original order, or by diag(H) descending with act-order), then salient columns.
Groups: without act-order, or with static groups, group g is original columns [g*gs, (g+1)*gs); with act-order and
dynamic groups, group g is processing positions [g*gs, (g+1)*gs) (GPTQ's g_idx convention). Quantizer parameters are
always computed on the group's non-salient columns only: upfront on the (dead-zeroed) weight for per-channel and
static groups, lazily on the error-updated weight when a dynamic group is first reached. Blocks of the lazy update are
cut at dynamic group starts, so every column of a group holds all earlier updates when its parameters are computed.

Computation runs on the weight's device, in float64 for float64 weights and float32 otherwise.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gift_quant.quantized import QuantizedWeight
from gift_quant.quantizer import (
    QuantSpec,
    compute_dtype,
    dequantize,
    find_params,
    group_params,
    quantize,
    salient_index,
)

log = logging.getLogger(__name__)

MAX_PERCDAMP = 1e3  # beyond this the damped Hessian is essentially diagonal; failing there means a broken H


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # sum of the OBS errors (w - q)^2 / [H_F^-1]_qq / 2 over quantized columns, as IST reports
    damp: float  # percdamp finally used (raised automatically when the damped Hessian was not positive definite)
    seconds: float


class GPTQ:
    """Accumulates H = 2/n Σ x xᵀ over calibration inputs, then quantizes one weight matrix with it."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.device = device
        self.H: Tensor | None = None  # created on the first batch's device unless `device` is given
        self._nsamples = 0
        self._consumed = False

    @property
    def nsamples(self) -> int:
        return self._nsamples

    def clone(self) -> "GPTQ":
        """An independent copy: linears that read the same input (q/k/v, gate/up) share one accumulation."""
        if self._consumed:
            raise RuntimeError("the Hessian was freed by quantize(); clone before quantizing")
        other = GPTQ(self.in_features, self.device)
        other.H = None if self.H is None else self.H.clone()
        other._nsamples = self._nsamples
        return other

    def add_batch(self, x: Tensor) -> None:
        """x (..., in_features); every leading index is one sample (token)."""
        if self._consumed:
            raise RuntimeError("the Hessian was freed by quantize(); create a new GPTQ object")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        if self.H is None:
            device = self.device if self.device is not None else x.device
            self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=device)
        x = x.to(self.H.device, torch.float32)
        # Running mean: rescale the old sum so H stays 2/n Σ x xᵀ without ever holding an unnormalised sum.
        self.H.mul_(self._nsamples / (self._nsamples + m))
        self._nsamples += m
        x = x * math.sqrt(2 / self._nsamples)
        self.H.addmm_(x.T, x)

    def quantize(
        self,
        weight: Tensor,
        spec: QuantSpec,
        salient_idx: Tensor | None = None,
        *,
        block_size: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
    ) -> GPTQResult:
        if self._consumed:
            raise RuntimeError("the Hessian was freed by a previous quantize(); create a new GPTQ object")
        if self.H is None:
            raise RuntimeError("no calibration data: call add_batch() first")
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"expected a weight (out, {self.in_features}), got shape {tuple(weight.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        spec.n_groups(self.in_features)  # validates group_size early with a clear message
        if not bool(torch.isfinite(self.H).all()):
            raise ValueError("its calibration inputs hold NaN or Inf (the layers before produced them)")
        H, self.H, self._consumed = self.H, None, True  # free the Hessian as soon as we own it
        start = time.perf_counter()
        result = _gptq(weight, H, spec, salient_idx, block_size, percdamp, act_order, static_groups)
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)
        result.seconds = time.perf_counter() - start
        return result


def _processing_order(diag: Tensor, sal: Tensor, act_order: bool) -> Tensor:
    """Non-salient columns (by diag(H) descending, ties by index, with act-order) followed by the salient ones."""
    keep = torch.ones_like(diag, dtype=torch.bool)
    keep[sal] = False
    normal = keep.nonzero().flatten()
    if act_order:
        normal = normal[torch.argsort(diag[normal], descending=True, stable=True)]
    return torch.cat([normal, sal])


def _damped_inverse_cholesky(H: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + percdamp·mean(diag H)·I)^-1, raising percdamp until that succeeds."""
    mean_diag = H.diagonal().mean()
    while True:
        damped = H.clone()
        damped.diagonal().add_(percdamp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and bool(torch.isfinite(U).all()):
                return U, percdamp
        new = percdamp * 10 if percdamp > 0 else 1e-4
        if new > MAX_PERCDAMP:
            raise RuntimeError(f"Hessian not positive definite even with percdamp={percdamp}")
        log.warning("GPTQ: damped Hessian not positive definite at percdamp=%g; retrying with %g", percdamp, new)
        percdamp = new


def _blocks(n: int, block_size: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[i1, i2) blocks of at most block_size positions that never straddle a position in `cuts` (sorted)."""
    out, i1 = [], 0
    while i1 < n:
        k = bisect.bisect_right(cuts, i1)
        nxt = cuts[k] if k < len(cuts) else n
        i2 = min(i1 + block_size, nxt, n)
        out.append((i1, i2))
        i1 = i2
    return out


def _gptq(weight, H, spec, salient_idx, block_size, percdamp, act_order, static_groups) -> GPTQResult:
    device, dtype = weight.device, compute_dtype(weight)
    W = weight.detach().to(dtype=dtype, copy=True)  # never touch the caller's tensor
    H = H.to(device=device, dtype=dtype)
    rows, cols = W.shape
    sal = salient_index(salient_idx, cols, device)
    n_q = cols - sal.numel()  # quantized positions come first in the processing order

    dead = H.diagonal() == 0  # inputs that were always 0: any value works, 0 is the cheapest
    H[dead, dead] = 1
    W[:, dead] = 0

    order = _processing_order(H.diagonal(), sal, act_order)
    width = spec.columns_per_group(cols)
    dynamic = spec.group_size != -1 and not static_groups
    positions = torch.arange(cols, device=device)
    gids = positions // width if (dynamic and act_order) else order // width  # group of each processing position
    g_idx = torch.empty(cols, dtype=torch.int32, device=device)
    g_idx[order] = gids.to(torch.int32)

    if dynamic:  # groups never reached (only salient columns) keep the guard params of an empty group
        scale0, zero0 = find_params(W.new_zeros(rows, 0), spec)
        scales, zeros = scale0.repeat(1, spec.n_groups(cols)), zero0.repeat(1, spec.n_groups(cols))
    else:
        scales, zeros = group_params(W, spec, sal)

    Hinv, damp = _damped_inverse_cholesky(H[order][:, order], percdamp)
    del H
    Wp = W[:, order]
    del W
    gid_list = gids.tolist()
    starts = [p for p in range(n_q) if p == 0 or gid_list[p] != gid_list[p - 1]] if dynamic else []
    group_end = dict(zip(starts, starts[1:] + [n_q]))  # dynamic group starting at p spans [p, group_end[p])
    codes_p = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    loss = torch.zeros((), dtype=dtype, device=device)

    for i1, i2 in _blocks(n_q, block_size, starts):
        if i1 in group_end:  # a dynamic group starts here; all its columns are up to date
            s, z = find_params(Wp[:, i1 : group_end[i1]], spec)
            scales[:, gid_list[i1]], zeros[:, gid_list[i1]] = s[:, 0], z[:, 0]
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = gid_list[i1 + i]
            s, z = scales[:, g : g + 1], zeros[:, g : g + 1]
            w = W1[:, i : i + 1]
            c = quantize(w, s, z, spec.maxq)
            codes_p[:, i1 + i] = c[:, 0].to(torch.uint8)
            d = Hinv1[i, i]
            diff = w - dequantize(c, s, z)
            loss += diff.square().sum() / (2 * d * d)
            err = diff / d
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]  # OBS update of the rest of the block
            Err1[:, i : i + 1] = err
        Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of everything after the block (salient columns too)

    sal_groups = gids[n_q:]
    codes_p[:, n_q:] = zeros[:, sal_groups].to(torch.uint8)  # quantized part exactly 0 on salient columns
    codes = torch.empty_like(codes_p)
    codes[:, order] = codes_p
    qweight = QuantizedWeight(
        codes=codes,
        scales=scales.float(),
        zeros=zeros.float(),
        g_idx=g_idx,
        salient_idx=sal,
        salient_weight=Wp[:, n_q:].float(),  # order[n_q:] is sal, ascending
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
    )
    return GPTQResult(weight=qweight, loss=float(loss), damp=damp, seconds=0.0)
