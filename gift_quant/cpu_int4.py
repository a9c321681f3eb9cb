"""Fast CPU matmul for the packed linears: gift_quant's int4 op where it is fast, else torch's weight-only int4 kernel.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by unsigned 4-bit codes q with a scale
and an offset per group of 32…256 input columns: w = (q − 8)·scale + offset. GPTQ codes of 2, 3 or 4 bits map onto
it as w = s·(c − z) = s·((c − z + 8) − 8): shifted codes q = c − z + 8 with offset 0 whenever they fit in [0, 15]
(always below 4 bits, and for symmetric 4-bit), else q = c with offset s·(8 − z). Per-channel quantization
(group_size −1) and groups wider than 256 become kernel groups sharing one scale; act-order (g_idx out of order)
becomes a column permutation of x. The kernel form is built at load time from the checkpoint tensors (the format on
disk does not change) and costs half a byte per weight, in place of the checkpoint's codes once it has been read back
(see the last paragraph).

The kernel wins for a few rows (decode) and loses to a dense GEMM for many (prefill): above ``DENSE_ROWS`` rows the
weight is dequantized from the kernel form in float32 — with the float32 scales this is the reference dequantization,
bit for bit — and multiplied densely, so prefill and perplexity keep float32 accuracy. torch's kernel computes in
bf16 (activations, scales and output rounded to 8 significant bits).

Where gift_quant's own op (``csrc/linear_rows.cpp``, built by :mod:`gift_quant.cpu_rows`) has its vector loop (an
AVX-512 VNNI CPU), the same 4-bit values, scales and offsets are packed in its layout instead (:func:`pack_rows16`:
16 output rows interleaved, so one load feeds 16 rows and no horizontal sums are needed) and the few-row path runs
it: int16 activations per group (the scales and offsets stay torch's bf16 pairs), exact integer sums, float32 out,
the same bits on every CPU; 1.3–1.6x torch's
kernel for one row of a SmolLM2 layer's linears and faster up to ``DENSE_ROWS`` rows (docs/size_perplexity.md).
Elsewhere its scalar loop would be slower than torch's kernel, so the linears keep torch's layout.

Reading torch's form back needs its packing layout (gift_quant's is its own), which is private and depends on the
CPU (blocks of 64 rows on AVX-512, 32 on AVX2 and without vector units, each block interleaved its own way, pairs of
rows in a partial last block). It is never assumed: :func:`layout` packs a probe once per row count and reads off
where each row went, and every build checks that the layout read back gives its codes exactly; a weight that fails
runs on the reference path, with the reason in ``kernel_used``. A form that reads back gives its codes back too
(:func:`codes`): the packed linear then keeps it as the only copy of its codes (see
:class:`gift_quant.packing.PackedLinear`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gift_quant import cpu_rows
from gift_quant.memory import scratch

KERNEL_GROUPS = (256, 128, 64, 32)  # what the kernel accepts, widest first (fewest scales)
DENSE_ROWS = 64  # above this many rows, dequantize and use a dense GEMM (crossover measured on a 2-core AVX-512 CPU)
Index = slice | torch.Tensor


@dataclass(frozen=True)
class Run:
    """``count`` consecutive blocks of ``rows`` weight rows from row ``start``, each stored as K × rows/2 bytes (one
    input column after the other): byte j of a column holds block row ``lo[j]`` in its low nibble, ``hi[j]`` in its
    high one."""

    start: int
    count: int
    rows: int
    lo: Index
    hi: Index


@dataclass
class Int4Weight:
    packed: torch.Tensor  # uint8: torch's kernel's layout (N, K/2), or gift_quant's (N/16, K/8, 16, 4) with rows16
    scale_offset: torch.Tensor  # bf16 (K/G, N, 2), the kernel's scales and offsets (both layouts)
    scale: torch.Tensor  # float32 (N, n_groups), per quantization group, for the dense path
    offset: torch.Tensor | None  # float32 (N, n_groups), None when the codes are shifted (offset 0)
    zeros: torch.Tensor | None  # uint8 (N, n_groups): the zero points the codes were shifted by; None with an offset
    groups: torch.Tensor  # (K/G,) quantization group of each kernel group
    group: int  # kernel group width G
    perm: torch.Tensor | None  # input-column order making groups contiguous; None when already in order
    runs: tuple[Run, ...] | None  # torch's packed layout, checked against the codes; None when it could not be read
    rows16: bool = False  # ``packed`` is gift_quant's layout (:func:`pack_rows16`) for its own op, not torch's

    @property
    def readable(self) -> bool:
        """Whether the codes can be read back from ``packed`` (gift_quant's layout always can)."""
        return self.rows16 or self.runs is not None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0] * (16 if self.rows16 else 1)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return matmul(x, self, bias)


OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")  # private ATen ops, torch >= 2.6


def available() -> bool:
    return all(hasattr(torch.ops.aten, op) for op in OPS)


def _pack(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)


