"""Tests for the trainable mixed-precision linears (gift_quant/layers.py).

References are independent: float64 dense autograd, closed-form noise statistics, hand-built records.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gift_quant.layers import (
    MixedPrecisionLinear,
    NoiseSpec,
    PackedMixedPrecisionLinear,
    STELinear,
    pack_frozen,
    quantized_modules,
    replace_linears,
)
from gift_quant.noise import draw
from gift_quant.packing import packed_rows
from gift_quant.quantized import QuantizedWeight
from gift_quant.gptq import GPTQ
from gift_quant.methods import METHODS, Training
from gift_quant.quantizer import GridSpec, QuantSpec, find_params, quantize, rtn

OUT, IN, K = 24, 40, 5  # distinct sizes so an out × in tensor is recognisable by its shape
# float32 forward vs float64 reference: sums of IN products of O(1) values, each rounding ≤ 2^-24 relative.
ATOL32 = 1e-5


def hand_record(out: int, inn: int, k: int, bits: int, n_groups: int, seed: int) -> QuantizedWeight:
    """A record built without the quantizer: random codes/scales, zero-point salient codes, shuffled g_idx."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    scales = torch.rand(out, n_groups, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, maxq + 1, (out, n_groups), generator=g).float()
    g_idx = (torch.randperm(inn, generator=g) % n_groups).to(torch.int32)  # act-order style, non-contiguous
    codes = torch.randint(0, maxq + 1, (out, inn), generator=g).to(torch.uint8)
    salient_idx = torch.randperm(inn, generator=g)[:k].sort().values
    codes[:, salient_idx] = zeros[:, g_idx[salient_idx].long()].to(torch.uint8)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        salient_idx=salient_idx,
        salient_weight=torch.randn(out, k, generator=g),
        bits=bits,
        group_size=-1 if n_groups == 1 else inn // n_groups,
        sym=False,
    )


def rtn_record(bits: int = 3, group_size: int = -1, k: int = K, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    salient = torch.randperm(IN, generator=g)[:k].sort().values
    return rtn(w, QuantSpec(bits=bits, group_size=group_size), salient_idx=salient)


def buffers_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in m.named_buffers()}


# ---------------------------------------------------------------- MixedPrecisionLinear: structure and eval


def trainable(m: nn.Module) -> list[str]:
    return [n for n, p in m.named_parameters() if p.requires_grad]


def test_only_salient_weight_trains_by_default() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=1)
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT))
    assert trainable(layer) == ["salient_weight"]
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == OUT * K
    assert sorted(n for n, _ in layer.named_parameters()) == ["salient_weight", "scales", "zeros"]  # the grid: frozen
    assert all(not b.requires_grad for b in layer.buffers())
    r = repr(layer)
    for part in (f"in_features={IN}", f"out_features={OUT}", f"k={K}", "bits=3"):
        assert part in r


@pytest.mark.parametrize("n_groups", [1, 4])
def test_eval_output_equals_dense_dequantized(n_groups: int) -> None:
    qw = hand_record(OUT, IN, K, bits=4, n_groups=n_groups, seed=2)
    bias = torch.randn(OUT)
    layer = MixedPrecisionLinear.from_quantized(qw, bias).eval()
    x = torch.randn(3, 7, IN)
    y = layer(x)
    ref = F.linear(x.double(), qw.dequantize(torch.float64), bias.double())
    torch.testing.assert_close(y.double(), ref, atol=ATOL32, rtol=0)
    assert torch.equal(layer(x), y)  # deterministic
    # the frozen part really has exact zeros on the salient columns
    assert torch.count_nonzero(layer.weight_q[:, qw.salient_idx]) == 0


def test_train_mode_without_noise_equals_eval() -> None:
    qw = hand_record(OUT, IN, K, bits=2, n_groups=1, seed=3)
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(kind="none"))
    x = torch.randn(5, IN)
    assert torch.equal(layer.train()(x), layer.eval()(x))


def test_no_salient_columns() -> None:
    qw = hand_record(OUT, IN, 0, bits=4, n_groups=1, seed=4)
    layer = MixedPrecisionLinear.from_quantized(qw).eval()
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x).double(), x.double() @ qw.dequantize(torch.float64).T, atol=ATOL32, rtol=0)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 0


# ---------------------------------------------------------------- MixedPrecisionLinear: gradients


def dense_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, grad_out: torch.Tensor):
    """Autograd on a dense float64 linear whose full weight is a Parameter."""
    w64 = nn.Parameter(w.detach().double().clone())
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, w64, None if bias is None else bias.double())
    y.backward(grad_out.double())
    return y, w64.grad, x64.grad


