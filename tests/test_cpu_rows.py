"""gift_quant's few-row ops: the lm_head's int8 and int4 (csrc/head_rows.cpp) and the packed linears' int4 in
gift_quant's own layout (csrc/linear_rows.cpp), built by gift_quant/cpu_rows.py.

Oracles: the op's arithmetic written out in torch float32 (``reference`` below: each step rounded once) must be
matched bit for bit — also under other CPUs' ATen kernels (`make test` reruns this file with them), since the op's
sums are exact integers plus a fixed order of float32 steps — and float64 products within the closed-form bound of
int16 activations (the head's own bound: tests/test_embedding.py).
"""

from __future__ import annotations

import logging

import pytest
import torch

from gift_quant import cpu_rows
from gift_quant.embedding import pack_nibbles, unpack_nibbles


BLOCK, INT16_MAX = 64, 32767.0  # the source's kBlock and kMax


def int16_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ops' activations: x rounded to int16 per block of ``block`` columns (zero-padded to whole blocks), as int64
    (rows, blocks, block), and each block's float32 step (rows, blocks)."""
    x = x.float()
    rows, k = x.shape
    blocks = -(-k // block)
    xb = torch.nn.functional.pad(x, (0, blocks * block - k)).view(rows, blocks, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, INT16_MAX).div(amax)  # a division, as in C++ (not 1/amax·c)
    usable = (amax > 0) & inv.isfinite()  # a block below ~1e-34 counts as zeros, as in C++
    inv = torch.where(usable, inv, 0.0)
    q = torch.round(xb * inv).clamp(-INT16_MAX, INT16_MAX).to(torch.int64)
    return q, torch.where(usable, amax / INT16_MAX, 0.0).squeeze(-1)


def padded_blocks(codes: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """Integer codes (N, K) as int64 (N, blocks, block), zero-padded like the activations."""
    return torch.nn.functional.pad(codes.to(torch.int64), (0, blocks * block - codes.shape[1])).view(-1, blocks, block)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The op's arithmetic written out in torch, step by step in float32 (each op rounded once, no FMA): what the op
    must give bit for bit, for finite x."""
    q, step = int16_blocks(x, BLOCK)
    acc = torch.einsum("mbj,nbj->mnb", q, padded_blocks(qweight, q.shape[1], BLOCK))  # exact integers
    total = torch.zeros(x.shape[0], qweight.shape[0], dtype=torch.float32)
    for b in range(q.shape[1]):
        total = total + acc[:, :, b].float() * step[:, b : b + 1]
    return total * scales.float().view(1, -1)


def reference4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The int4 op's arithmetic written out in torch float32: int16 activations per weight group, exact integer
    products with the codes, then (sum · step) · scale added group by group."""
    q, step = int16_blocks(x, group)
    codes = padded_blocks(unpack_nibbles(packed, x.shape[1]), q.shape[1], group)
    acc = torch.einsum("mgj,ngj->mng", q, codes)
    total = torch.zeros(x.shape[0], packed.shape[0], dtype=torch.float32)
    for g in range(q.shape[1]):
        total = total + acc[:, :, g].float() * step[:, g : g + 1] * scales[:, g].float()
    return total


def case4(rows: int, k: int, group: int, n: int = 29, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]
    codes = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, -(-k // group), generator=g) * 0.02).half()
    return x, pack_nibbles(codes), scales, codes


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_rows.load() is None  # this project's machines have the C++ compiler Inductor needs


def case(rows: int, k: int, n: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]  # outliers
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, generator=g) * 0.02).half()
    return x, qweight, scales


@pytest.mark.parametrize("k", [1, 63, 64, 65, 576, 1000])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_op_is_its_float32_arithmetic_bit_for_bit(k, rows):
    x, qweight, scales = case(rows, k, seed=k * rows)
    x[0, : min(k, 64)] = 0.0  # an all-zero block: step 0
    y = cpu_rows.rows_mm(x, qweight, scales)
    assert y.dtype == torch.float32 and y.shape == (rows, qweight.shape[0])
    assert torch.equal(y, reference(x, qweight, scales))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_op_takes_any_float_activations_and_a_non_contiguous_weight(dtype):
    x, qweight, scales = case(2, 130)
    x = x.to(dtype)
    wide = torch.cat([qweight, qweight], dim=1)[:, :130]  # a strided view: the op makes it contiguous
    assert torch.equal(cpu_rows.rows_mm(x, wide, scales), reference(x, qweight, scales))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_activation_spreads_over_its_row_only(bad):
    x, qweight, scales = case(3, 100)
    x[1, 70] = bad
    y = cpu_rows.rows_mm(x, qweight, scales)
    dense = x.double() @ (qweight.double() * scales.double()[:, None]).T
    assert torch.equal(y[[0, 2]], reference(x[[0, 2]], qweight, scales))
    assert torch.equal(y[1].isnan(), dense[1].isnan()) and torch.equal(y[1].isinf(), dense[1].isinf())
    assert torch.equal(y[1][y[1].isinf()].sign(), dense[1][dense[1].isinf()].sign().float())


def test_the_op_is_within_half_an_int16_step_of_float64():
    x, qweight, scales = case(4, 300)
    y64 = x.double() @ (qweight.double() * scales.double()[:, None]).T
    blocks = torch.nn.functional.pad(x.double().abs(), (0, 20)).view(4, 5, 64)
    step = (blocks.amax(-1, keepdim=True) / 32767).expand(-1, -1, 64).reshape(4, 320)[:, :300]
    w = qweight.double().abs() * scales.double()[:, None]
    bound = (step / 2) @ w.T + 8 * 2.0**-24 * (x.double().abs() @ w.T)
    assert ((cpu_rows.rows_mm(x, qweight, scales).double() - y64).abs() <= bound).all()


def test_a_failed_build_leaves_torch_s_kernel_and_says_why_once(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_rows, "READY", False)
    monkeypatch.setattr(cpu_rows, "LINEAR_VECTORIZED", False)
    monkeypatch.setattr(cpu_rows, "_tried", None)
    with caplog.at_level(logging.WARNING, logger="gift_quant.cpu_rows"):
        reason = cpu_rows.load()
        assert cpu_rows.load() == reason
    assert reason == ("building head_rows.cpp, linear_rows.cpp failed (RuntimeError: Ninja is required to load C++ "
                      "extensions)")
    assert not cpu_rows.READY and not cpu_rows.LINEAR_VECTORIZED
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()


def test_the_build_is_named_for_the_cpu_and_the_flags(tmp_path, monkeypatch):
    """A build cache shared by two machines (a home directory on a cluster) must not hand an AVX2 CPU an AVX-512
    binary: the name hashes the CPU's flags line (and the compiler flags)."""
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n")
    tags = {cpu_rows._cpu_tag(avx2), cpu_rows._cpu_tag(avx512), cpu_rows._cpu_tag(avx2)}
    monkeypatch.setattr(cpu_rows, "CFLAGS", (*cpu_rows.CFLAGS, "-DNDEBUG"))
    tags.add(cpu_rows._cpu_tag(avx2))
    assert len(tags) == 3 and all(len(t) == 12 for t in tags)


@pytest.mark.parametrize("k,group", [(1, 2), (63, 32), (64, 32), (65, 64), (576, 32), (1000, 128), (300, 4096)])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_int4_op_is_its_float32_arithmetic_bit_for_bit(k, group, rows):
    x, packed, scales, _ = case4(rows, k, group, seed=k + rows)
    x[-1, : min(k, group)] = 0.0  # an all-zero group
    y = cpu_rows.rows_mm4(x, packed, scales, group)
    assert y.dtype == torch.float32 and y.shape == (rows, packed.shape[0])
    assert torch.equal(y, reference4(x, packed, scales, group))


def test_the_int4_op_is_within_half_an_int16_step_of_float64():
    k, group = 300, 32
    x, packed, scales, codes = case4(3, k, group)
    w = (codes.double().view(-1, k) * scales.double().repeat_interleave(group, dim=1)[:, :k])
    y64 = x.double() @ w.T
    blocks = torch.nn.functional.pad(x.double().abs(), (0, 20)).view(3, 10, group)
    step = (blocks.amax(-1, keepdim=True) / 32767).expand(-1, -1, group).reshape(3, 320)[:, :k]
    bound = (step / 2) @ w.abs().T + 12 * 2.0**-24 * (x.double().abs() @ w.abs().T)
    assert ((cpu_rows.rows_mm4(x, packed, scales, group).double() - y64).abs() <= bound).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_spreads_over_its_int4_row_only(bad):
    x, packed, scales, codes = case4(3, 100, 32)
    x[1, 41] = bad
    y = cpu_rows.rows_mm4(x, packed, scales, 32)
    w = codes.double() * scales.double().repeat_interleave(32, dim=1)[:, :100]
    dense = x.double() @ w.T
    assert torch.equal(y[[0, 2]], reference4(x[[0, 2]], packed, scales, 32))
    assert torch.equal(y[1].isnan(), dense[1].isnan()) and torch.equal(y[1].isinf(), dense[1].isinf())


@pytest.mark.parametrize("group", [3, 4098])
def test_the_int4_op_refuses_groups_it_cannot_sum(group):
    x, packed, scales, _ = case4(1, 64, 64)
    with pytest.raises(RuntimeError, match="even group"):
        cpu_rows.rows_mm4(x, packed, scales[:, :1].expand(-1, -(-64 // group)).contiguous(), group)



# ---------------------------------------------------------------- the packed linears' int4 op (gift_quant's layout)


def case_linear(rows: int, k: int, group: int, n: int = 48, seed: int = 0):
    """x with outliers, 4-bit values q (N, K) and torch's kernel's bf16 (K/group, N, 2) scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    scale_offset = torch.stack([torch.rand(k // group, n, generator=g) * 0.02,
                                torch.randn(k // group, n, generator=g) * 0.05], dim=-1).bfloat16()
    return x, q, scale_offset


def dense_linear(q: torch.Tensor, scale_offset: torch.Tensor, group: int) -> torch.Tensor:
    """W = (q − 8)·scale + offset in float64 (N, K)."""
    so = scale_offset.double().repeat_interleave(group, dim=0).transpose(0, 1)  # (N, K, 2)
    return (q.double() - 8) * so[..., 0] + so[..., 1]


def reference_linear(x: torch.Tensor, q: torch.Tensor, scale_offset: torch.Tensor, group: int) -> torch.Tensor:
    """The linear op's arithmetic written out in torch float32: int16 activations per group, Σ (q − 8)·x̂ exactly,
    then per group t = Σ·step, t·scale, acc + t, acc + offset·(Σx̂·step), in that order."""
    xq, step = int16_blocks(x, group)
    qsum = xq.sum(-1)
    dot = torch.einsum("mgj,ngj->mng", xq, padded_blocks(q, xq.shape[1], group)) - 8 * qsum[:, None, :]
    offset_weight = qsum.float() * step
    scale, offset = scale_offset.float().unbind(-1)
    acc = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float32)
    for g in range(xq.shape[1]):
        t = dot[:, :, g].float() * step[:, g : g + 1]
        acc = acc + t * scale[g]
        acc = acc + offset[g] * offset_weight[:, g : g + 1]
    return acc


def packed16(q: torch.Tensor) -> torch.Tensor:
    from gift_quant.cpu_int4 import pack_rows16

    return pack_rows16(q)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("k,group", [(64, 32), (576, 64), (1536, 128), (512, 256), (4096, 4096)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_the_linear_op_is_its_float32_arithmetic_bit_for_bit(k, group, rows, vectorized):
    """Both loops (AVX-512 VNNI where this CPU has it, scalar always) give the transcription's bits, for one row of x
    and for chunks of several."""
    x, q, scale_offset = case_linear(rows, k, group, seed=k + rows)
    x[-1, :group] = 0.0  # an all-zero group: step 0
    y = cpu_rows.linear_mm4(x, packed16(q), scale_offset, group, vectorized)
    assert y.dtype == torch.float32 and y.shape == (rows, q.shape[0])
    assert torch.equal(y, reference_linear(x, q, scale_offset, group))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_linear_op_takes_any_float_activations(dtype):
    x, q, scale_offset = case_linear(2, 256, 64)
    x = x.to(dtype)
    assert torch.equal(cpu_rows.linear_mm4(x, packed16(q), scale_offset, 64), reference_linear(x, q, scale_offset, 64))


def test_the_linear_op_is_within_half_an_int16_step_of_float64():
    k, group = 512, 64
    x, q, scale_offset = case_linear(3, k, group)
    w = dense_linear(q, scale_offset, group)
    step = (x.double().abs().view(3, -1, group).amax(-1, keepdim=True) / 32767).expand(-1, -1, group).reshape(3, k)
    bound = (step / 2) @ w.abs().T + 4 * (k // group) * 2.0**-24 * (x.double().abs() @ w.abs().T)
    y = cpu_rows.linear_mm4(x, packed16(q), scale_offset, group)
    assert ((y.double() - x.double() @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_spreads_over_its_linear_row_only(bad):
    x, q, scale_offset = case_linear(3, 256, 64)
    x[1, 99] = bad
    y = cpu_rows.linear_mm4(x, packed16(q), scale_offset, 64)
    dense = x.double() @ dense_linear(q, scale_offset, 64).T
    assert torch.equal(y[[0, 2]], reference_linear(x[[0, 2]], q, scale_offset, 64))
    assert torch.equal(y[1].isnan(), dense[1].isnan()) and torch.equal(y[1].isinf(), dense[1].isinf())


@pytest.mark.parametrize("group", [12, 8192])
def test_the_linear_op_refuses_groups_it_cannot_sum(group):
    x, q, _ = case_linear(1, 8192, 4096)
    scale_offset = torch.zeros(8192 // group, q.shape[0], 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="group of at most 4096"):
        cpu_rows.linear_mm4(x, packed16(q), scale_offset, group)


def test_the_vector_loop_is_compiled_where_the_cpu_has_avx512_vnni():
    """The bit-for-bit tests above run the AVX-512 VNNI loop exactly where the CPU has it (elsewhere both their
    ``vectorized`` cases run the scalar loop, and the linears keep torch's kernel)."""
    flags = set(next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split())
    assert cpu_rows.LINEAR_VECTORIZED == ({"avx512f", "avx512bw", "avx512_vnni"} <= flags)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_linear_op_splits_rows_over_threads_without_changing_a_bit(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, q, scale_offset = case_linear(3, 576, 64, n=1536)
        y = cpu_rows.linear_mm4(x, packed16(q), scale_offset, 64)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(y, reference_linear(x, q, scale_offset, 64))


def test_blocks_too_small_for_an_int16_step_count_as_zeros():
    """32767 / absmax overflows below ~1e-34: such a block's values round to 0 with step 0 (no Inf times 0), in every
    op, where a normal block beside it is untouched."""
    x, q, scale_offset = case_linear(2, 128, 64)
    x[0, :64] = 1e-36
    y = cpu_rows.linear_mm4(x, packed16(q), scale_offset, 64)
    assert y.isfinite().all() and torch.equal(y, reference_linear(x, q, scale_offset, 64))
    xs = x.clone()
    xs[0, :64] = 0.0
    assert torch.equal(y, cpu_rows.linear_mm4(xs, packed16(q), scale_offset, 64))
    x8, qweight, scales = case(2, 128)
    x8[1, 64:] = -1e-36
    assert torch.equal(cpu_rows.rows_mm(x8, qweight, scales), reference(x8, qweight, scales))


def test_each_op_s_traced_output_has_its_real_output_s_layout():
    """What torch.compile traces (the ops' fake implementations) must match what the ops return: the compiled
    decoder does not check its ops' outputs at run time (Inductor's size asserts are off there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x8, qweight, scales = case(3, 100)
    x4, packed4, scales4, _ = case4(3, 100, 32)
    xl, q, scale_offset = case_linear(3, 256, 64)
    calls = [(cpu_rows.rows_mm, (x8, qweight, scales)), (cpu_rows.rows_mm4, (x4, packed4, scales4, 32)),
             (cpu_rows.linear_mm4, (xl.bfloat16(), packed16(q), scale_offset, 64))]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype), op.__name__
