"""GPTQ against the plain column-by-column float64 reference and against closed forms."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from gift_quant.gptq import GPTQ
from gift_quant.quantizer import QuantSpec, rtn
from tools.reference_gptq import hessian, reference_gptq

ROWS, COLS, TOKENS = 12, 64, 320
SALIENT = torch.tensor([3, 17, 18, 40, 63])
DEAD = 5  # an input channel that is always zero


def correlated_inputs(seed: int = 0, tokens: int = TOKENS, cols: int = COLS) -> torch.Tensor:
    """Tokens with correlated channels of very different scales (what makes GPTQ beat RTN)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 3 + 0.2)
    x[:, DEAD] = 0
    return x


def layer(seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def calibrated(x: torch.Tensor) -> GPTQ:
    gptq = GPTQ(x.shape[-1])
    gptq.add_batch(x[:100].reshape(4, 25, -1))  # (batch, seq, in) like a real layer input
    gptq.add_batch(x[100:])
    return gptq


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((w.double() - w_hat.double()) @ x.double().T).norm().item()


def test_hessian_accumulation_matches_float64() -> None:
    x = correlated_inputs()
    gptq = calibrated(x)
    assert gptq.nsamples == TOKENS
    assert torch.allclose(gptq.H.double(), hessian(x), rtol=1e-5, atol=1e-5)


CONFIGS = [
    (gs, act, static, sal, bs)
    for gs, act, static, sal, bs in itertools.product([-1, 16], [False, True], [False, True], [False, True], [7, 128])
    if not (gs == -1 and static)
]


@pytest.mark.parametrize("group_size,act_order,static_groups,salient,block_size", CONFIGS)
def test_matches_reference_float64(group_size, act_order, static_groups, salient, block_size) -> None:
    """Lazy blocks + Cholesky give exactly the codes of the column-by-column OBS reference (float64)."""
    x, w = correlated_inputs(), layer()
    sal = SALIENT if salient else None
    spec = QuantSpec(bits=3, group_size=group_size, sym=False)
    gptq = calibrated(x)
    H = gptq.H.clone()
    res = gptq.quantize(w, spec, sal, block_size=block_size, act_order=act_order, static_groups=static_groups)
    ref = reference_gptq(w, H, spec, sal, act_order=act_order, static_groups=static_groups)
    qw = res.weight
    assert torch.equal(qw.codes.long(), ref.codes)
    assert torch.equal(qw.g_idx.long(), ref.g_idx)
    assert torch.allclose(qw.scales.double(), ref.scales, rtol=1e-6) and torch.equal(qw.zeros.double(), ref.zeros)
    assert torch.equal(qw.salient_idx, ref.salient_idx)
    assert torch.allclose(qw.salient_weight.double(), ref.salient_weight, rtol=1e-6, atol=1e-6)
    assert torch.allclose(qw.dequantize().double(), ref.weight, rtol=1e-6, atol=1e-6)
    assert res.loss == pytest.approx(ref.loss, rel=1e-9)
    assert res.damp == 0.01


@pytest.mark.parametrize("sym,act_order", [(True, False), (True, True)])
def test_matches_reference_with_mse_clip(sym: bool, act_order: bool) -> None:
    x, w = correlated_inputs(2), layer(3)
    spec = QuantSpec(bits=4, group_size=32, sym=sym, mse=True)
    gptq = calibrated(x)
    H = gptq.H.clone()
    res = gptq.quantize(w, spec, SALIENT, block_size=10, act_order=act_order)
    ref = reference_gptq(w, H, spec, SALIENT, act_order=act_order)
    assert torch.equal(res.weight.codes.long(), ref.codes)
    assert res.loss == pytest.approx(ref.loss, rel=1e-9)


TIE = 1e-3  # code units: how close to a rounding tie float32's error (vs float64) can move a decision here


def assert_flips_only_at_ties(codes: torch.Tensor, ref) -> None:
    """Rows are independent GPTQ runs; a row may leave the float64 reference's path only at a decision the
    reference itself finds within TIE of a tie (after that its later columns compensate differently)."""
    differs = codes.long()[:, ref.order] != ref.codes[:, ref.order]
    for row in differs.nonzero()[:, 0].unique().tolist():
        first = ref.order[differs[row].nonzero()[0, 0]]
        assert ref.margin[row, first] < TIE, f"row {row} column {first}: margin {ref.margin[row, first]:.3g}"


@pytest.mark.parametrize("seed", range(4))
def test_float32_close_to_reference(seed: int) -> None:
    """In float32 a near-tie may round the other way (which one depends on the CPU's kernels): codes may then differ
    from the float64 reference from that column on, but only from a tie, and the output error stays as low."""
    x, w = correlated_inputs(4 + 10 * seed), layer(5 + 10 * seed, torch.float32)
    spec = QuantSpec(bits=4, group_size=16)
    gptq = calibrated(x)
    H = gptq.H.clone()
    res = gptq.quantize(w, spec, SALIENT, act_order=True)
    ref = reference_gptq(w, H, spec, SALIENT, act_order=True)
    assert res.weight.scales.dtype == torch.float32
    assert_flips_only_at_ties(res.weight.codes, ref)
    ours, theirs = output_error(w, res.weight.dequantize(), x), output_error(w, ref.weight, x)
    if torch.equal(res.weight.codes.long(), ref.codes):
        assert ours == pytest.approx(theirs, rel=1e-3)
    else:  # another path of equally good roundings: no worse than the reference, within a few percent
        assert ours <= 1.05 * theirs


@pytest.mark.parametrize("bits,group_size,salient", [(3, -1, False), (3, 16, True), (4, -1, True), (2, 32, False)])
def test_beats_rtn_on_correlated_inputs(bits: int, group_size: int, salient: bool) -> None:
    x, w = correlated_inputs(6), layer(7, torch.float32)
    sal = SALIENT if salient else None
    spec = QuantSpec(bits=bits, group_size=group_size)
    gptq = calibrated(x)
    res = gptq.quantize(w, spec, sal, act_order=True)
    assert output_error(w, res.weight.dequantize(), x) < 0.9 * output_error(w, rtn(w, spec, sal).dequantize(), x)


def test_salient_columns_absorb_optimal_compensation() -> None:
    """Salient columns get no codes; their values are argmin_{W_s} tr(E H Eᵀ) given the quantized part (closed form)."""
    x, w = correlated_inputs(8), layer(9)
    spec = QuantSpec(bits=3, group_size=16)
    gptq = calibrated(x)
    H = gptq.H.double().clone()
    res = gptq.quantize(w, spec, SALIENT, block_size=8, act_order=True)
    qw = res.weight
    g = qw.g_idx.long()
    assert torch.equal(qw.codes[:, SALIENT].float(), qw.zeros[:, g[SALIENT]])
    assert (qw.quantized_part()[:, SALIENT] == 0).all()
    assert ((qw.salient_weight.double() - w[:, SALIENT]).abs() > 1e-4).float().mean() > 0.9

    H[DEAD, DEAD] = 1  # same dead-column convention and damping as GPTQ
    Hd = H + res.damp * H.diagonal().mean() * torch.eye(COLS, dtype=torch.float64)
    keep = torch.tensor([j for j in range(COLS) if j not in SALIENT.tolist()])
    w0 = w.clone()
    w0[:, DEAD] = 0
    e_keep = w0[:, keep] - qw.quantized_part(torch.float64)[:, keep]
    optimal = w0[:, SALIENT] + e_keep @ Hd[keep][:, SALIENT] @ torch.linalg.inv(Hd[SALIENT][:, SALIENT])
    assert torch.allclose(qw.salient_weight.double(), optimal, rtol=1e-5, atol=1e-6)
    # The reported loss is the sum of OBS errors = ½ tr(E H_damped Eᵀ) of the final weight.
    e = w0 - qw.dequantize(torch.float64)
    assert res.loss == pytest.approx(0.5 * torch.trace(e @ Hd @ e.T).item(), rel=1e-6)


def test_dead_column_is_zero_and_caller_weight_untouched() -> None:
    x, w = correlated_inputs(), layer(dtype=torch.float32)
    before = w.clone()
    res = calibrated(x).quantize(w, QuantSpec(bits=4))
    assert torch.equal(w, before)
    assert (res.weight.dequantize()[:, DEAD] == 0).all()


def test_non_positive_definite_hessian_raises_damping(caplog) -> None:
    g = torch.Generator().manual_seed(10)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    eig = torch.linspace(-0.3, 2.0, 16)  # indefinite, mean eigenvalue (= mean diag) 0.85
    gptq = GPTQ(16)
    gptq.H = basis @ torch.diag(eig) @ basis.T
    w = torch.randn(8, 16, generator=g)
    with caplog.at_level(logging.WARNING, logger="gift_quant.gptq"):
        res = gptq.quantize(w, QuantSpec(bits=4), percdamp=0.01)
    assert res.damp > 0.3 / 0.85  # the smallest damping that makes H + damp·mean(diag)·I positive definite
    assert "not positive definite" in caplog.text
    assert int(res.weight.codes.max()) <= 15 and torch.isfinite(res.weight.dequantize()).all()


def test_hessian_is_freed_and_inputs_validated() -> None:
    gptq = calibrated(correlated_inputs())
    with pytest.raises(ValueError, match="does not divide"):
        gptq.quantize(layer(), QuantSpec(group_size=24))
    with pytest.raises(ValueError, match="last dim"):
        gptq.add_batch(torch.randn(3, COLS + 1))
    res = gptq.quantize(layer(), QuantSpec())
    assert gptq.H is None and res.seconds >= 0
    with pytest.raises(RuntimeError, match="freed"):
        gptq.quantize(layer(), QuantSpec())
    with pytest.raises(RuntimeError, match="freed"):
        gptq.add_batch(torch.randn(3, COLS))
    with pytest.raises(RuntimeError, match="add_batch"):
        GPTQ(COLS).quantize(layer(), QuantSpec())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_weight_device() -> None:
    x, w = correlated_inputs(), layer(dtype=torch.float32)
    gptq = GPTQ(COLS, device="cuda")
    gptq.add_batch(x.cuda())
    H = gptq.H.cpu().clone()
    res = gptq.quantize(w.cuda(), QuantSpec(bits=4, group_size=16), SALIENT.cuda(), act_order=True)
    assert res.weight.codes.is_cuda
    ref = reference_gptq(w, H, QuantSpec(bits=4, group_size=16), SALIENT, act_order=True)
    assert_flips_only_at_ties(res.weight.codes.cpu(), ref)  # the GPU's float32 rounds differently, as other CPUs do
    assert output_error(w, res.weight.dequantize().cpu(), x) <= 1.05 * output_error(w, ref.weight, x)
