"""Tests for gift_quant/bitpack.py and packing.py: GPTQ v1 bit layout, round trips, and the packed linear.

References are independent of the code under test: int32 words written out by hand, Python-integer bit streams,
a transcription of GPTQ's row-stepping pack loop, and float64 dense matmuls.
"""

from __future__ import annotations

import pytest
import torch

from gift_quant.layers import MixedPrecisionLinear
from gift_quant.bitpack import pack_codes, pack_zeros, packed_rows, unpack_codes, unpack_zeros
from gift_quant.packing import PackedLinear
from gift_quant.quantized import QuantizedWeight


def as_uint32(words: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in words.flatten().tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Hand-written layouts
# ----------------------------------------------------------------------------------------------------------------


def test_4bit_word_by_hand():
    # One output row, 8 input columns with codes 1..8: code i sits in bits [4i, 4i+4) of the word -> 0x87654321.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    q = pack_codes(codes, 4)
    assert q.dtype == torch.int32 and q.shape == (1, 1)
    assert q.item() == 0x87654321 - 2**32  # the same bits read as a signed int32


def test_2bit_and_8bit_words_by_hand():
    two = torch.tensor([[3] + [0] * 14 + [1]], dtype=torch.uint8)  # 16 codes, 2 bits each
    assert as_uint32(pack_codes(two, 2)) == [0x40000003]
    eight = torch.tensor([[0x11, 0x22, 0x33, 0x44]], dtype=torch.uint8)
    assert as_uint32(pack_codes(eight, 8)) == [0x44332211]


def test_3bit_codes_straddle_words_by_hand():
    # 32 codes, 96 bits, 3 words. Code 10 = 0b101 occupies bits 30, 31, 32: word0 bit 30 and word1 bit 0.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101
    assert as_uint32(pack_codes(codes, 3)) == [0x40000000, 0x00000001, 0x00000000]
    # Code 21 = 0b011 occupies bits 63, 64, 65: word1 bit 31 and word2 bit 0.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 21] = 0b011
    assert as_uint32(pack_codes(codes, 3)) == [0x00000000, 0x80000000, 0x00000001]
    # Code 0 in the low bits of word0, code 31 in the top bits of word2.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 31] = 0b110, 0b111
    assert as_uint32(pack_codes(codes, 3)) == [0x00000006, 0x00000000, 0xE0000000]


def test_qweight_is_packed_along_input_dim_per_output_column():
    # Two outputs, 8 inputs: qweight (1, 2), column o holds output o's codes.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15] * 8], dtype=torch.uint8)
    assert as_uint32(pack_codes(codes, 4)) == [0x87654321, 0xFFFFFFFF]


def test_zeros_v1_convention_by_hand():
    # Symmetric 4-bit: zero point 8 is stored as 7 in each nibble, packed along the output dim.
    zeros = torch.full((8, 1), 8.0)
    qz = pack_zeros(zeros, 4)
    assert qz.shape == (1, 1) and as_uint32(qz) == [0x77777777]
    # Two groups, outputs 0..7 with zero points 1..8 in group 0: stored 0..7.
    zeros = torch.stack([torch.arange(1.0, 9.0), torch.full((8,), 3.0)], dim=1)
    assert as_uint32(pack_zeros(zeros, 4)) == [0x76543210, 0x22222222]


# ----------------------------------------------------------------------------------------------------------------
# Bit streams and GPTQ's own loop as references
# ----------------------------------------------------------------------------------------------------------------


def stream_reference(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """qweight words from Python integers: each block of codes is one little-endian bit stream."""
    out_f, in_f = codes.shape
    per = 32 if bits == 3 else 32 // bits
    words = 3 if bits == 3 else 1
    blocks = -(-in_f // per)
    rows = [[0] * out_f for _ in range(blocks * words)]
    for o in range(out_f):
        for b in range(blocks):
            stream = 0
            for p in range(per):
                j = b * per + p
                if j < in_f:
                    stream |= int(codes[o, j]) << (bits * p)
            for w in range(words):
                rows[b * words + w][o] = (stream >> (32 * w)) & 0xFFFFFFFF
    return rows


def gptq_loop_reference(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """GPTQ's pack loop, transcribed: step through input rows, special-casing the 3-bit word boundaries."""
    intweight = [[int(c) for c in row] for row in codes.t().tolist()]  # (in, out)
    in_f, out_f = len(intweight), len(intweight[0])
    qweight = [[0] * out_f for _ in range(in_f * bits // 32)]
    i = row = 0
    while row < len(qweight):
        for o in range(out_f):
            col = lambda j: intweight[j][o]  # noqa: E731
            if bits in (2, 4, 8):
                for j in range(32 // bits):
                    qweight[row][o] |= col(i + j) << (bits * j)
            else:
                r, k = row, i
                for j in range(10):
                    qweight[r][o] |= col(k + j) << (3 * j)
                k += 10
                qweight[r][o] |= (col(k) << 30) & 0xFFFFFFFF
                r += 1
                qweight[r][o] |= (col(k) >> 2) & 1
                k += 1
                for j in range(10):
                    qweight[r][o] |= col(k + j) << (3 * j + 1)
                k += 10
                qweight[r][o] |= (col(k) << 31) & 0xFFFFFFFF
                r += 1
                qweight[r][o] |= (col(k) >> 1) & 0x3
                k += 1
                for j in range(10):
                    qweight[r][o] |= col(k + j) << (3 * j + 2)
        i += 32 // bits if bits != 3 else 32
        row += 1 if bits != 3 else 3
    return qweight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_gptq_pack_loop(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 64), generator=g, dtype=torch.uint8)
    expected = gptq_loop_reference(codes, bits)
    assert [as_uint32(r) for r in pack_codes(codes, bits)] == expected
    assert stream_reference(codes, bits) == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 31), (4, 32), (2, 33), (6, 100)])
def test_codes_round_trip_awkward_sizes(bits, shape):
    g = torch.Generator().manual_seed(sum(shape) * bits)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    q = pack_codes(codes, bits)
    assert q.shape == (packed_rows(shape[1], bits), shape[0])
    assert [as_uint32(r) for r in q] == stream_reference(codes, bits)  # padding bits are zero
    assert torch.equal(unpack_codes(q, bits, shape[1]), codes)


def test_padding_rows():
    assert packed_rows(72, 4) == 9  # GPTQ-packable: no padding
    assert packed_rows(73, 4) == 10
    assert packed_rows(32, 3) == 3 and packed_rows(33, 3) == 6
    assert packed_rows(100, 2) == 7 and packed_rows(5, 8) == 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zeros_round_trip_including_zero_point_0(bits):
    g = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (37, 3), generator=g).float()
    zeros[0, 0], zeros[1, 0] = 0, 2**bits - 1  # zero - 1 wraps to maxq and must not spill into neighbours
    qz = pack_zeros(zeros, bits)
    assert qz.shape == (3, packed_rows(37, bits))
    assert torch.equal(unpack_zeros(qz, bits, 37), zeros)


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        pack_zeros(torch.tensor([[16.0]]), 4)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, 1, dtype=torch.int32), 4, 8)  # 2 rows cannot hold exactly 8 codes


