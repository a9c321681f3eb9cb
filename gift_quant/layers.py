"""Trainable quantized linears that replace ``nn.Linear`` after quantization; both hand back a ``QuantizedWeight``.

``MixedPrecisionLinear`` is GIFT-SW's layer: a frozen low-bit part ``scales ⊙ (codes − zeros)`` plus a few trainable
fp salient input columns. What trains is chosen by explicit ``requires_grad`` flags (the recovery method sets them):
the salient columns, and optionally the quantization scales (and zero points when asymmetric) with the codes fixed.
While training, GIFT-SW's noise is added to the frozen part (``set_noise`` changes it in place).
``PackedMixedPrecisionLinear`` is the same layer holding its codes bit-packed and no dense copy (``frozen: packed``).

``STELinear`` is the QAT baseline: latent full-precision weights forwarded through the record's grid with a
straight-through estimator (clipped to the grid's range, as in LSQ), optionally with learned step sizes (LSQ).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant.noise import NO_NOISE, NoiseSpec, RecomputedLinear, draw, fresh_seed, noise_step
from gift_quant.packing import pack_codes, unpack_codes
from gift_quant.pinning import PinnedDtype
from gift_quant.quantized import QuantizedWeight
from gift_quant.quantizer import quantize

__all__ = ["CodeLatentLinear", "MixedPrecisionLinear", "NoiseSpec", "PackedMixedPrecisionLinear", "STELinear", "pack_frozen",
           "quantized_modules", "replace_linears"]

MIN_SCALE = 1e-8  # a trained step size never reaches 0 (it divides, and 0 would erase its group)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward, identity gradient in the backward."""
    return x + (x.round() - x).detach()


class QuantizedLinearBase(PinnedDtype):
    """A record's grid as module state: ``codes``, ``g_idx``, ``salient_idx`` buffers and float32 ``scales`` /
    ``zeros`` parameters (frozen until a recovery method trains them); the grid never follows a dtype cast, so the
    exported grid is the one the codes were chosen on."""

    _PINNED = ("scales", "zeros")

    def _init_record(self, qw: QuantizedWeight) -> None:
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self._store_codes(qw.codes.to(torch.uint8))
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone())
        self.register_buffer("salient_idx", qw.salient_idx.to(torch.int64).clone())
        self.scales = nn.Parameter(qw.scales.to(torch.float32).clone(), requires_grad=False)
        self.zeros = nn.Parameter(qw.zeros.to(torch.float32).clone(), requires_grad=False)

    def _store_codes(self, codes: torch.Tensor) -> None:
        self.register_buffer("codes", codes.clone())

    @property
    def num_salient(self) -> int:
        return self.salient_idx.numel()

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def per_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A per-(row, group) tensor (out, n_groups) at every weight (out, in); broadcast when there is one group."""
        return t if t.shape[1] == 1 else t[:, self.g_idx.long()]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) as the forward uses them: scales kept positive, zero points rounded (straight-through)."""
        scales = self.scales.clamp(min=MIN_SCALE)
        zeros = self.zeros if self.sym else round_ste(self.zeros).clamp(0, self.maxq)
        return scales, zeros

    def _record(self, codes: torch.Tensor, salient_weight: torch.Tensor) -> QuantizedWeight:
        scales, zeros = (t.detach().clone() for t in self.grid())
        return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=self.g_idx.clone(),
                               salient_idx=self.salient_idx.clone(),
                               salient_weight=salient_weight.detach().to(torch.float32).clone(),
                               bits=self.bits, group_size=self.group_size, sym=self.sym)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.num_salient}, "
                f"bits={self.bits}, group_size={self.group_size}")


