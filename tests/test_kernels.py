"""The fast paths of PackedLinear against the reference dequantize path and float64.

Weights are built directly as QuantizedWeight records (random codes, scales, zero points, act-order g_idx, salient
columns), independent of the quantizer. Every test runs on both CPU int4 forms: gift_quant's layout and op (where
this CPU has its vector loop) and torch's kernel. torch's kernel computes in bf16, so the oracle is float64 on the
same bf16-rounded activations and scales, within the bf16 output rounding (gift_quant's op, int16 activations and
float32 out, is well inside it: its own bounds are in tests/test_cpu_rows.py); the dense path (many rows) must be the
reference bit for bit. A module whose codes live in the kernel form only (``qweight`` released) must be, for every
reader of its codes, the module that never released them, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gift_quant import cpu_int4, gptq_cuda
from gift_quant.export import export_packed
from gift_quant.hf_quantizer import load_quantized
from gift_quant.packing import PackedLinear, packed_linears, set_kernel
from gift_quant.quantized import QuantizedWeight
from gift_quant.quantizer import QuantSpec

BF16_REL = 2.0**-7  # bf16 output rounding (2^-9) plus fp32 accumulation order, relative to max |y|


@pytest.fixture(autouse=True, params=["gift_quant", "torch"])
def int4_form(request, monkeypatch):
    """Which layout the CPU int4 form takes: gift_quant's (skipped where its op has no vector loop) or torch's."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_int4, "own_layout", lambda: False)
    elif not cpu_int4.own_layout():
        pytest.skip("gift_quant's int4 op has no vector loop on this CPU: linears use torch's kernel")
    return request.param


def record(out_f=128, in_f=256, bits=3, group_size=64, sym=False, act_order=False, k=5, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    width = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // width)
    g_idx = torch.arange(in_f) // width
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    if sym:
        zeros = torch.full((out_f, n_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).float()
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 0.01).half().float()
    salient = torch.randperm(in_f, generator=g)[:k].sort().values
    codes[:, salient] = zeros[:, g_idx[salient]].to(torch.uint8)
    salient_weight = torch.randn(out_f, k, generator=g).half().float()
    return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), salient, salient_weight, bits, group_size, sym)