# ----------------------------------------------------------------------------------------------------------------
# PackedLinear
# ----------------------------------------------------------------------------------------------------------------

OUT, IN, K = 24, 40, 5


def hand_record(
    bits: int = 3, n_groups: int = 4, k: int = K, sym: bool = False, seed: int = 0, ordered: bool = False
) -> QuantizedWeight:
    """Random record with act-order g_idx (or groups in column order), fp16-representable scales and salient
    weights, zero-point salient codes."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    scales = (torch.rand(OUT, n_groups, generator=g) * 0.1 + 0.01).half().float()
    if sym:
        zeros = torch.full((OUT, n_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, maxq + 1, (OUT, n_groups), generator=g).float()
    g_idx = (torch.randperm(IN, generator=g) % n_groups).to(torch.int32)
    if ordered:
        g_idx = (torch.arange(IN) // (IN // n_groups)).to(torch.int32)
    codes = torch.randint(0, maxq + 1, (OUT, IN), generator=g).to(torch.uint8)
    salient_idx = torch.randperm(IN, generator=g)[:k].sort().values
    codes[:, salient_idx] = zeros[:, g_idx[salient_idx].long()].to(torch.uint8)
    return QuantizedWeight(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=salient_idx,
        salient_weight=torch.randn(OUT, k, generator=g).half().float(), bits=bits,
        group_size=-1 if n_groups == 1 else IN // n_groups, sym=sym,
    )


def assert_same_record(a: QuantizedWeight, b: QuantizedWeight) -> None:
    for name in ("codes", "scales", "zeros", "g_idx", "salient_idx", "salient_weight"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


@pytest.mark.parametrize("bits,n_groups,k", [(2, 1, 0), (3, 4, K), (4, 2, K), (8, 5, 1)])
def test_packed_linear_round_trips_record(bits, n_groups, k):
    qw = hand_record(bits, n_groups, k)
    m = PackedLinear.from_quantized(qw, torch.randn(OUT))
    state = m.state_dict()
    assert {k_: (v.dtype, tuple(v.shape)) for k_, v in state.items()} == {
        "qweight": (torch.int32, (packed_rows(IN, bits), OUT)),
        "qzeros": (torch.int32, (n_groups, packed_rows(OUT, bits))),
        "scales": (torch.float16, (n_groups, OUT)),
        "g_idx": (torch.int32, (IN,)),
        "salient_idx": (torch.int32, (k,)),
        "salient_weight": (torch.float16, (OUT, k)),
        "bias": (torch.float16, (OUT,)),
    }
    assert_same_record(m.to_quantized_weight(), qw)


def test_forward_matches_float64_reference():
    qw = hand_record()
    bias = torch.randn(OUT)
    m = PackedLinear.from_quantized(qw, bias, dtype=torch.float32)
    x = torch.randn(3, 7, IN)
    w = qw.dequantize(torch.float64)  # salient columns written back into the dense weight
    ref = x.double() @ w.T + bias.double()  # bias kept in the compute dtype (float32 here)
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ordered,n_groups", [(False, 2), (True, 2), (True, 1)])
def test_forward_equals_mixed_precision_linear_exactly(ordered, n_groups):
    qw = hand_record(bits=4, n_groups=n_groups, ordered=ordered)
    bias = torch.randn(OUT).half().float()
    mixed = MixedPrecisionLinear.from_quantized(qw, bias).eval()
    packed = PackedLinear.from_quantized(qw, bias, dtype=torch.float32)
    assert packed._groups_in_order() == (ordered or n_groups == 1)  # the broadcast fast path vs the gather path
    assert torch.equal(packed.quantized_part(), qw.quantized_part())
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        assert torch.equal(packed(x), mixed(x))


def test_dense_cache_gives_same_output_and_follows_dtype():
    qw = hand_record()
    m = PackedLinear.from_quantized(qw, None, dtype=torch.float32)
    x = torch.randn(4, IN)
    y = m(x)
    m.cache_dense = True
    assert torch.equal(m(x), y) and torch.equal(m(x), y)
    assert m._dense is not None and m._dense.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m._dense is None  # invalidated by the cast
    assert m.scales.dtype == torch.float16 and m.salient_weight.dtype == torch.float16  # stored values kept
    assert_same_record(m.to_quantized_weight(), qw)


def test_from_quantized_rejects_nonzero_salient_codes():
    qw = hand_record()
    j = int(qw.salient_idx[0])
    qw.codes[0, j] = (int(qw.codes[0, j]) + 1) % 8
    with pytest.raises(ValueError, match="salient"):
        PackedLinear.from_quantized(qw)


def test_check_catches_bad_values():
    m = PackedLinear.from_quantized(hand_record())
    m.check()
    m.g_idx[0] = 99
    with pytest.raises(ValueError, match="g_idx"):
        m.check()
    m = PackedLinear.from_quantized(hand_record())
    m.salient_idx.copy_(m.salient_idx.flip(0))
    with pytest.raises(ValueError, match="salient_idx"):
        m.check()
    m = PackedLinear.from_quantized(hand_record(bits=4, sym=True))
    m.check()
    m.sym = True
    m.qzeros.fill_(0)  # zero points 1, not 8
    with pytest.raises(ValueError, match="sym"):
        m.check()