def test_backward_matches_dense_float64_reference() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=5)
    bias = torch.randn(OUT)
    layer = MixedPrecisionLinear.from_quantized(qw, bias).eval()
    x = torch.randn(2, 6, IN, requires_grad=True)
    grad_out = torch.randn(2, 6, OUT)
    layer(x).backward(grad_out)
    _, w_grad, x_grad = dense_reference(x, qw.dequantize(), bias, grad_out)
    torch.testing.assert_close(layer.salient_weight.grad.double(), w_grad[:, qw.salient_idx], atol=ATOL32, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_grad, atol=ATOL32, rtol=0)


def noised_reference(qw: QuantizedWeight, sigma: torch.Tensor, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """The frozen part plus the draw of ``seed``, σ per (row, group), zero on the salient columns (float64)."""
    eps = draw(torch.Size(qw.shape), kind, seed, torch.device("cpu"), torch.float32).double()
    eps *= sigma.double()[:, qw.g_idx.long()]
    eps[:, qw.salient_idx] = 0
    return qw.quantized_part(torch.float64) + eps


@pytest.mark.parametrize("n_groups", [1, 4])
def test_backward_with_noise_matches_dense_reference_on_the_noised_weight(n_groups, monkeypatch) -> None:
    """The noise is re-drawn from its seed in backward: the gradients equal those of keeping the noised weight."""
    import gift_quant.layers as layers

    qw = hand_record(OUT, IN, K, bits=3, n_groups=n_groups, seed=6)
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(scale=1.0)).train()
    monkeypatch.setattr(layers, "fresh_seed", lambda: 123)
    x = torch.randn(9, IN, requires_grad=True)
    grad_out = torch.randn(9, OUT)
    y = layer(x)
    y.backward(grad_out)
    w_full = noised_reference(qw, qw.scales, 123)
    w_full[:, qw.salient_idx] = qw.salient_weight.double()
    y_ref, w_grad, x_grad = dense_reference(x, w_full, None, grad_out)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL32, rtol=0)
    torch.testing.assert_close(layer.salient_weight.grad.double(), w_grad[:, qw.salient_idx], atol=ATOL32, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_grad, atol=ATOL32, rtol=0)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every new tensor an aten op allocates (views of existing storage are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out


def test_backward_never_materialises_a_full_weight_gradient() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=7)
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT)).train()  # salient_ft: no noise
    x = torch.randn(11, IN, requires_grad=True)
    loss = layer(x).square().sum()
    with ShapeLog() as log:
        loss.backward()
    assert (OUT, K) in log.shapes  # the salient gradient was computed ...
    assert (OUT, IN) not in log.shapes and (IN, OUT) not in log.shapes  # ... and no out × in one
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"salient_weight"}
    assert x.grad is not None


def test_noised_training_saves_no_weight_sized_tensor() -> None:
    """GIFT-SW's step keeps no noised copy of the frozen weight for backward (it is re-drawn from a seed)."""
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=7)
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT), noise=NoiseSpec(scale=0.5)).train()
    x = torch.randn(11, IN, requires_grad=True)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = layer(x).square().sum()
    loss.backward()
    assert shapes and (OUT, IN) not in shapes and (IN, OUT) not in shapes
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"salient_weight"}


def test_buffers_never_change_under_optimizer_steps() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=8)
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT), noise=NoiseSpec(scale=1.0)).train()
    before = {**buffers_of(layer), "scales": layer.scales.detach().clone(), "zeros": layer.zeros.detach().clone()}
    start = layer.salient_weight.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, IN)).square().mean().backward()
        opt.step()
    after = {**buffers_of(layer), "scales": layer.scales.detach().clone(), "zeros": layer.zeros.detach().clone()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a frozen buffer changed"
    assert not torch.equal(layer.salient_weight, start)
    # optimizer state exists only for the out × k salient weight
    assert [tuple(s["exp_avg"].shape) for s in opt.state.values()] == [(OUT, K)]


# ---------------------------------------------------------------- MixedPrecisionLinear: trainable scales


@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("sym", [True, False])
def test_scale_gradients_match_float64_autograd(noise: float, sym: bool, monkeypatch) -> None:
    """Scales (and asymmetric zero points, rounded straight-through) train with codes fixed: the recomputing
    backward gives autograd's gradients of y = x·(s ⊙ (c − z) + σε)ᵀ in float64."""
    import gift_quant.layers as layers

    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=21)
    qw.sym = sym
    if sym:
        qw.zeros.fill_(4.0)
        qw.codes[:, qw.salient_idx] = 4
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT), noise=NoiseSpec(scale=noise)).train()
    layer.scales.requires_grad_(True)
    layer.zeros.requires_grad_(not sym)
    monkeypatch.setattr(layers, "fresh_seed", lambda: 7)
    x = torch.randn(2, 5, IN, requires_grad=True)
    grad_out = torch.randn(2, 5, OUT)
    layer(x).backward(grad_out)

    s = qw.scales.double().requires_grad_()
    z = qw.zeros.double().requires_grad_()
    g = qw.g_idx.long()
    w = s[:, g] * (qw.codes.double() - z[:, g])
    if noise:
        w = w + (noised_reference(qw, noise * qw.scales, 7) - qw.quantized_part(torch.float64))
    w = w.index_put((torch.arange(OUT)[:, None], qw.salient_idx[None]), qw.salient_weight.double())
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, w, layer.bias.double())
    y.backward(grad_out.double())
    torch.testing.assert_close(layer.scales.grad.double(), s.grad, atol=1e-4, rtol=1e-4)
    if not sym:
        torch.testing.assert_close(layer.zeros.grad.double(), z.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=ATOL32, rtol=0)


