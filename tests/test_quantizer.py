"""Uniform quantizer against closed forms and brute-force float64 references."""

from __future__ import annotations

import itertools

import pytest
import torch

from gift_quant.quantizer import QuantSpec, dequantize, fake_quant, find_params, quantize, rtn


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w[:, ::7] *= 6  # outliers make clipping worthwhile
    return w


def minmax_reference(row: list[float], bits: int, sym: bool) -> tuple[float, float]:
    """GPTQ's min-max scale / zero of one row, written out in plain Python."""
    maxq = 2**bits - 1
    lo, hi = min(min(row), 0.0), max(max(row), 0.0)
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    scale = (hi - lo) / maxq
    zero = (maxq + 1) / 2 if sym else float(round(-lo / scale))
    return scale, zero


def mse_reference(row: list[float], spec: QuantSpec) -> tuple[float, float]:
    """Brute-force clip search for one row: first shrink factor with the smallest sum |w - q(w)|^norm."""
    maxq = spec.maxq
    lo0, hi0 = min(min(row), 0.0), max(max(row), 0.0)
    if spec.sym:
        hi0 = max(-lo0, hi0)
        lo0 = -hi0
    best, best_params = float("inf"), None
    for i in range(int(spec.max_shrink * spec.grid)):
        p = 1 - i / spec.grid
        lo, hi = p * lo0, p * hi0
        scale = (hi - lo) / maxq
        zero = (maxq + 1) / 2 if spec.sym else float(round(-lo / scale))
        err = 0.0
        for v in row:
            code = min(max(round(v / scale) + zero, 0), maxq)
            err += abs(v - scale * (code - zero)) ** spec.norm
        if err < best:
            best, best_params = err, (scale, zero)
    return best_params


@pytest.mark.parametrize("bits,sym", list(itertools.product([2, 3, 4, 8], [True, False])))
def test_minmax_params_match_closed_form(bits: int, sym: bool) -> None:
    w = heavy_tailed(6, 20)
    w[2] = 0  # all-zero row takes the guard range
    w[3] = w[3].abs()  # all-positive row
    spec = QuantSpec(bits=bits, sym=sym)
    scale, zero = find_params(w, spec)
    assert scale.shape == zero.shape == (6, 1)
    for r in range(6):
        ref_scale, ref_zero = minmax_reference(w[r].tolist(), bits, sym)
        assert scale[r, 0].item() == pytest.approx(ref_scale, rel=1e-12)
        assert zero[r, 0].item() == ref_zero


@pytest.mark.parametrize("bits,sym,group_size", list(itertools.product([2, 3, 4, 8], [True, False], [-1, 8])))
def test_codes_in_range_and_error_at_most_half_step(bits: int, sym: bool, group_size: int) -> None:
    w = heavy_tailed(8, 32).float()
    qw = rtn(w, QuantSpec(bits=bits, sym=sym, group_size=group_size))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    assert torch.equal(qw.zeros, qw.zeros.round()) and int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 2**bits - 1
    # min-max ranges cover every value, so rounding is the only error: at most half a step
    err = (w - qw.dequantize()).abs()
    float32_slack = 4 * torch.finfo(torch.float32).eps * w.abs()  # the maximum sits exactly on a half step
    assert (err <= qw.step_per_weight() / 2 + float32_slack).all()


def test_mse_clip_error_bounds() -> None:
    """With clipping, in-range values are within Δ/2; clipped ones land exactly on the range edge."""
    w = heavy_tailed(8, 64)
    spec = QuantSpec(bits=3, sym=False, mse=True)
    scale, zero = find_params(w, spec)
    codes = quantize(w, scale, zero, spec.maxq)
    deq = dequantize(codes, scale, zero)
    pos = w / scale + zero
    inside = (pos >= -0.5) & (pos <= spec.maxq + 0.5)
    assert (~inside).any(), "the test needs some clipped values"
    assert ((w - deq).abs()[inside] <= (scale.expand_as(w) / 2 * (1 + 1e-9))[inside]).all()
    edge = torch.where(pos < 0, 0.0, float(spec.maxq))
    assert torch.equal(codes[~inside], edge[~inside])


