"""Fast CPU matmul for the packed linears, on torch's weight-only int4 kernel.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by unsigned 4-bit codes q with a scale
and an offset per group of 32…256 input columns: w = (q − 8)·scale + offset. GPTQ codes of 2, 3 or 4 bits map onto
it as w = s·(c − z) = s·((c − z + 8) − 8): shifted codes q = c − z + 8 with offset 0 whenever they fit in [0, 15]
(always below 4 bits, and for symmetric 4-bit), else q = c with offset s·(8 − z). Per-channel quantization
(group_size −1) and groups wider than 256 become kernel groups sharing one scale; act-order (g_idx out of order)
becomes a column permutation of x. The kernel form is built at load time from the checkpoint tensors (the format on
disk does not change) and costs half a byte per weight beside them.

The kernel wins for a few rows (decode) and loses to a dense GEMM for many (prefill): above ``DENSE_ROWS`` rows the
weight is dequantized from the kernel form in float32 — with the float32 scales this is the reference dequantization,
bit for bit — and multiplied densely, so prefill and perplexity keep float32 accuracy. The kernel path computes in
bf16 (activations, scales and output rounded to 8 significant bits).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_GROUPS = (256, 128, 64, 32)  # what the kernel accepts, widest first (fewest scales)
DENSE_ROWS = 64  # above this many rows, dequantize and use a dense GEMM (crossover measured on a 2-core AVX-512 CPU)
_BLOCK_N = 64  # the kernel's layout: [N / 64][K][32] bytes, row i of a block in the low nibble, row 32 + i in the high


@dataclass
class Int4Weight:
    packed: torch.Tensor  # uint8 (N, K/2), the kernel's layout
    scale_offset: torch.Tensor  # bf16 (K/G, N, 2), the kernel's scales and offsets
    scale: torch.Tensor  # float32 (N, n_groups), per quantization group, for the dense path
    offset: torch.Tensor | None  # float32 (N, n_groups), None when the codes are shifted (offset 0)
    groups: torch.Tensor  # (K/G,) quantization group of each kernel group
    group: int  # kernel group width G
    perm: torch.Tensor | None  # input-column order making groups contiguous; None when already in order
    dense_ok: bool  # the packed layout was verified against the codes, so the dense path can unpack it

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return matmul(x, self, bias)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def column_order(g_idx: torch.Tensor) -> torch.Tensor | None:
    """A stable order of the input columns by group, or None when they are already in group order."""
    g = g_idx.long()
    if bool((g.diff() >= 0).all()):
        return None
    return torch.argsort(g, stable=True)


def kernel_group(g_sorted: torch.Tensor) -> int | None:
    """The widest kernel group G such that every run of G sorted columns lies in one quantization group."""
    k = g_sorted.numel()
    for width in KERNEL_GROUPS:
        if k % width == 0 and bool((g_sorted.view(-1, width) == g_sorted.view(-1, width)[:, :1]).all()):
            return width
    return None


def unsupported(bits: int, out_features: int, g_idx: torch.Tensor) -> str | None:
    """Why the kernel cannot run this linear (None when it can)."""
    if not available():
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if bits > 4:
        return f"{bits}-bit codes do not fit the 4-bit kernel"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    order = column_order(g_idx)
    if kernel_group(g_idx.long() if order is None else g_idx.long()[order]) is None:
        return f"groups of {g_idx.numel()} columns cannot be cut into kernel groups of {KERNEL_GROUPS}"
    return None


def build(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> Int4Weight:
    """The kernel form of s·(c − z): ``codes`` (N, K) integers, ``scales``/``zeros`` (N, n_groups) float32,
    ``g_idx`` (K,). Call ``unsupported`` first."""
    perm = column_order(g_idx)
    g = g_idx.long() if perm is None else g_idx.long()[perm]
    c = (codes if perm is None else codes[:, perm]).to(torch.int32)
    width = kernel_group(g)
    first = g.view(-1, width)[:, 0]  # quantization group of each kernel group
    scales, zeros = scales.float(), zeros.float()
    shifted = c - zeros.to(torch.int32)[:, g] + 8
    if bool(((shifted >= 0) & (shifted <= 15)).all()):
        q, offset = shifted, None
    else:
        q, offset = c, scales * (8 - zeros)
    del shifted
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    kernel_offset = torch.zeros_like(scales) if offset is None else offset
    scale_offset = torch.stack([scales[:, first].t(), kernel_offset[:, first].t()], dim=-1).to(torch.bfloat16)
    dense_ok = q.shape[0] % _BLOCK_N == 0 and torch.equal(_unpack(packed, q.shape[1]), q)  # the layout we read
    return Int4Weight(packed, scale_offset.contiguous(), scales, offset, first, width, perm, dense_ok)


def _unpack(packed: torch.Tensor, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (N, K) from the kernel layout (N a multiple of 64), into ``out`` (default: a new int32 tensor)."""
    n = packed.shape[0]
    v = packed.view(n // _BLOCK_N, in_features, _BLOCK_N // 2)
    if out is None:
        out = torch.empty(n * in_features, dtype=torch.int32, device=packed.device)
    blocks = out.view(n // _BLOCK_N, _BLOCK_N, in_features)
    blocks[:, : _BLOCK_N // 2] = (v & 15).transpose(1, 2)
    blocks[:, _BLOCK_N // 2:] = (v >> 4).transpose(1, 2)
    return out.view(n, in_features)


def dequantize(w: Int4Weight, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) weight in the permuted column order, built in place in ``out`` (default: a new tensor);
    with shifted codes exactly s·(c − z), the reference's arithmetic."""
    n = w.packed.shape[0]
    if out is None:
        out = torch.empty(n * in_features, dtype=torch.float32, device=w.packed.device)
    deq = _unpack(w.packed, in_features, out).view(n, -1, w.group)
    deq.sub_(8).mul_(w.scale[:, w.groups].unsqueeze(2))
    if w.offset is not None:
        deq.add_(w.offset[:, w.groups].unsqueeze(2))
    return deq.view(n, in_features)


_scratch = threading.local()


def _scratch_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """One float32 buffer per thread that every linear's prefill dequantizes into: a fresh MB-sized weight per
    linear per forward would churn the allocator (glibc keeps such freed blocks: ~50 MB of RSS on SmolLM2)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, K) @ wᵀ + bias for the quantized part, in x's dtype."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    k = x.shape[-1]
    if x.numel() > DENSE_ROWS * k and w.dense_ok:
        weight = dequantize(w, k, _scratch_buffer(w.packed.shape[0] * k, x.device))
        return F.linear(x, weight.to(x.dtype), bias)  # bias inside, as the reference path adds it
    flat = x.reshape(-1, k).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, w.packed, w.group, w.scale_offset)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def prepare(module) -> tuple[Int4Weight | None, str]:
    """The kernel form of a PackedLinear on the CPU, or None and the reason it cannot have one."""
    reason = unsupported(module.bits, module.out_features, module.g_idx)
    if reason is not None:
        return None, reason
    scales = module.scales.t().to(torch.float32)
    return build(module.codes(), scales, module.zeros(), module.g_idx), "int4_cpu"