class MixedPrecisionLinear(QuantizedLinearBase):
    """y = x·Ŵᵀ + x[..., S]·W_Sᵀ + b with Ŵ = scales ⊙ (codes − zeros) (salient columns 0) and W_S (out × k).

    Evaluation multiplies with a cached dense Ŵ (rebuilt when the scales change). Training with noise or with
    trainable scales goes through :class:`~gift_quant.noise.RecomputedLinear`, which rebuilds Ŵ (+ noise from a
    saved seed) in backward instead of keeping it: no out × in tensor is saved and no out × in gradient is formed
    unless the scales train. ``frozen`` replaces Ŵ by a given weight (Pre-GIFT-SW trains salient columns of the
    full-precision model; the record then only carries the target grid for the noise).
    """

    recompute = False  # True: every forward goes through RecomputedLinear (no dense Ŵ saved for backward)

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, noise: NoiseSpec = NO_NOISE,
                 dtype: torch.dtype = torch.float32, frozen: torch.Tensor | None = None) -> None:
        super().__init__()
        self._init_record(qw)
        self._init_frozen(qw, dtype, frozen)
        self.salient_weight = nn.Parameter(qw.salient_weight.to(dtype).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.register_buffer("noise_ratio", torch.zeros(qw.scales.shape, dtype=torch.float32), persistent=False)
        self.set_noise(noise)

    def _init_frozen(self, qw: QuantizedWeight, dtype: torch.dtype, frozen: torch.Tensor | None) -> None:
        self.on_grid = frozen is None
        base = qw.quantized_part(dtype) if frozen is None else frozen.detach().to(dtype).clone()
        base[:, self.salient_idx] = 0
        self.register_buffer("weight_q", base, persistent=False)  # derived: rebuilt from the grid when it changes
        self._weight_q_version = (self.scales._version, self.zeros._version)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the frozen part (the model's; it follows ``model.to(dtype)``)."""
        return self.weight_q.dtype

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, noise: NoiseSpec = NO_NOISE,
                       dtype: torch.dtype = torch.float32) -> "MixedPrecisionLinear":
        return cls(qw, bias, noise, dtype)

    # ------------------------------------------------------------ noise

    @torch.no_grad()
    def set_noise(self, noise: NoiseSpec, step: torch.Tensor | None = None) -> None:
        """Change the noise in place: σ = noise.scale · Δ, held as a ratio to the scales so it follows them when they
        train. Δ is ``step`` when given, else the layer's own scales (``noise.bits`` None) or a ``noise.bits``-bit
        grid on the non-salient columns of the frozen part (:func:`~gift_quant.noise.noise_step`)."""
        self.noise = noise
        if not noise.active:
            self.noise_ratio.zero_()
            return
        if step is None and noise.bits is not None:
            step = noise_step(self.frozen_weight().float(), self.salient_idx, noise.bits, self.group_size)
        ratio = torch.ones_like(self.scales) if step is None else step.to(self.scales) / self.scales.clamp(MIN_SCALE)
        self.noise_ratio.copy_(noise.scale * ratio)

    def noise_std(self) -> torch.Tensor:
        """σ (out, n_groups) of the noise at the current scales."""
        return self.noise_ratio * self.scales.detach().clamp(min=MIN_SCALE)

    # ------------------------------------------------------------ the frozen part

    def dequantize(self, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """Ŵ from the codes on the given grid, salient columns exactly 0 (their code is the zero point)."""
        w = self.per_weight(scales) * (self.codes.to(scales.dtype) - self.per_weight(zeros))
        # Already 0 there, but a trained zero point must get no gradient from columns it does not quantize.
        return w.index_fill(1, self.salient_idx, 0.0).to(self.dtype)

    def refresh(self) -> None:
        """Rebuild the cached Ŵ on the next use (after the scales were replaced rather than updated in place)."""
        self._weight_q_version = None

    def frozen_weight(self) -> torch.Tensor:
        """The dense Ŵ evaluation uses, rebuilt after the scales changed."""
        if self.on_grid and self._weight_q_version != (self.scales._version, self.zeros._version):
            with torch.no_grad():
                self.weight_q.copy_(self.dequantize(*self.grid()))
            self._weight_q_version = (self.scales._version, self.zeros._version)
        return self.weight_q

    def _builder(self, noisy: bool) -> Callable[..., torch.Tensor]:
        """The deterministic weight function RecomputedLinear calls in forward and again in backward."""
        seed = fresh_seed() if noisy else None

        def build(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
            if scales.requires_grad or zeros.requires_grad:
                grid_scales = scales.clamp(min=MIN_SCALE)
                grid_zeros = zeros if self.sym else round_ste(zeros).clamp(0, self.maxq)
                w = self.dequantize(grid_scales, grid_zeros)
            else:
                w = self.frozen_weight()
            if seed is None:
                return w
            std = self.per_weight(self.noise_ratio * scales.detach().clamp(min=MIN_SCALE)).to(w.dtype)
            eps = draw(w.shape, self.noise.kind, seed, w.device, w.dtype, self.noise.source)
            # One pass (w + ε·σ), then the few salient columns back to 0: their values live in salient_weight.
            return torch.addcmul(w, eps, std).index_fill_(1, self.salient_idx, 0.0)

        return build

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.training and self.noise.active
        if noisy or self.recompute or self.scales.requires_grad or self.zeros.requires_grad:
            y = RecomputedLinear.apply(x, self._builder(noisy), self.scales, self.zeros)
            y = y if self.bias is None else y + self.bias.to(y.dtype)
        else:
            y = F.linear(x, self.frozen_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.num_salient:
            y = y + F.linear(x.index_select(-1, self.salient_idx), self.salient_weight.to(x.dtype))
        return y

    def to_quantized_weight(self) -> QuantizedWeight:
        if not self.on_grid:
            raise ValueError("this layer wraps a full-precision weight (Pre-GIFT-SW), not a quantized one")
        return self._record(self.codes.clone(), self.salient_weight)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the frozen part and the salient columns written back."""
        weight = self.frozen_weight().clone()
        weight[:, self.salient_idx] = self.salient_weight.detach().to(weight.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                        dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}"


class PackedMixedPrecisionLinear(MixedPrecisionLinear):
    """:class:`MixedPrecisionLinear` with the frozen codes kept bit-packed (``packing.pack_codes``: bits/8 bytes per
    weight instead of one byte of codes plus a dense Ŵ) — QLoRA-style: each use dequantizes this one linear, and
    every forward goes through RecomputedLinear, so its Ŵ exists only while its own forward or backward runs.
    Same arithmetic as the dense layer, hence the same numbers; exports read the same record."""

    recompute = True

    @classmethod
    def from_layer(cls, m: MixedPrecisionLinear) -> "PackedMixedPrecisionLinear":
        """The packed twin of a quantized layer (its codes, grid, salient columns, bias, noise and mode)."""
        new = cls(m.to_quantized_weight(), m.bias, NO_NOISE, m.dtype).to(m.scales.device)
        for name in ("scales", "zeros", "salient_weight"):  # exactly as they are (a float32 master copy included)
            old = getattr(m, name)
            setattr(new, name, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        new.noise = m.noise
        with torch.no_grad():
            new.noise_ratio.copy_(m.noise_ratio)
        return new.train(m.training)

    def _store_codes(self, codes: torch.Tensor) -> None:
        self.register_buffer("qcodes", pack_codes(codes, self.bits))

    @property
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qcodes, self.bits, self.in_features)

    def _init_frozen(self, qw: QuantizedWeight, dtype: torch.dtype, frozen: torch.Tensor | None) -> None:
        if frozen is not None:
            raise ValueError("a packed layer holds quantized codes, not a full-precision frozen weight")
        self.on_grid = True
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)  # follows dtype casts

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_ref.dtype

    def frozen_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.dequantize(*self.grid())


def pack_frozen(model: nn.Module) -> int:
    """Swap every dense :class:`MixedPrecisionLinear` of ``model`` for its packed twin, in place (before the optimizer
    sees the parameters); returns how many were swapped."""
    dense = {n: m for n, m in mixed_linears(model).items() if type(m) is MixedPrecisionLinear and m.on_grid}
    for name, m in dense.items():
        swap_module(model, name, PackedMixedPrecisionLinear.from_layer(m))
    return len(dense)


class STELinear(QuantizedLinearBase):
    """QAT baseline: latent weights ``weight`` (every column trainable) forwarded through the record's grid.

    Non-salient columns: ``s·(clamp(round_ste(w/s) + z, 0, maxq) − z)`` — straight-through inside the grid's range, no
    gradient beyond it; with ``learn_scales`` the step sizes train too, with LSQ's gradient scale 1/√(n·maxq).
    Salient columns are used and trained as they are. By default the latent weights start on the grid values, the
    centres of their codes' cells: step 0 is exactly the quantized model and a code flips only once its weight has
    moved half a step (a start inside the cells' edges, as when the GPTQ-compensated codes are imposed on the weights
    before quantization, lets the first step undo GPTQ's error compensation). ``start`` gives other latents (QAT from
    the weights before quantization, with a record that is their own round-to-nearest).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                 learn_scales: bool = False, start: torch.Tensor | None = None) -> None:
        super().__init__()
        self._init_record(qw)
        start = qw.dequantize(torch.float32) if start is None else start.detach().to(torch.float32).clone()
        start[:, self.salient_idx] = qw.salient_weight.to(torch.float32)
        self.weight = nn.Parameter(start.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        mask = torch.zeros(self.in_features, dtype=torch.bool, device=qw.codes.device)
        mask[self.salient_idx] = True
        self.register_buffer("salient_mask", mask)
        self.scales.requires_grad_(learn_scales)
        group = self.in_features if qw.group_size == -1 else qw.group_size
        self.lsq_grad_scale = 1.0 / math.sqrt(group * self.maxq)  # LSQ: 1/√(weights per step · levels)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> "STELinear":
        return cls(qw, bias, dtype)

    def effective_weight(self) -> torch.Tensor:
        scales, zeros = self.grid()
        if scales.requires_grad:  # LSQ: same value, gradient scaled so step sizes move at the weights' pace
            g = self.lsq_grad_scale  # (x - x.detach() adds exactly 0: the forward's step is the exported one, bit for bit)
            scales = scales.detach() + (scales * g - (scales * g).detach())
        s, z = self.per_weight(scales), self.per_weight(zeros)
        w = self.weight.to(torch.float32)  # round in float32: bf16 would pick wrong codes
        q = torch.clamp(round_ste(w / s) + z, 0, self.maxq)
        w_hat = (s * (q - z)).to(self.weight.dtype)
        return torch.where(self.salient_mask, self.weight, w_hat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight().to(x.dtype), bias)

    def current_codes(self) -> torch.Tensor:
        scales, zeros = (t.detach() for t in self.grid())
        w = self.weight.detach().to(torch.float32)
        codes = quantize(w, self.per_weight(scales), self.per_weight(zeros), self.maxq).to(torch.uint8)
        # Record convention: salient columns carry the zero point so the quantized part is exactly 0 there.
        codes[:, self.salient_mask] = self.per_weight(zeros).expand_as(w)[:, self.salient_mask].to(torch.uint8)
        return codes

    def flipped_codes(self) -> int:
        """Codes that differ from the ones the layer started with (what makes QAT more than salient tuning)."""
        return int((self.current_codes() != self.codes).sum())

    def to_quantized_weight(self) -> QuantizedWeight:
        return self._record(self.current_codes(), self.weight.detach()[:, self.salient_idx])


class CodeLatentLinear(QuantizedLinearBase):
    """Block-AP's layer: every weight's code trains as a continuous latent ``latent`` (in code units, starting at the
    record's codes: the centres of their cells), forwarded as ``s·(clamp(round_ste(latent), 0, maxq) − z)``; the step
    sizes (and zero points when asymmetric) and the fp salient columns train beside it.

    Latents in code units rather than weight units keep the two kinds of parameter apart: a step size's gradient is
    its codes' ``q − z`` (as when only the scales train), not LSQ's ``q − w/s``, which is 0 at every cell centre — so
    the grid learns from step 0, and a code changes only once its latent has moved half a code (one learning rate
    fits every layer whatever its step size).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._init_record(qw)
        self.latent = nn.Parameter(qw.codes.to(torch.float32).clone())
        self.salient_weight = nn.Parameter(qw.salient_weight.to(dtype).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.scales.requires_grad_(True)
        self.zeros.requires_grad_(not self.sym)  # integer zero points: straight-through rounding

    def effective_weight(self) -> torch.Tensor:
        scales, zeros = self.grid()
        q = torch.clamp(round_ste(self.latent), 0, self.maxq)
        w = self.per_weight(scales) * (q - self.per_weight(zeros))
        return w.index_fill(1, self.salient_idx, 0.0)  # salient columns live in salient_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.effective_weight().to(x.dtype), bias)
        if self.num_salient:
            y = y + F.linear(x.index_select(-1, self.salient_idx), self.salient_weight.to(x.dtype))
        return y

    def current_codes(self) -> torch.Tensor:
        codes = torch.clamp(self.latent.detach().round(), 0, self.maxq).to(torch.uint8)
        codes[:, self.salient_idx] = self.codes[:, self.salient_idx]  # the record's convention there (zero point)
        return codes

    def flipped_codes(self) -> int:
        return int((self.current_codes() != self.codes).sum())

    def to_quantized_weight(self) -> QuantizedWeight:
        codes = self.current_codes()
        if not self.sym:  # a trained zero point moves the salient columns' convention code with it
            codes[:, self.salient_idx] = self.per_weight(self.grid()[1].detach())[:, self.salient_idx].to(torch.uint8)
        return self._record(codes, self.salient_weight)


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
        swap_module(model, name, new)


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name``; it takes the old one's train/eval mode (noise is on only in training)."""
    parent, _, child = name.rpartition(".")
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule that can hand back a ``QuantizedWeight`` (for export), by qualified name."""
    return {n: m for n, m in model.named_modules() if callable(getattr(m, "to_quantized_weight", None))}


def mixed_linears(model: nn.Module) -> dict[str, MixedPrecisionLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}