def test_trained_scales_change_the_eval_weight_and_the_record() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=22)
    layer = MixedPrecisionLinear.from_quantized(qw, None).eval()
    x = torch.randn(3, IN)
    before = layer(x)
    with torch.no_grad():
        layer.scales.mul_(1.5)  # as an optimizer step would, in place
    rec = layer.to_quantized_weight()
    assert torch.equal(rec.codes, qw.codes) and torch.allclose(rec.scales, qw.scales * 1.5)
    torch.testing.assert_close(layer(x).double(), x.double() @ rec.dequantize(torch.float64).T, atol=ATOL32, rtol=0)
    assert not torch.allclose(layer(x), before)


def test_noise_follows_trained_scales_and_set_noise_changes_it_in_place() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=1, seed=23)
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(scale=0.5))
    torch.testing.assert_close(layer.noise_std(), 0.5 * qw.scales)
    with torch.no_grad():
        layer.scales.mul_(2.0)
    torch.testing.assert_close(layer.noise_std(), 0.5 * 2.0 * qw.scales)
    ratio = layer.noise_ratio
    layer.set_noise(NoiseSpec(scale=0.25))
    assert layer.noise_ratio is ratio  # the same buffer, changed in place: no layer is rebuilt
    torch.testing.assert_close(layer.noise_std(), 0.25 * 2.0 * qw.scales)
    layer.set_noise(NoiseSpec(kind="none"))
    assert not layer.noise.active and torch.count_nonzero(layer.noise_std()) == 0


# ---------------------------------------------------------------- MixedPrecisionLinear: noise


def sample_noise(layer: MixedPrecisionLinear, n: int) -> torch.Tensor:
    """(n, out, in) noise draws, read through the public forward: x = I gives y = Wᵀ exactly."""
    eye = torch.eye(layer.in_features)
    clean = layer.eval()(eye).T
    layer.train()
    with torch.no_grad():
        return torch.stack([layer(eye).T - clean for _ in range(n)])


# Tolerances: for n i.i.d. draws of std σ the sample mean has std σ/√n and the sample std has relative std
# √((κ-1)/(4n)) (κ = kurtosis: 3 gaussian → 0.71/√n, 1.8 uniform → 0.45/√n). We allow 5 standard errors.
N_DRAWS = 300


def check_moments(noise: torch.Tensor, sigma: float, kind: str) -> None:
    n = noise.numel()
    kappa = 3.0 if kind == "gaussian" else 1.8
    noise = noise.double()
    assert abs(noise.mean().item()) <= 5 * sigma / math.sqrt(n)
    assert abs(noise.std().item() / sigma - 1) <= 5 * math.sqrt((kappa - 1) / (4 * n))


@pytest.mark.parametrize("source", ["fresh", "pool"])
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("n_groups", [1, 4])
def test_noise_statistics_per_row_and_group(kind: str, n_groups: int, source: str) -> None:
    torch.manual_seed(0)
    qw = hand_record(OUT, IN, K, bits=3, n_groups=n_groups, seed=9)
    noise = NoiseSpec(kind=kind, scale=0.5, source=source)
    layer = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT), noise=noise)
    draws = sample_noise(layer, N_DRAWS)
    salient = torch.zeros(IN, dtype=torch.bool)
    salient[qw.salient_idx] = True
    assert torch.count_nonzero(draws[:, :, salient]) == 0  # salient columns never get noise
    assert not torch.equal(draws[0], draws[1])  # fresh noise each forward
    sigma = noise.scale * qw.step_per_weight()  # (out, in) expected σ_ij
    for g in range(n_groups):
        cols = (qw.g_idx == g) & ~salient
        for i in range(OUT):
            check_moments(draws[:, i, cols], sigma[i, cols][0].item(), kind)
    if kind == "uniform":  # bounded support |ε| ≤ √3 σ (a gaussian exceeds it 8% of the time)
        assert (draws[:, :, ~salient].abs() <= math.sqrt(3) * sigma[:, ~salient] * (1 + 1e-5)).all()
    else:
        assert (draws[:, :, ~salient].abs() > math.sqrt(3) * sigma[:, ~salient]).float().mean() > 0.05
    # eval mode: no noise
    x = torch.randn(4, IN)
    assert torch.equal(layer.eval()(x), layer.eval()(x))