def reference(m: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    m.kernel = "reference"
    try:
        return m(x)
    finally:
        m.kernel = "auto"


def float64_bf16(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in float64: bf16 activations and scales, exact codes, fp32 salient term."""
    g = qw.g_idx.long()
    scales = qw.scales.bfloat16().double()
    w = scales[:, g] * (qw.codes.double() - qw.zeros.double()[:, g])
    y = x.bfloat16().double() @ w.t()
    y = y + x.double()[..., qw.salient_idx] @ qw.salient_weight.double().t()
    return y if bias is None else y + bias.double()


CASES = {
    "3bit_per_channel_sym": dict(bits=3, group_size=-1, sym=True),
    "3bit_g64_asym": dict(bits=3, group_size=64, sym=False),
    "4bit_g128_asym": dict(bits=4, group_size=128, sym=False),  # zero points far from 8: offset form
    "4bit_g32_sym": dict(bits=4, group_size=32, sym=True),
    "2bit_g64_act_order": dict(bits=2, group_size=64, sym=False, act_order=True),
    "4bit_g128_act_order": dict(bits=4, group_size=128, sym=True, act_order=True),
    "3bit_g512_shared": dict(in_f=1024, bits=3, group_size=512, sym=False),  # kernel groups of 256 share a scale
    "3bit_g64_80_rows": dict(out_f=80, bits=3, group_size=64),  # a partial block of rows in the packed layout
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [1, 7])
def test_int4_kernel_matches_float64(case, rows):
    qw = record(**CASES[case])
    bias = torch.randn(qw.shape[0]) * 0.1
    m = PackedLinear.from_quantized(qw, bias, dtype=torch.float32)
    assert m.prepare() == "int4_cpu"
    x = torch.randn(2, rows, qw.shape[1])
    y = m(x)
    want = float64_bf16(qw, x, bias)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert (y.double() - want).abs().max() <= BF16_REL * want.abs().max()
    # And against the reference path in float32 (which also rounds nothing to bf16): same bound.
    ref = reference(m, x)
    assert (y - ref).abs().max() <= BF16_REL * ref.abs().max()


@pytest.mark.parametrize("case", ["3bit_per_channel_sym", "4bit_g128_act_order"])
def test_bf16_decode_rows_match_float64(case):
    """The deployment dtype: bf16 activations, one row (a decode step). The salient term is computed in float32 from
    the stored fp16 values, so the only roundings left are the kernel's and the bf16 outputs'."""
    qw = record(**CASES[case], k=24)
    m = PackedLinear.from_quantized(qw, None, dtype=torch.bfloat16)
    x = torch.randn(1, 1, qw.shape[1]).bfloat16()
    y = m(x)
    want = float64_bf16(qw, x, None)
    assert m.kernel_used == "int4_cpu" and y.dtype == torch.bfloat16
    assert (y.double() - want).abs().max() <= BF16_REL * want.abs().max()


def test_offset_form_is_used_only_when_shifted_codes_do_not_fit():
    shifted = cpu_int4.build(*(lambda r: (r.codes, r.scales, r.zeros, r.g_idx))(record(bits=3, group_size=64)))
    offset = cpu_int4.build(*(lambda r: (r.codes, r.scales, r.zeros, r.g_idx))(record(bits=4, group_size=128)))
    assert shifted.offset is None and offset.offset is not None
    # Salient columns (code == zero point) dequantize to exactly 0 with shifted codes.
    qw = record(bits=3, group_size=64)
    w = cpu_int4.dequantize(cpu_int4.build(qw.codes, qw.scales, qw.zeros, qw.g_idx), qw.shape[1])
    assert torch.all(w[:, qw.salient_idx] == 0)


@pytest.mark.parametrize("case", ["3bit_per_channel_sym", "3bit_g64_asym", "4bit_g32_sym", "3bit_g64_80_rows"])
def test_many_rows_take_the_dense_path_bit_for_bit(case):
    qw = record(**CASES[case])
    m = PackedLinear.from_quantized(qw, torch.randn(qw.shape[0]), dtype=torch.float32)
    m.prepare()
    x = torch.randn(1, cpu_int4.DENSE_ROWS + 1, qw.shape[1])
    assert torch.equal(m(x), reference(m, x))


def test_act_order_dense_path_is_the_reference_up_to_summation_order():
    qw = record(**CASES["2bit_g64_act_order"])
    m = PackedLinear.from_quantized(qw, dtype=torch.float32)
    x = torch.randn(3, cpu_int4.DENSE_ROWS, qw.shape[1])
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-5, atol=1e-5)


def test_torch_still_has_the_int4_ops():
    """The CPU path rests on two private ATen ops (torch >= 2.6, pyproject's lower bound): fail loudly, not just
    fall back, if an installed torch drops or renames them."""
    missing = [op for op in cpu_int4.OPS if not hasattr(torch.ops.aten, op)]
    assert not missing, f"torch {torch.__version__} has no {missing}: the int4 CPU kernel would never run"


def test_gift_quant_s_layout_reads_back():
    q = torch.randint(0, 16, (48, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = cpu_int4.pack_rows16(q)
    assert packed.shape == (3, 12, 16, 4) and packed.dtype == torch.uint8
    assert int(packed[1, 2, 3, 1]) == int(q[19, 17]) | int(q[19, 21]) << 4  # row 16 + 3, columns 8·2 + 1 and + 4
    assert torch.equal(cpu_int4.unpack_rows16(packed), q)


def test_each_form_is_the_one_asked_for(int4_form):
    m = PackedLinear.from_quantized(record(), dtype=torch.float32)
    assert m.prepare() == "int4_cpu" and m._fast[1].rows16 == (int4_form == "gift_quant")


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 112, 192, 576, 1552])
def test_layout_reads_back_any_row_count(rows):
    """The probed layout unpacks what torch packed, for full and partial blocks of any CPU's block size."""
    runs = cpu_int4.layout(rows)
    assert runs is not None
    q = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    assert torch.equal(cpu_int4._unpack(cpu_int4._pack(q), 96, runs), q)


@pytest.mark.parametrize("broken", ["unreadable", "wrong"])
def test_a_layout_that_does_not_read_back_is_refused(monkeypatch, broken):
    monkeypatch.setattr(cpu_int4, "own_layout", lambda: False)  # torch's layout is the one probed
    qw = record(bits=3, group_size=64)
    real = cpu_int4.layout(qw.shape[0])
    swapped = tuple(cpu_int4.Run(r.start, r.count, r.rows, r.hi, r.lo) for r in real)  # nibbles the other way
    monkeypatch.setattr(cpu_int4, "layout", lambda n: None if broken == "unreadable" else swapped)
    m = PackedLinear.from_quantized(qw, dtype=torch.float32)
    assert "could not be read back" in m.prepare()
    x = torch.randn(cpu_int4.DENSE_ROWS + 1, qw.shape[1])
    want = F.linear(x, qw.quantized_part()) + F.linear(x[:, qw.salient_idx], qw.salient_weight)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings,reason", [
    (dict(bits=3, group_size=16), "kernel groups"),
    (dict(bits=8, group_size=-1), "8-bit"),
    (dict(out_f=40, bits=4, group_size=-1), "multiple of 16"),
])
def test_unsupported_linears_run_the_reference_and_say_why(settings, reason):
    qw = record(**settings)
    m = PackedLinear.from_quantized(qw, dtype=torch.float32)
    assert reason in m.prepare()
    x = torch.randn(2, qw.shape[1])
    want = F.linear(x, qw.quantized_part()) + F.linear(x[:, qw.salient_idx], qw.salient_weight)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-5)


