"""GPTQ-layout bit packing of quantized codes and zero points (the on-disk layout of the packed checkpoint).

Layout (AutoGPTQ / GPTQModel "v1", ``checkpoint_format: gptq``):

* ``qweight`` int32 ``(in * bits / 32, out)``: codes packed along the **input** dim. Every block of ``32 / bits``
  consecutive input rows (2/4/8 bits) fills one int32 word, row ``i`` of the block in bits ``[bits*i, bits*(i+1))``.
  For 3 bits, 32 rows fill 3 words as one little-endian 96-bit stream, so rows 10 and 21 straddle word boundaries.
  Both cases are the same rule: a block is the shortest run of codes filling whole words, read as one bit stream.
* ``qzeros`` int32 ``(n_groups, out * bits / 32)``: zero points packed the same way along the **output** dim, stored
  as ``zero - 1`` (the v1 convention; kernels add the 1 back). We store it modulo ``2**bits`` so a zero point of 0
  cannot spill into its neighbours; v1 kernels would read such a zero as ``2**bits``, which is why GPTQ-exact interop
  needs zero points >= 1 (always true for symmetric quantization).
* ``scales`` fp16 ``(n_groups, out)``, ``g_idx`` int32 ``(in,)``: as in GPTQ.
* ``salient_idx`` int32 ``(k,)`` and ``salient_weight`` fp16 ``(out, k)``: GIFT-SW's fp columns. Their codes equal
  the zero point, so the packed part dequantizes to exactly 0 there and the two terms simply add.

Padding: when the packed dim is not a multiple of the block length (``32 / bits`` codes, 32 for 3-bit) it is padded
with code 0 up to the next block; the unpacking functions take the true length and drop the padding. Sizes GPTQ can
pack are therefore laid out exactly as GPTQ lays them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gift_quant.quantizer import SUPPORTED_BITS

_WORD = 32
_MASK32 = 0xFFFFFFFF


def block_shape(bits: int) -> tuple[int, int]:
    """(codes, words) of the shortest run of codes that fills whole int32 words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    words = math.lcm(bits, _WORD) // _WORD
    return words * _WORD // bits, words


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 rows holding ``n`` codes (padding included)."""
    codes, words = block_shape(bits)
    return -(-n // codes) * words


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2**32) as int32 bit patterns (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values (n, m) in [0, 2**bits) along dim 0 into int32 (packed_rows(n), m)."""
    codes, words = block_shape(bits)
    n, m = values.shape
    v = values.to(torch.int64)
    if (v < 0).any() or (v >= 2**bits).any():
        raise ValueError(f"values out of range for {bits}-bit packing")
    v = F.pad(v, (0, 0, 0, -n % codes)).reshape(-1, codes, m)
    out = torch.zeros(v.shape[0], words, m, dtype=torch.int64, device=v.device)
    for p in range(codes):
        word, shift = divmod(p * bits, _WORD)
        out[:, word] |= v[:, p] << shift
        if shift + bits > _WORD:  # 3-bit: the high bits of this code start the next word
            out[:, word + 1] |= v[:, p] >> (_WORD - shift)
    return _to_int32(out & _MASK32).reshape(-1, m)


def unpack_dim0(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``_pack_dim0``: int32 (rows, m) -> uint8 (n, m)."""
    codes, words = block_shape(bits)
    rows, m = packed.shape
    if rows != packed_rows(n, bits):
        raise ValueError(f"{rows} packed rows cannot hold {n} {bits}-bit codes (expected {packed_rows(n, bits)})")
    mask = 2**bits - 1
    shifts = torch.arange(codes, device=packed.device) * bits
    if words == 1:
        # Arithmetic shift sign-extends, but the extension lands above the masked bits.
        vals = (packed.unsqueeze(1) >> shifts.to(torch.int32).view(1, -1, 1)) & mask
        return vals.reshape(-1, m)[:n].to(torch.uint8)
    w = (packed.to(torch.int64) & _MASK32).reshape(-1, words, m)
    word, shift = shifts // _WORD, (shifts % _WORD).view(1, -1, 1)
    lo = w[:, word] >> shift
    # Codes that straddle a boundary take their high bits from the next word; for the others these bits fall above
    # the mask (the shift is >= bits), so one expression serves both.
    hi = w[:, (word + 1).clamp(max=words - 1)] << (_WORD - shift)
    return ((lo | hi) & mask).reshape(-1, m)[:n].to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (out, in) uint8 -> qweight int32 (packed_rows(in, bits), out), packed along the input dim."""
    return pack_dim0(codes.t(), bits)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 -> codes (out, in_features) uint8."""
    return unpack_dim0(qweight, bits, in_features).t().contiguous()


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros (out, n_groups) holding integers -> qzeros int32 (n_groups, packed_rows(out, bits)), v1 (zero - 1)."""
    z = zeros.round().to(torch.int64)
    if (z < 0).any() or (z >= 2**bits).any():
        raise ValueError(f"zero points out of range for {bits} bits")
    return pack_dim0((z - 1) & (2**bits - 1), bits).t().contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros int32 -> zeros (out_features, n_groups) float32 (the record's convention)."""
    stored = unpack_dim0(qzeros.t(), bits, out_features).to(torch.int64)
    return ((stored + 1) & (2**bits - 1)).to(torch.float32)