def test_per_group_step_gives_per_group_sigma() -> None:
    """Columns scaled by 1, 10, 100, 1000 per group: RTN per-group Δ differ, and so must the measured σ."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    w = torch.randn(OUT, IN, generator=g) * (10.0 ** (torch.arange(IN) // 10)).float()
    qw = rtn(w, QuantSpec(bits=4, group_size=10), salient_idx=torch.tensor([3, 17]))
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(scale=0.5))
    draws = sample_noise(layer, N_DRAWS)
    steps = qw.scales  # (out, 4)
    assert (steps[:, 1:] / steps[:, :-1] > 2).all()  # the groups' Δ really differ
    for gi in range(4):
        cols = (qw.g_idx == gi) & ~torch.isin(torch.arange(IN), qw.salient_idx)
        for i in range(OUT):
            check_moments(draws[:, i, cols], 0.5 * steps[i, gi].item(), "gaussian")


def symmetric_grid_error(w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row squared error of rounding w on a symmetric grid (levels Δ·(q - 2^(b-1)), q in [0, 2^b - 1])."""
    half = 2 ** (bits - 1)
    q = torch.clamp(torch.round(w / step) + half, 0, 2**bits - 1)
    return ((step * (q - half) - w) ** 2).sum(1)


@pytest.mark.parametrize("bits", [4, 5])  # 5: a grid only measured for σ (GIFT-SW's noise levels), never stored
def test_noise_bits_uses_an_mse_grid_of_that_width_on_nonsalient_columns(bits: int) -> None:
    torch.manual_seed(0)
    qw = rtn_record(bits=2, k=K, seed=11)  # a coarse 2-bit record: its own Δ is far larger than a 4-bit one
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(scale=0.5, bits=bits))
    nonsalient = ~torch.isin(torch.arange(IN), qw.salient_idx)
    w_ns = qw.quantized_part()[:, nonsalient].double()
    ref_scale, _ = find_params(w_ns.float(), GridSpec(bits=bits, sym=True, mse=True, norm=2.0))
    ref_step = ref_scale.reshape(-1).double()
    # independent properties of an MSE-clipped symmetric grid: Δ no larger than absmax's (clipping only shrinks),
    # and rounding error no worse than with the absmax step.
    absmax_step = 2 * w_ns.abs().amax(1) / (2**bits - 1)
    assert (ref_step <= absmax_step * (1 + 1e-6)).all()
    mse_err = symmetric_grid_error(w_ns, ref_step[:, None], bits)
    assert (mse_err <= symmetric_grid_error(w_ns, absmax_step[:, None], bits) * (1 + 1e-6)).all()
    assert (ref_step < 0.5 * qw.scales[:, 0].double()).all()
    draws = sample_noise(layer, N_DRAWS)
    assert torch.count_nonzero(draws[:, :, ~nonsalient]) == 0
    for i in range(OUT):
        check_moments(draws[:, i, nonsalient], 0.5 * ref_step[i].item(), "gaussian")


def test_noise_spec_validation() -> None:
    with pytest.raises(ValueError):
        NoiseSpec(kind="laplace")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NoiseSpec(scale=-1.0)
    with pytest.raises(ValueError):
        NoiseSpec(bits=0)


# ---------------------------------------------------------------- MixedPrecisionLinear: export


def assert_same_grid(a: QuantizedWeight, b: QuantizedWeight) -> None:
    for name in ("codes", "scales", "zeros", "g_idx", "salient_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


def test_to_quantized_weight_round_trips_and_carries_trained_salient() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=12)
    layer = MixedPrecisionLinear.from_quantized(qw, None)
    rec = layer.to_quantized_weight()
    assert_same_grid(rec, qw)
    assert torch.equal(rec.salient_weight, qw.salient_weight)
    with torch.no_grad():
        layer.salient_weight.add_(1.0)
    rec2 = layer.to_quantized_weight()
    assert_same_grid(rec2, qw)
    torch.testing.assert_close(rec2.salient_weight, qw.salient_weight + 1.0)
    assert torch.equal(rec.salient_weight, qw.salient_weight)  # earlier records are not aliased
    x = torch.randn(4, IN)
    ref = x.double() @ rec2.dequantize(torch.float64).T
    torch.testing.assert_close(layer.eval()(x).double(), ref, atol=ATOL32, rtol=0)