@functools.lru_cache(maxsize=None)
def layout(n: int) -> tuple[Run, ...] | None:
    """Where torch's packing puts the rows of an n-row weight (this process's CPU kernels), read from a probe: an
    (n, 2) matrix of distinct ids packed four bits at a time. None when it is not blocks of rows as :class:`Run`
    describes (then nothing is read back from the kernel form)."""
    ids = torch.arange(2 * n, dtype=torch.int64).view(n, 2)
    lo = hi = torch.zeros(n, dtype=torch.int64)
    for shift in range(0, max(1, (2 * n - 1).bit_length()), 4):
        packed = _pack(((ids >> shift) & 15).to(torch.int32)).view(-1).long()
        lo, hi = lo | (packed & 15) << shift, hi | (packed >> 4) << shift
    blocks, start = [], 0
    while start < n:  # a block of r rows takes r bytes here: r/2 for column 0, then r/2 for column 1
        column = lo[start:] % 2
        half = int(column.nonzero()[0, 0]) if bool(column.any()) else 0
        block = _block(lo[start: start + 2 * half], hi[start: start + 2 * half], start, half)
        if block is None:
            return None
        blocks.append(block)
        start += 2 * half
    return _runs(blocks)


def _block(lo: torch.Tensor, hi: torch.Tensor, start: int, half: int) -> tuple | None:
    """(start, rows, lo rows, hi rows) of one block from its probe ids, or None when they are not such a block."""
    if half == 0 or lo.numel() != 2 * half:
        return None
    col = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(half, dtype=torch.int64)])
    lo_row, hi_row = lo // 2 - start, hi // 2 - start
    rows = torch.cat([lo_row[:half], hi_row[:half]]).sort().values
    if not (torch.equal(lo % 2, col) and torch.equal(hi % 2, col) and torch.equal(lo_row[:half], lo_row[half:])
            and torch.equal(hi_row[:half], hi_row[half:]) and torch.equal(rows, torch.arange(2 * half))):
        return None
    return start, 2 * half, lo_row[:half], hi_row[:half]


def _runs(blocks: list[tuple]) -> tuple[Run, ...]:
    """Consecutive blocks of the same shape merged into runs (usually full blocks, then one partial block)."""
    runs: list[Run] = []
    for start, rows, lo, hi in blocks:
        last = runs[-1] if runs else None
        if last is not None and last.rows == rows and torch.equal(_index(last.lo, rows), lo) and torch.equal(
                _index(last.hi, rows), hi):
            runs[-1] = Run(last.start, last.count + 1, rows, last.lo, last.hi)
        else:
            runs.append(Run(start, 1, rows, _as_slice(lo), _as_slice(hi)))
    return tuple(runs)


def _as_slice(idx: torch.Tensor) -> Index:
    """A slice when the rows are evenly spaced (every layout seen so far): strided copies, no gather."""
    step = int(idx[1] - idx[0]) if idx.numel() > 1 else 1
    if step > 0 and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + step * idx.numel(), step)):
        return slice(int(idx[0]), int(idx[0]) + step * idx.numel(), step)
    return idx


def _index(idx: Index, rows: int) -> torch.Tensor:
    return torch.arange(rows)[idx] if isinstance(idx, slice) else idx


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


