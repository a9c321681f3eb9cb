"""GIFT-SW's noise on the frozen part of a quantized linear: what it is, how large, and how it is drawn.

* :class:`NoiseSpec` — the kind (gaussian / uniform / none), σ as a multiple of a quantization step, and which grid's
  step: ``bits=None`` the layer's own grid, an integer a ``bits``-bit grid made by :func:`noise_step`.
* :func:`noise_step` — the one definition of that grid: symmetric, MSE-clipped, per row (or row-group) on the
  non-salient columns of the weight at hand — the full-precision weight when recovery runs before quantization, the
  quantized part after it — so ``noise_bits`` means the same grid either way.
* :class:`RecomputedLinear` — ``y = x·Wᵀ`` for a frozen weight ``W`` built from small tensors (trainable scales) plus
  noise drawn from a seed; backward builds ``W`` again from the same seed instead of keeping it, so a training step
  saves no out × in tensor per linear (GIFT-SW's noised copy of every frozen weight was ~1 GB on SmolLM2).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from gift_quant.quantizer import GRID_BITS, GridSpec, group_params

NoiseKind = Literal["gaussian", "uniform", "none"]
NoiseSource = Literal["fresh", "pool"]
POOL_SIZE = 1 << 24  # i.i.d. draws per (kind, device, dtype): 64 MB in float32
_UNIFORM_HALF_WIDTH = math.sqrt(3.0)  # uniform on [-√3, √3] has unit variance: σ means the same for both kinds


@dataclass(frozen=True)
class NoiseSpec:
    """Noise injected into the frozen weights while training: std = scale · Δ of the grid ``bits`` names."""

    kind: NoiseKind = "gaussian"
    scale: float = 0.5
    bits: int | None = None  # None: the layer's own grid; else a `bits`-bit grid from noise_step
    source: NoiseSource = "fresh"  # fresh draws, or random windows of a fixed pool of i.i.d. draws (see draw)

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "uniform", "none"):
            raise ValueError(f"noise kind must be gaussian, uniform or none, got {self.kind!r}")
        if not self.scale >= 0:
            raise ValueError(f"noise scale must be >= 0, got {self.scale}")
        if self.bits is not None and self.bits not in GRID_BITS:
            raise ValueError(f"noise bits must be None or one of {GRID_BITS}, got {self.bits}")
        if self.source not in ("fresh", "pool"):
            raise ValueError(f"noise source must be fresh or pool, got {self.source!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.scale > 0


NO_NOISE = NoiseSpec(kind="none")


def noise_step(weight: torch.Tensor, salient_idx: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Δ (out, n_groups) of a ``bits``-bit symmetric MSE-clipped grid on the non-salient columns of ``weight``."""
    spec = GridSpec(bits=bits, group_size=group_size, sym=True, mse=True, norm=2.0)
    scales, _ = group_params(weight.detach().float(), spec, salient_idx)
    return scales.float()


def draw(shape: torch.Size, kind: NoiseKind, seed: int, device: torch.device, dtype: torch.dtype,
         source: NoiseSource = "fresh") -> torch.Tensor:
    """Unit-variance noise of ``kind`` determined by ``seed``: the same seed gives the same tensor.

    ``fresh`` draws every value from a generator seeded with ``seed`` (drawing is most of GIFT-SW's extra step cost
    on a CPU). ``pool`` returns a read-only view: the window at a seed-chosen offset of a fixed pool of
    ``POOL_SIZE`` i.i.d. draws, so the values within one draw are i.i.d. and successive draws start at independent
    random offsets; a weight's noise over steps is then a sample with replacement from 2^24 values — for training
    purposes fresh, at no drawing cost."""
    numel = math.prod(shape)
    if source == "pool" and numel <= POOL_SIZE:
        pool = _pool(kind, torch.device(device), dtype)
        offset = seed % (POOL_SIZE - numel + 1)
        return pool[offset: offset + numel].view(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype).uniform_(-_UNIFORM_HALF_WIDTH, _UNIFORM_HALF_WIDTH,
                                                                   generator=gen)


@functools.lru_cache(maxsize=None)
def _pool(kind: NoiseKind, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return draw(torch.Size([POOL_SIZE]), kind, 0x9E3779B9, device, dtype, "fresh")


def fresh_seed() -> int:
    """A seed from torch's global generator: reproducible under a fixed seed, and replayed identically when
    activation checkpointing restores the RNG state to recompute a forward."""
    return int(torch.randint(0, 2**62, (1,)).item())


class RecomputedLinear(torch.autograd.Function):
    """``F.linear(x, build(*params))`` that keeps only ``x`` and the small ``params`` for backward.

    ``build`` must be deterministic (noise from a fixed seed): backward calls it again, takes the input gradient
    against the rebuilt weight, and — when a param needs a gradient — backpropagates ``grad_yᵀ·x`` through ``build``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, build: Callable[..., torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = build(*params)
        ctx.build = build
        ctx.param_grads = any(ctx.needs_input_grad[2:])
        ctx.save_for_backward(x if ctx.param_grads else None, *params)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(need) for p, need in zip(params, needs)]
            weight = ctx.build(*leaves)
        grad_x = grad_y.matmul(weight.detach().to(grad_y.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        if ctx.param_grads:
            g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = g2.t().to(weight.dtype).matmul(x2.to(weight.dtype))  # (out, in), freed right after
            wanted = [leaf for leaf, need in zip(leaves, needs) if need]
            found = iter(torch.autograd.grad(weight, wanted, grad_w))
            grads = [next(found) if need else None for need in needs]
        return (grad_x, None, *grads)
