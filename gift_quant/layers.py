"""Trainable mixed-precision linears that replace ``nn.Linear`` after quantization.

``MixedPrecisionLinear`` is GIFT-SW's layer: a frozen low-bit part plus a few trainable fp salient input columns,
with Gaussian (or uniform) noise injected into the frozen part while training. ``STELinear`` is the QAT baseline:
every weight trainable, forwarded through the record's fixed quantizer with a straight-through estimator.
Both hand their result back as a ``QuantizedWeight`` for export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant.quantized import QuantizedWeight
from gift_quant.quantizer import SUPPORTED_BITS, QuantSpec, fake_quant, find_params, quantize

NoiseKind = Literal["gaussian", "uniform", "none"]


@dataclass(frozen=True)
class NoiseSpec:
    """Noise injected into the frozen weights while training: std = scale * Δ.

    ``bits=None`` takes Δ from the layer's own quantizer; an integer takes it from a ``bits``-bit symmetric
    MSE-clipped per-row grid of the non-salient columns (the paper's post-quantization setting uses 4).
    """

    kind: NoiseKind = "gaussian"
    scale: float = 0.5
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "uniform", "none"):
            raise ValueError(f"noise kind must be gaussian, uniform or none, got {self.kind!r}")
        if not self.scale >= 0:
            raise ValueError(f"noise scale must be >= 0, got {self.scale}")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"noise bits must be None or one of {SUPPORTED_BITS}, got {self.bits}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.scale > 0


class _RecordBuffers(nn.Module):
    """Holds a record's grid (codes, scales, zeros, g_idx, salient_idx) as buffers.

    ``model.to(torch.bfloat16)`` would round the float32 scales and make the exported grid differ from the one the
    codes were chosen on, so ``_apply`` follows device moves for them but keeps them float32.
    """

    _FP32_BUFFERS = ("scales", "zeros")

    def _init_record(self, qw: QuantizedWeight) -> None:
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.register_buffer("codes", qw.codes.to(torch.uint8).clone())
        self.register_buffer("scales", qw.scales.to(torch.float32).clone())
        self.register_buffer("zeros", qw.zeros.to(torch.float32).clone())
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone())
        self.register_buffer("salient_idx", qw.salient_idx.to(torch.int64).clone())

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        kept = {name: self._buffers.pop(name) for name in self._FP32_BUFFERS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                self._buffers[name] = t.to(self.codes.device)
        return self

    @property
    def num_salient(self) -> int:
        return self.salient_idx.numel()

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _grid_per_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of every weight entry, (out, in) each."""
        g = self.g_idx.long()
        return self.scales[:, g], self.zeros[:, g]

    def _record(self, codes: torch.Tensor, salient_weight: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(
            codes=codes,
            scales=self.scales.clone(),
            zeros=self.zeros.clone(),
            g_idx=self.g_idx.clone(),
            salient_idx=self.salient_idx.clone(),
            salient_weight=salient_weight.detach().to(torch.float32).clone(),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.num_salient}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


def _noise_step(qw: QuantizedWeight, noise: NoiseSpec) -> torch.Tensor:
    """Δ that scales the noise: the record's own (out, n_groups), or a fresh per-row (out, 1) MSE grid's."""
    if noise.bits is None:
        return qw.scales.to(torch.float32)
    nonsalient = torch.ones(qw.shape[1], dtype=torch.bool, device=qw.codes.device)
    nonsalient[qw.salient_idx] = False
    if not nonsalient.any():
        return torch.zeros(qw.shape[0], 1, device=qw.codes.device)
    # The record keeps no fp copy of the frozen weights; the quantized values sit within Δ/2 of them.
    w = qw.quantized_part(torch.float32)[:, nonsalient]
    scale, _ = find_params(w, QuantSpec(bits=noise.bits, group_size=-1, sym=True, mse=True, norm=2.0))
    return scale.reshape(-1, 1).to(torch.float32)


class MixedPrecisionLinear(_RecordBuffers):
    """y = x W_qᵀ + x[..., S] W_Sᵀ + b with W_q frozen (a buffer) and only W_S (out × k) trainable.

    Plain autograd composition instead of a custom ``autograd.Function``: the frozen weight is a buffer, so the
    backward of ``F.linear(x, W_q)`` computes only the input gradient and never an out × in weight gradient, and the
    salient term's weight gradient is gradᵀ · x[..., S] (out × k). Its saved tensors (the noised weight and
    x[..., S]) are exactly what a hand-written backward would keep, so a custom Function would buy nothing.
    (Only a Function that re-draws the noise from a saved seed in backward could drop the saved noised weight;
    gradient checkpointing already bounds that to one decoder layer, so it is not worth the RNG bookkeeping.)
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, noise: NoiseSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self._init_record(qw)
        self.noise = noise
        # Dequantized frozen part, salient columns exactly zero: what every forward multiplies with.
        self.register_buffer("weight_q", qw.quantized_part(dtype))
        self.salient_weight = nn.Parameter(qw.salient_weight.to(dtype).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        # σ per row or row-group (expanded through g_idx when it has several groups): no full-size std copy.
        self.register_buffer("noise_std", (noise.scale * _noise_step(qw, noise)).to(dtype))

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        noise: NoiseSpec = NoiseSpec(),
        dtype: torch.dtype = torch.float32,
    ) -> "MixedPrecisionLinear":
        return cls(qw, bias, noise, dtype)

    def noisy_weight(self) -> torch.Tensor:
        """W_q + σ·ε with fresh ε, zero on the salient columns; one out × in tensor, built in place."""
        w = self.weight_q
        if self.noise.kind == "gaussian":
            eps = torch.randn_like(w)
        else:  # uniform on [-√3, √3] has unit variance, so σ means the same for both kinds
            eps = torch.empty_like(w).uniform_(-math.sqrt(3.0), math.sqrt(3.0))
        std = self.noise_std if self.noise_std.shape[1] == 1 else self.noise_std[:, self.g_idx.long()]
        eps.mul_(std).index_fill_(1, self.salient_idx, 0.0)
        return eps.add_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.noisy_weight() if self.training and self.noise.active else self.weight_q
        y = F.linear(x, w, self.bias)
        if self.num_salient:
            y = y + F.linear(x.index_select(-1, self.salient_idx), self.salient_weight)
        return y

    def to_quantized_weight(self) -> QuantizedWeight:
        return self._record(self.codes.clone(), self.salient_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}"


class STELinear(_RecordBuffers):
    """QAT baseline: a full trainable weight, non-salient columns forwarded through the record's fixed grid
    (straight-through gradient), salient columns forwarded and trained in fp."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self._init_record(qw)
        self.weight = nn.Parameter(qw.dequantize(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        salient_mask = torch.zeros(self.in_features, dtype=torch.bool, device=qw.codes.device)
        salient_mask[self.salient_idx] = True
        self.register_buffer("salient_mask", salient_mask)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> "STELinear":
        return cls(qw, bias, dtype)

    def effective_weight(self) -> torch.Tensor:
        """Fake-quant non-salient columns, fp salient columns; d(effective)/d(weight) = identity (STE)."""
        w = self.weight
        scale, zero = self._grid_per_weight()
        # Quantize in float32: rounding w/Δ in bf16 would pick wrong codes.
        wq = fake_quant(w.detach().to(torch.float32), scale, zero, self.maxq).to(w.dtype)
        # wq + (w - w.detach()) has the value wq exactly (unlike w + (wq - w) in low precision) and gradient 1.
        w_ste = wq + (w - w.detach())
        return torch.where(self.salient_mask, w, w_ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def to_quantized_weight(self) -> QuantizedWeight:
        w = self.weight.detach().to(torch.float32)
        scale, zero = self._grid_per_weight()
        codes = quantize(w, scale, zero, self.maxq).round().to(torch.uint8)
        # Record convention: salient columns carry the zero point so the quantized part is exactly 0 there.
        codes[:, self.salient_mask] = zero[:, self.salient_mask].round().to(torch.uint8)
        return self._record(codes, w[:, self.salient_idx])


LinearFactory = Callable[[QuantizedWeight, "torch.Tensor | None"], nn.Module]


def replace_linears(model: nn.Module, records: dict[str, QuantizedWeight], factory: LinearFactory) -> None:
    """Swap each named ``nn.Linear`` for ``factory(qw, bias)``, on the linear's device and in its dtype."""
    for name, qw in records.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is {type(old).__name__}, not nn.Linear")
        if tuple(old.weight.shape) != qw.shape:
            raise ValueError(f"{name}: record shape {qw.shape} != linear weight {tuple(old.weight.shape)}")
        bias = None if old.bias is None else old.bias.detach()
        new = factory(qw, bias).to(device=old.weight.device, dtype=old.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule that can hand back a ``QuantizedWeight`` (for export), by qualified name."""
    return {n: m for n, m in model.named_modules() if callable(getattr(m, "to_quantized_weight", None))}