# ---------------------------------------------------------------- STELinear


def fake_quant_reference(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """float64 fake-quant with the record's fixed grid on non-salient columns, fp salient columns."""
    w = w.double()
    s = qw.scales.double()[:, qw.g_idx.long()]
    z = qw.zeros.double()[:, qw.g_idx.long()]
    q = torch.clamp(torch.round(w / s) + z, 0, 2**qw.bits - 1)
    out = s * (q - z)
    out[:, qw.salient_idx] = w[:, qw.salient_idx]
    return out


def clipped_mask(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Where the straight-through gradient passes: inside the grid's range, or on a salient column."""
    s = qw.scales.double()[:, qw.g_idx.long()]
    z = qw.zeros.double()[:, qw.g_idx.long()]
    r = torch.round(w.double() / s) + z
    inside = (r >= 0) & (r <= 2**qw.bits - 1)
    inside[:, qw.salient_idx] = True
    return inside


def perturbed_ste(qw: QuantizedWeight, bias: torch.Tensor | None, seed: int) -> STELinear:
    """A STE layer whose weights moved off the grid (some beyond the clamp range), as after training."""
    ste = STELinear.from_quantized(qw, bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ste.weight.add_(torch.randn(ste.weight.shape, generator=g) * 0.1)
    return ste


def test_ste_every_weight_trainable_with_straight_through_gradient() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=13)
    bias = torch.randn(OUT)
    ste = perturbed_ste(qw, bias, seed=14)
    assert trainable(ste) == ["weight"]
    x = torch.randn(10, IN, requires_grad=True)
    grad_out = torch.randn(10, OUT)
    y = ste(x)
    y.backward(grad_out)
    w_eff = fake_quant_reference(ste.weight.detach(), qw)
    y_ref, w_grad, x_grad = dense_reference(x, w_eff, bias, grad_out)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL32, rtol=0)
    # straight-through: d loss / d weight equals d loss / d (fake-quant weight) inside the grid's range, 0 beyond
    inside = clipped_mask(ste.weight.detach(), qw)
    torch.testing.assert_close(ste.weight.grad.double(), w_grad * inside, atol=ATOL32, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_grad, atol=ATOL32, rtol=0)
    assert 0 < (~inside).sum() < OUT * IN // 4  # the perturbation pushed some weights beyond the range
    assert torch.count_nonzero(ste.weight.grad) == inside.sum()


@pytest.mark.parametrize("n_groups", [1, 4])
def test_fresh_ste_eval_equals_mixed_precision_eval(n_groups: int) -> None:
    qw = hand_record(OUT, IN, K, bits=4, n_groups=n_groups, seed=15)
    bias = torch.randn(OUT)
    x = torch.randn(6, IN)
    mp = MixedPrecisionLinear.from_quantized(qw, bias).eval()
    ste = STELinear.from_quantized(qw, bias).eval()
    torch.testing.assert_close(ste(x), mp(x), atol=ATOL32, rtol=0)
    assert torch.equal(ste.effective_weight(), qw.dequantize())  # grid values map back onto themselves


def test_ste_to_quantized_weight_requantizes_with_the_fixed_grid() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=16)
    assert_same_grid(STELinear.from_quantized(qw).to_quantized_weight(), qw)  # fresh: exact round trip
    ste = perturbed_ste(qw, None, seed=17)
    rec = ste.to_quantized_weight()
    w = ste.weight.detach().double()
    s = qw.scales.double()[:, qw.g_idx.long()]
    z = qw.zeros.double()[:, qw.g_idx.long()]
    codes_ref = torch.clamp(torch.round(w / s) + z, 0, 2**qw.bits - 1)
    codes_ref[:, qw.salient_idx] = z[:, qw.salient_idx]
    assert rec.codes.dtype == torch.uint8
    assert torch.equal(rec.codes.double(), codes_ref)
    assert not torch.equal(rec.codes, qw.codes)  # the perturbation really moved some codes
    assert torch.equal(rec.salient_weight, ste.weight.detach()[:, qw.salient_idx])
    for name in ("scales", "zeros", "g_idx", "salient_idx"):
        assert torch.equal(getattr(rec, name), getattr(qw, name))
    torch.testing.assert_close(rec.dequantize(), ste.effective_weight().detach(), atol=1e-6, rtol=0)