def pack_rows16(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q (N, K), N a multiple of 16 and K of 8, in the layout of gift_quant's op
    (``csrc/linear_rows.cpp``): uint8 (N/16, K/8, 16, 4), byte [b, o, r, j] holding q[16b + r, 8o + j] in its low
    nibble and q[16b + r, 8o + 4 + j] in its high one."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).view(n // 16, 16, k // 8, 2, 4)
    return (nibbles[:, :, :, 0] | nibbles[:, :, :, 1] << 4).permute(0, 2, 1, 3).contiguous()


def unpack_rows16(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The int32 values (N, K) of :func:`pack_rows16`'s layout, into ``out`` (default: a new tensor)."""
    blocks, octets = packed.shape[:2]
    n, k = blocks * 16, octets * 8
    if out is None:
        out = torch.empty(n * k, dtype=torch.int32, device=packed.device)
    q = out.view(blocks, 16, octets, 2, 4)
    rows = packed.permute(0, 2, 1, 3)  # (N/16, 16, K/8, 4)
    q[:, :, :, 0] = rows & 15
    q[:, :, :, 1] = rows >> 4
    return out.view(n, k)


def own_layout() -> bool:
    """Whether linears take gift_quant's layout and op here: built, with its vector loop (an AVX-512 VNNI CPU),
    where it beats torch's kernel (docs/size_perplexity.md); elsewhere torch's kernel is the faster."""
    return cpu_rows.load() is None and cpu_rows.LINEAR_VECTORIZED


def build(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> Int4Weight:
    """The kernel form of s·(c − z): ``codes`` (N, K) integers, ``scales``/``zeros`` (N, n_groups) float32,
    ``g_idx`` (K,); packed for gift_quant's op where :func:`own_layout`, else for torch's kernel. Call
    ``unsupported`` first."""
    perm = column_order(g_idx)
    g = g_idx.long() if perm is None else g_idx.long()[perm]
    c = (codes if perm is None else codes[:, perm]).to(torch.int32)
    width = kernel_group(g)
    first = g.view(-1, width)[:, 0].clone()  # quantization group of each kernel group (a view would keep g alive)
    scales, zeros = scales.float(), zeros.float()
    shifted = c - zeros.to(torch.int32)[:, g] + 8
    if bool(((shifted >= 0) & (shifted <= 15)).all()):
        q, offset, shift = shifted, None, zeros.to(torch.uint8)  # kept to give the codes back (1 byte a group)
    else:
        q, offset, shift = c, scales * (8 - zeros), None
    del shifted
    kernel_offset = torch.zeros_like(scales) if offset is None else offset
    scale_offset = torch.stack([scales[:, first].t(), kernel_offset[:, first].t()], dim=-1).to(torch.bfloat16)
    if own_layout():
        return Int4Weight(pack_rows16(q), scale_offset.contiguous(), scales, offset, shift, first, width, perm, None,
                          rows16=True)
    packed = _pack(q)
    runs = layout(q.shape[0])
    if runs is not None and not torch.equal(_unpack(packed, q.shape[1], runs), q):
        runs = None  # the probe's layout does not hold for this weight: nothing is read back from it
    return Int4Weight(packed, scale_offset.contiguous(), scales, offset, shift, first, width, perm, runs)


def _unpack(packed: torch.Tensor, in_features: int, runs: tuple[Run, ...],
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (N, K) from the kernel layout, into ``out`` (default: a new int32 tensor)."""
    n, k = packed.shape[0], in_features
    if out is None:
        out = torch.empty(n * k, dtype=torch.int32, device=packed.device)
    flat, codes = packed.view(-1), out.view(n, k)
    for run in runs:
        size = run.count * run.rows
        v = flat[run.start * k // 2: (run.start + size) * k // 2].view(run.count, k, run.rows // 2)
        blocks = codes[run.start: run.start + size].view(run.count, run.rows, k)
        blocks[:, run.lo] = (v & 15).transpose(1, 2)
        blocks[:, run.hi] = (v >> 4).transpose(1, 2)
    return codes


def _values(w: Int4Weight, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's 4-bit values (N, K) of either layout."""
    return unpack_rows16(w.packed, out) if w.rows16 else _unpack(w.packed, in_features, w.runs, out)


def codes(w: Int4Weight, in_features: int) -> torch.Tensor:
    """The uint8 codes (N, K) ``w`` was built from, in the original column order: the kernel's 4-bit values read
    back (``w.readable`` must hold), less the shift by 8 − z, columns put back where ``perm`` took them."""
    n = w.out_features
    q = _values(w, in_features)
    if w.zeros is not None:  # q = c − z + 8, one zero point per kernel group of columns
        q.view(n, -1, w.group).add_(w.zeros[:, w.groups].unsqueeze(2)).sub_(8)
    if w.perm is not None:  # column j of q is column perm[j] of the codes
        q = torch.empty_like(q).index_copy_(1, w.perm, q)
    return q.to(torch.uint8)


def dequantize(w: Int4Weight, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) weight in the permuted column order, built in place in ``out`` (default: a new tensor);
    with shifted codes exactly s·(c − z), the reference's arithmetic."""
    n = w.out_features
    if out is None:
        out = torch.empty(n * in_features, dtype=torch.float32, device=w.packed.device)
    deq = _values(w, in_features, out).view(n, -1, w.group)
    deq.sub_(8).mul_(w.scale[:, w.groups].unsqueeze(2))
    if w.offset is not None:
        deq.add_(w.offset[:, w.groups].unsqueeze(2))
    return deq.view(n, in_features)


def matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, K) @ wᵀ + bias for the quantized part, in x's dtype."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    k = x.shape[-1]
    if x.numel() > DENSE_ROWS * k:
        weight = dequantize(w, k, scratch(w.out_features * k, torch.float32, x.device))
        return F.linear(x, weight.to(x.dtype), bias)  # bias inside, as the reference path adds it
    if w.rows16:  # int16 activations, float32 out (torch's kernel rounds both to bf16)
        y = cpu_rows.linear_mm4(x.reshape(-1, k), w.packed, w.scale_offset, w.group)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(torch.bfloat16), w.packed, w.group,
                                                      w.scale_offset)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def prepare(module) -> tuple[Int4Weight | None, str]:
    """The kernel form of a PackedLinear on the CPU, or None and the reason it cannot have one."""
    reason = unsupported(module.bits, module.out_features, module.g_idx)
    if reason is not None:
        return None, reason
    scales = module.scales.t().to(torch.float32)
    w = build(module.codes(), scales, module.zeros(), module.g_idx)
    if not w.readable:  # the dense path could not read it back: computing prefill in bf16 instead would be silent
        return None, "reference (torch's int4 packing on this CPU has a layout that could not be read back)"
    return w, "int4_cpu"