def test_autograd_and_float64_take_the_reference_path():
    qw = record()
    m = PackedLinear.from_quantized(qw, dtype=torch.float32)
    x = torch.randn(2, qw.shape[1], requires_grad=True)
    y = m(x)
    assert torch.equal(y, reference(m, x.detach()))
    y.sum().backward()
    w = qw.dequantize()
    torch.testing.assert_close(x.grad, w.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    x64 = torch.randn(2, qw.shape[1], dtype=torch.float64)
    assert m(x64).dtype == torch.float64


def test_fast_form_follows_the_buffers():
    a, b = record(seed=0), record(seed=1)
    m = PackedLinear.from_quantized(a, dtype=torch.float32)
    x = torch.randn(1, a.shape[1])
    first = m(x)
    m.load_state_dict(PackedLinear.from_quantized(b, dtype=torch.float32).state_dict())
    second = m(x)
    assert not torch.allclose(first, second)
    want = float64_bf16(b, x, None)
    assert (second.double() - want).abs().max() <= BF16_REL * want.abs().max()


def test_set_kernel_counts_paths_and_rejects_unknown_names():
    model = torch.nn.Sequential(PackedLinear.from_quantized(record(), dtype=torch.float32),
                                PackedLinear.from_quantized(record(group_size=16), dtype=torch.float32))
    assert set_kernel(model) == {"int4_cpu": 1, "groups of 256 columns cannot be cut into kernel groups of "
                                                f"{cpu_int4.KERNEL_GROUPS}": 1}
    assert set_kernel(model, "reference") == {"reference (requested)": 2}
    with pytest.raises(ValueError, match="kernel"):
        set_kernel(model, "marlin")


def test_gptq_zero_points_v2_hold_the_zero_points():
    from gift_quant.bitpack import pack_zeros, unpack_zeros

    qw = record(bits=4, group_size=64)
    v1 = pack_zeros(qw.zeros, 4)
    v2 = gptq_cuda.pack_zeros_v2(qw.zeros, 4)
    assert torch.equal(unpack_zeros(v1, 4, qw.shape[0]), qw.zeros)
    nibbles = (v2.unsqueeze(2) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15  # GPTQ v2: the zeros themselves
    assert torch.equal(nibbles.reshape(v2.shape[0], -1).t().float(), qw.zeros)


# ---------------------------------------------------------------- the codes resident once (qweight released)


def held_bytes(m: PackedLinear) -> int:
    """Bytes of the distinct storages the module holds: its buffers and the tensors of its fast form."""
    fast = vars(m._fast[1]) if m._fast[1] is not None else {}
    tensors = [*m.buffers(), *(v for v in fast.values() if isinstance(v, torch.Tensor))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_form_holds_the_only_copy_of_the_codes(case):
    qw = record(**CASES[case])
    m = PackedLinear.from_quantized(qw, torch.randn(qw.shape[0]), dtype=torch.float32)
    twin = PackedLinear.from_quantized(qw, m.bias, dtype=torch.float32)  # never builds a fast form
    twin.kernel = "reference"
    state = {k: v.clone() for k, v in m.state_dict().items()}
    buffers = held_bytes(m)  # no fast form yet
    assert m.prepare() == "int4_cpu"
    fast = m._fast[1]
    fast_bytes = sum(t.untyped_storage().nbytes() for t in vars(fast).values() if isinstance(t, torch.Tensor))
    assert m.qweight.numel() == 0 and m.qweight.untyped_storage().nbytes() == 0
    assert held_bytes(m) == buffers - state["qweight"].nbytes + fast_bytes
    assert fast.packed.nbytes == qw.codes.numel() // 2  # the codes once, half a byte each
    # Every reader of the codes reads them back exactly.
    saved = m.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    assert saved["qweight"].dtype == torch.int32 and torch.equal(m.codes(), qw.codes)
    back = m.to_quantized_weight()
    assert back.codes.dtype == twin.to_quantized_weight().codes.dtype and torch.equal(back.codes, qw.codes)
    m.check()
    # The reference path (float64, autograd) reads them from the kernel form: the never-released twin's output.
    x = torch.randn(3, qw.shape[1], dtype=torch.float64)
    assert torch.equal(m(x), twin(x))
    xg = torch.randn(3, qw.shape[1], requires_grad=True)
    assert torch.equal(m(xg), twin(xg))
    assert m.qweight.numel() == 0 and m._fast[1] is fast  # none of this rebuilt the form or restored qweight


def test_released_codes_follow_casts_moves_and_loads():
    qw, other = record(**CASES["2bit_g64_act_order"]), record(**CASES["2bit_g64_act_order"], seed=1)
    m = PackedLinear.from_quantized(qw, torch.randn(qw.shape[0]), dtype=torch.float32)
    qweight = m.qweight.clone()
    m.prepare()
    fast = m._fast[1]
    m.to(torch.bfloat16).cpu().float()  # no device change: the form and the release stay
    assert m._fast[1] is fast and m.qweight.numel() == 0
    moved = copy.deepcopy(m).to("meta")  # a move takes the checkpoint tensor along
    assert moved.qweight.device.type == "meta" and moved.qweight.shape == qweight.shape and moved._fast[1] is None
    assert m.qweight.numel() == 0 and torch.equal(m.state_dict()["qweight"], qweight)  # the copy kept its own
    m.load_state_dict(PackedLinear.from_quantized(other, m.bias, dtype=torch.float32).state_dict())  # into a release
    assert torch.equal(m.codes(), other.codes)
    m.prepare()
    assert m.qweight.numel() == 0 and torch.equal(m.codes(), other.codes)
    m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "qweight"}, strict=False)  # keeps the codes
    assert torch.equal(m.codes(), other.codes)
    m.kernel = "reference"  # a rebuild without a kernel form restores qweight first
    assert "reference" in m.prepare() and torch.equal(m.codes(), other.codes) and m.qweight.numel() > 0


def test_a_loaded_export_holds_its_codes_once_and_exports_them_bit_for_bit(tmp_path):
    from test_export import ids, logits, quantize, read_tensors, tiny_llama

    # Groups of 32 fit the int4 kernel; down_proj's 80 columns take groups of 16, which run the reference path.
    spec_of = lambda name: QuantSpec(bits=3, group_size=16 if "down" in name else 32, sym=False)  # noqa: E731
    export_packed(quantize(tiny_llama(), spec_of=spec_of), None, tmp_path / "a", quant_info={})
    loaded = load_quantized(tmp_path / "a", dtype=torch.float32)  # auto: the int4 kernel where it fits
    linears = packed_linears(loaded)
    released = {n for n, m in linears.items() if m.qweight.numel() == 0}
    assert released == {n for n, m in linears.items() if m.kernel_used == "int4_cpu"} and len(released) == 12
    export_packed(loaded, None, tmp_path / "b", quant_info=loaded.gift_quant_config)
    first, second = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = load_quantized(tmp_path / "b", dtype=torch.float32)
    x = ids()
    assert torch.equal(logits(again, x), logits(loaded, x))
    # In float64 every linear takes the reference path, from the kernel form's codes where they were released.
    reference = load_quantized(tmp_path / "a", dtype=torch.float32, kernel="reference").to(torch.float64)
    assert torch.equal(logits(loaded.to(torch.float64), x), logits(reference, x))
    assert {n for n, m in linears.items() if m.qweight.numel() == 0} == released  # the cast kept them released


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["4bit_g128_act_order", "3bit_g64_asym"])
def test_cuda_gptq_kernel_matches_reference(case, dtype):
    reason = gptq_cuda.unavailable("cuda")
    if reason is not None:
        pytest.skip(f"GPU path: {reason}")
    qw = record(**CASES[case])
    m = PackedLinear.from_quantized(qw, dtype=dtype).to("cuda")
    assert m.prepare() == "gptq_cuda"  # no dtype on the reference path, no build failure
    x = torch.randn(4, qw.shape[1], device="cuda", dtype=dtype)
    ref = reference(m, x).float()
    assert (m(x).float() - ref).abs().max() <= gptq_cuda.PROBE_RTOL * ref.abs().max()