@pytest.mark.parametrize("sym,norm", [(True, 2.4), (False, 2.4), (True, 2.0)])
def test_mse_search_matches_brute_force_and_never_loses(sym: bool, norm: float) -> None:
    w = heavy_tailed(5, 24, seed=1)
    spec = QuantSpec(bits=3, sym=sym, mse=True, norm=norm)
    scale, zero = find_params(w, spec)
    for r in range(5):
        ref_scale, ref_zero = mse_reference(w[r].tolist(), spec)
        assert scale[r, 0].item() == pytest.approx(ref_scale, rel=1e-12)
        assert zero[r, 0].item() == ref_zero

    def objective(s, z):
        return (fake_quant(w, s, z, spec.maxq) - w).abs().pow(norm).sum(1)

    s0, z0 = find_params(w, QuantSpec(bits=3, sym=sym, norm=norm))
    assert (objective(scale, zero) <= objective(s0, z0) + 1e-12).all()
    assert (objective(scale, zero) < objective(s0, z0)).any()


def test_groups_equal_per_channel_on_each_slice() -> None:
    w = heavy_tailed(4, 48).float()
    spec = QuantSpec(bits=4, group_size=16, sym=False)
    qw = rtn(w, spec)
    assert qw.scales.shape == (4, 3)
    assert torch.equal(qw.g_idx, torch.arange(48, dtype=torch.int32) // 16)
    per_channel = QuantSpec(bits=4, sym=False)
    for g in range(3):
        part = rtn(w[:, 16 * g : 16 * (g + 1)], per_channel)
        assert torch.equal(qw.codes[:, 16 * g : 16 * (g + 1)], part.codes)
        assert torch.equal(qw.scales[:, g : g + 1], part.scales)


@pytest.mark.parametrize("group_size,mse", [(-1, False), (8, False), (8, True)])
def test_salient_columns_excluded(group_size: int, mse: bool) -> None:
    w = heavy_tailed(6, 32).float()
    sal = torch.tensor([1, 9, 10, 30])
    spec = QuantSpec(bits=3, group_size=group_size, sym=False, mse=mse)
    qw = rtn(w, spec, sal)
    g = qw.g_idx.long()
    assert torch.equal(qw.salient_idx, sal)
    assert torch.equal(qw.codes[:, sal].float(), qw.zeros[:, g[sal]])
    assert (qw.quantized_part()[:, sal] == 0).all()
    assert torch.equal(qw.salient_weight, w[:, sal])
    assert torch.equal(qw.dequantize()[:, sal], w[:, sal])
    # Scales ignore salient columns: huge values there change nothing ...
    w_big = w.clone()
    w_big[:, sal] = 1e3
    big = rtn(w_big, spec, sal)
    assert torch.equal(big.scales, qw.scales) and torch.equal(big.zeros, qw.zeros)
    # ... and they equal each group's params computed on its non-salient columns alone.
    width = 32 if group_size == -1 else group_size
    for grp in range(32 // width):
        cols = [j for j in range(grp * width, (grp + 1) * width) if j not in sal.tolist()]
        s, z = find_params(w[:, cols], spec)
        assert torch.allclose(qw.scales[:, grp : grp + 1], s) and torch.equal(qw.zeros[:, grp : grp + 1], z)


def test_bad_specs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="does not divide in_features=30"):
        rtn(torch.randn(4, 30), QuantSpec(group_size=16))
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match="salient"):
        rtn(torch.randn(4, 8), QuantSpec(), torch.tensor([8]))


def test_empty_input_gets_guard_range() -> None:
    for sym in (True, False):
        spec = QuantSpec(bits=4, sym=sym)
        scale, zero = find_params(torch.empty(3, 0), spec)
        assert torch.allclose(scale, torch.full((3, 1), 2 / 15))
        assert [torch.equal(a, b) for a, b in zip((scale, zero), find_params(torch.zeros(3, 5), spec))] == [True, True]


def test_low_precision_input_is_computed_in_float32() -> None:
    w = heavy_tailed(4, 16).to(torch.bfloat16)
    qw = rtn(w, QuantSpec(bits=4))
    ref = rtn(w.float(), QuantSpec(bits=4))
    assert qw.scales.dtype == torch.float32 and torch.equal(qw.codes, ref.codes)