def gptq_record(bits: int = 3, seed: int = 30) -> tuple[torch.Tensor, QuantizedWeight]:
    """fp weights and their GPTQ record on correlated inputs, where error compensation moves many codes off RTN's."""
    g = torch.Generator().manual_seed(seed)
    fp = torch.randn(OUT, IN, generator=g)
    mix = torch.randn(IN, IN, generator=g) / math.sqrt(IN) + torch.eye(IN)
    gptq = GPTQ(IN)
    gptq.add_batch(torch.randn(512, IN, generator=g) @ mix)
    return fp, gptq.quantize(fp, QuantSpec(bits=bits, group_size=8), salient_idx=torch.tensor([1, 9])).weight


def test_ste_starts_at_its_gptq_codes_cell_centres_and_a_sub_margin_step_flips_nothing() -> None:
    """Step 0 is the GPTQ model, and no code flips until a latent weight has moved half a step: an Adam step smaller
    than that margin keeps every code GPTQ chose, including the many it moved away from the fp weights' own."""
    fp, qw = gptq_record()
    spec = QuantSpec(bits=3, group_size=8)
    s = qw.step_per_weight()
    own = quantize(fp, s, qw.zeros[:, qw.g_idx.long()], spec.maxq)
    moved = own != qw.codes
    moved[:, qw.salient_idx] = False
    assert moved.float().mean() > 0.05  # GPTQ's error compensation really moved codes
    for learn_scales in (False, True):
        ste = STELinear(qw, None, learn_scales=learn_scales).train()
        assert torch.equal(ste.weight.detach(), qw.dequantize())  # latents at the cells' centres
        x = torch.randn(4, IN)
        mp = MixedPrecisionLinear.from_quantized(qw, None).eval()
        torch.testing.assert_close(ste(x), mp(x), atol=ATOL32, rtol=0)  # step 0 is the quantized model
        lr = 0.4 * float(s.min())  # Adam moves every weight by at most ~lr per step: less than half the smallest Δ
        opt = torch.optim.Adam([ste.weight], lr=lr)
        for _ in range(1):
            ste(torch.randn(32, IN)).square().mean().backward()
            opt.step()
        assert (ste.weight.detach() - qw.dequantize()).abs().max() > 0  # it did move
        assert ste.flipped_codes() == 0
        assert torch.equal(ste.to_quantized_weight().codes, qw.codes)


def test_qat_from_fp_starts_from_the_fp_weights_on_their_rtn_grid() -> None:
    """LLM-QAT-style QAT: latents are the weights before quantization, the grid their own RTN (not GPTQ's), so the
    first forward equals the RTN model and the fp salient columns are the fp weights'."""
    fp, qw = gptq_record(seed=31)
    layer = MixedPrecisionLinear.from_quantized(qw, None)
    model = nn.Sequential(layer)
    n = METHODS["qat_fp"].prepare(model, Training(), fp_weights=lambda name: fp)
    ste = model[0]
    assert isinstance(ste, STELinear) and n == OUT * IN + ste.scales.numel()
    ref = rtn(fp, QuantSpec(bits=3, group_size=8), qw.salient_idx)
    assert torch.equal(ste.weight.detach(), fp)
    assert torch.equal(ste.scales.detach(), ref.scales)
    # its codes are RTN's, except where w/Δ lies within float32 rounding of a cell edge (ISA-dependent division)
    codes = ste.to_quantized_weight().codes
    v = fp.double() / ref.step_per_weight().double()
    at_edge = ((v - v.floor()) - 0.5).abs() < 1e-5
    assert ((codes != ref.codes) <= at_edge).all()
    x = torch.randn(4, IN)
    torch.testing.assert_close(ste(x).double(), x.double() @ ste.to_quantized_weight().dequantize(torch.float64).T,
                               atol=ATOL32, rtol=0)
    with pytest.raises(ValueError, match="full-precision weight has shape"):
        METHODS["qat_fp"].prepare(nn.Sequential(MixedPrecisionLinear.from_quantized(qw, None)), Training(),
                                  fp_weights=lambda name: fp[:, :-1])


def test_ste_flips_codes_at_a_sensible_learning_rate() -> None:
    """QAT changes codes: from the cells' centres a code flips once its weight has moved half a step, so Adam at a
    learning rate of a few percent of Δ (here Δ ≈ 0.9) moves codes within 20 steps on a regression target."""
    torch.manual_seed(0)
    fp = torch.randn(OUT, IN)
    qw = rtn(fp, QuantSpec(bits=3), salient_idx=torch.tensor([2]))
    ste = STELinear(qw, None).train()
    target = nn.Linear(IN, OUT, bias=False)
    opt = torch.optim.Adam(ste.parameters(), lr=5e-2)
    for _ in range(20):
        x = torch.randn(32, IN)
        loss = (ste(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flipped = ste.flipped_codes()
    assert 0 < flipped < OUT * IN
    assert flipped == int((ste.to_quantized_weight().codes != qw.codes).sum())


def test_ste_lsq_trains_step_sizes_with_the_lsq_gradient() -> None:
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=31)
    ste = STELinear(qw, None, learn_scales=True)
    assert trainable(ste) == ["scales", "weight"]
    with torch.no_grad():
        ste.weight.add_(torch.randn(OUT, IN) * 0.05)
    x = torch.randn(6, IN)
    grad_out = torch.randn(6, OUT)
    ste(x).backward(grad_out)
    # float64 reference: d/ds of s·(clamp(round(w/s) + z) − z) with round's gradient passed straight through,
    # scaled by LSQ's g = 1/√(group · maxq)
    s = qw.scales.double().requires_grad_()
    w = ste.weight.detach().double()
    g = qw.g_idx.long()
    sw, zw = s[:, g], qw.zeros.double()[:, g]
    v = w / sw
    q = torch.clamp(v + (v.round() - v).detach() + zw, 0, 7)
    w_hat = torch.where(torch.isin(torch.arange(IN), qw.salient_idx), w, sw * (q - zw))
    F.linear(x.double(), w_hat).backward(grad_out.double())
    torch.testing.assert_close(ste.scales.grad.double(), s.grad / math.sqrt((IN // 4) * 7), atol=1e-5, rtol=1e-4)
    opt = torch.optim.SGD([ste.scales], lr=1.0)
    opt.step()
    assert not torch.equal(ste.to_quantized_weight().scales, qw.scales)  # the trained steps are exported


# ---------------------------------------------------------------- model helpers


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN, bias=False)
        self.norm = nn.LayerNorm(IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def test_replace_linears_keeps_dtype_and_grid_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    names = ["0.up", "1.down"]
    records = {
        n: rtn(model.get_submodule(n).weight.detach(), QuantSpec(bits=4), salient_idx=torch.tensor([0, 2]))
        for n in names
    }
    bias = model.get_submodule("0.up").bias.detach().clone()
    model.to(torch.bfloat16)
    replace_linears(model, records, MixedPrecisionLinear.from_quantized)
    assert set(quantized_modules(model)) == set(names)
    up = model.get_submodule("0.up")
    assert isinstance(up, MixedPrecisionLinear) and isinstance(model.get_submodule("0.down"), nn.Linear)
    assert up.weight_q.dtype == up.salient_weight.dtype == torch.bfloat16
    torch.testing.assert_close(up.bias, bias.to(torch.bfloat16))
    model.to(torch.float16)  # later casts follow for compute tensors, never for the grid
    for n, m in quantized_modules(model).items():
        assert m.scales.dtype == torch.float32
        assert_same_grid(m.to_quantized_weight(), records[n])
    assert model(torch.randn(3, IN, dtype=torch.float16)).dtype == torch.float16
    with pytest.raises(TypeError):
        replace_linears(model, {"0.norm": records["0.up"]}, MixedPrecisionLinear.from_quantized)


def test_replace_linears_with_ste_factory() -> None:
    torch.manual_seed(0)
    model = Block()
    qw = rtn(model.up.weight.detach(), QuantSpec(bits=4), salient_idx=torch.tensor([1]))
    replace_linears(model, {"up": qw}, STELinear.from_quantized)
    assert isinstance(model.up, STELinear)
    assert_same_grid(quantized_modules(model)["up"].to_quantized_weight(), qw)


# ---------------------------------------------------------------- packed frozen part


def held_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_layer_holds_bits_over_8_bytes_per_weight(bits: int) -> None:
    qw = hand_record(OUT, IN, K, bits=bits, n_groups=4, seed=30)
    dense = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT))
    packed = PackedMixedPrecisionLinear.from_layer(dense)
    small = held_bytes(dense) - dense.codes.numel() - dense.weight_q.numel() * 4  # grid, salient columns, bias
    words = packed_rows(IN, bits)  # int32 words per output row: bits/8 bytes per weight, padded to whole blocks
    assert held_bytes(packed) == small + OUT * words * 4 and words * 4 <= IN * bits / 8 + 12
    assert not any(t.shape == (OUT, IN) for t in [*packed.parameters(), *packed.buffers()])
    assert torch.equal(packed.codes, qw.codes)
    assert_same_grid(packed.to_quantized_weight(), qw)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_packed_layer_trains_exactly_as_the_dense_one(noise: float, monkeypatch) -> None:
    """Same forward, same gradients (salient columns, scales, inputs) and the same saved-for-backward story, minus
    the dense Ŵ: nothing out × in is kept between forward and backward."""
    import gift_quant.layers as layers

    monkeypatch.setattr(layers, "fresh_seed", lambda: 11)
    qw = hand_record(OUT, IN, K, bits=3, n_groups=4, seed=31)
    dense = MixedPrecisionLinear.from_quantized(qw, torch.randn(OUT), noise=NoiseSpec(scale=noise)).train()
    packed = PackedMixedPrecisionLinear.from_layer(dense)
    x = torch.randn(2, 7, IN)
    grad_out = torch.randn(2, 7, OUT)
    grads = []
    for layer in (dense, packed):
        layer.scales.requires_grad_(noise > 0)  # one case through the scale gradient, one without
        xi = x.clone().requires_grad_()
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(xi)
        y.backward(grad_out)
        grads.append((y.detach(), xi.grad, layer.salient_weight.grad, layer.scales.grad))
        assert (OUT, IN) not in shapes or layer is dense
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=0, atol=ATOL32)
    assert torch.equal(dense.eval()(x), packed.eval()(x))


def test_pack_frozen_swaps_every_quantized_linear_and_keeps_its_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    records = {n: rtn(model.get_submodule(n).weight.detach(), QuantSpec(bits=3), salient_idx=torch.tensor([0, 2]))
               for n in ("0.up", "1.down")}
    replace_linears(model, records, MixedPrecisionLinear.from_quantized)
    model.get_submodule("0.up").salient_weight.requires_grad_(False)
    x = torch.randn(3, IN)
    before = model(x)
    assert pack_frozen(model) == 2 and pack_frozen(model) == 0
    assert all(isinstance(m, PackedMixedPrecisionLinear) for m in quantized_modules(model).values())
    assert not model.get_submodule("0.up").salient_weight.requires_grad
    assert torch.equal(model(x), before)
    for n, m in quantized_modules(model).items():
        assert_same_grid(m.to_quantized_weight(), records[n])


# ---------------------------------------------------------------- measured comparison


def saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.square().sum().backward()
    return total


def test_gradient_memory_mixed_precision_vs_dense() -> None:
    out, inn, k = 256, 512, 8
    g = torch.Generator().manual_seed(18)
    w = torch.randn(out, inn, generator=g)
    qw = rtn(w, QuantSpec(bits=4), salient_idx=torch.arange(k) * 60)
    mp = MixedPrecisionLinear.from_quantized(qw, None).train()
    dense = nn.Linear(inn, out, bias=False)
    x = torch.randn(16, inn, requires_grad=True)  # as for any layer after the first
    mp_saved = saved_bytes(lambda: mp(x))
    dense_saved = saved_bytes(lambda: dense(x))
    grad_bytes = {
        name: sum(p.grad.numel() * p.grad.element_size() for p in m.parameters() if p.grad is not None)
        for name, m in (("mixed", mp), ("dense", dense))
    }
    print(
        f"\nparameter-gradient bytes: mixed-precision {grad_bytes['mixed']} (out×k = {out}×{k}) vs dense "
        f"{grad_bytes['dense']} (out×in = {out}×{inn}); saved-for-backward bytes: {mp_saved} vs {dense_saved}"
    )
    assert grad_bytes["mixed"] == out * k * 4
    assert grad_bytes["dense"] == out * inn * 4


def test_pool_noise_is_a_random_window_of_fixed_draws_and_stays_untouched() -> None:
    from gift_quant.noise import POOL_SIZE, _pool

    pool = _pool("gaussian", torch.device("cpu"), torch.float32)
    before = pool.clone()
    a = draw(torch.Size((OUT, IN)), "gaussian", 12345, torch.device("cpu"), torch.float32, "pool")
    offset = 12345 % (POOL_SIZE - OUT * IN + 1)
    assert torch.equal(a.flatten(), pool[offset: offset + OUT * IN])
    assert not torch.equal(a, draw(torch.Size((OUT, IN)), "gaussian", 999, torch.device("cpu"), torch.float32, "pool"))
    qw = hand_record(OUT, IN, K, bits=3, n_groups=1, seed=40)
    layer = MixedPrecisionLinear.from_quantized(qw, None, noise=NoiseSpec(scale=1.0, source="pool")).train()
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(pool, before)  # the forward and backward never wrote into the pool
    assert abs(pool.mean().item()) < 5 / math.sqrt(POOL_SIZE) and abs(pool.std().item() - 1) < 1e-3
