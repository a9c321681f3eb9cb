"""gift_quant's few-row CPU kernels, small C++ ops built for this CPU on first use: the lm_head's (int8 per row, int4
per group: ``csrc/head_rows.cpp``) and the packed linears' int4 (``csrc/linear_rows.cpp``, used by
:mod:`gift_quant.cpu_int4` where its AVX-512 VNNI loop is compiled: ``LINEAR_VECTORIZED``).

Decoding one token multiplies one row of activations by the whole vocabulary (49152 x 576 int8 on SmolLM2: 28 MB a
token). torch's ``_weight_int8pack_mm`` does it at about 6 GB/s on one core, a quarter of a decode step; the int8 op
streams the rows at about 2.2x that (docs/size_perplexity.md), and an int4 head, which torch has no kernel for, would
otherwise dequantize its whole matrix a chunk at a time for every token; the linears' op streams a decode step's
int4 codes 1.3–1.6x faster than torch's kernel on an AVX-512 VNNI core. All are more accurate than bf16:
activations rounded to int16 per block (64 columns for the int8 head, the weight's group for int4: within 2⁻¹⁶
of the block's largest value, where bf16 rounds each value within 2⁻⁹ of itself), products summed exactly in int32,
blocks in float32 in a fixed order — the same bits on every CPU (see the sources' headers; tests/test_cpu_rows.py
writes that arithmetic out in torch).

The ops are compiled with ``torch.utils.cpp_extension`` (a C++ compiler, as Inductor needs, and ninja) for this CPU
(``-march=native``): the build's name carries a hash of the CPU's flags, so a cache shared between machines never
hands one CPU another's binary. Built once per machine (~20 s), then loaded from torch's extensions cache. Where they
cannot be built, :func:`load` says why once: the linears keep torch's int4 kernel, an int8 head torch's int8
kernel, an int4 head its chunks (:func:`switch_off` chooses that).
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("head_rows.cpp", "linear_rows.cpp"))
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")  # no FMA contraction: the same sums everywhere
MAX_ROWS = 8  # above, the head's dequantized chunks are faster (1 and 2 threads, 49152 x 576, a Zen 4 core)
MAX_GROUP4 = 4096  # int4 groups the op takes (even widths up to this: its int32 sums cannot overflow)

READY = False  # the ops are registered in this process (a plain global: compiled graphs read it as a constant)
LINEAR_VECTORIZED = False  # the linears' int4 op has its AVX-512 VNNI loop here (else its scalar loop only)
_tried: str | None = None  # why it is not, once tried ("" when it is)


def _cpu_tag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A short hash of what ``-march=native`` compiles for: the CPU's feature flags, and the flags."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() + platform.machine()
    return hashlib.sha1(" ".join((flags, *CFLAGS)).encode()).hexdigest()[:12]


def load() -> str | None:
    """Build (first time on this machine) or load the ops; None when they are ready, else why not (logged once)."""
    global READY, LINEAR_VECTORIZED, _tried
    if _tried is None:
        _tried = _build()
        READY = _tried == ""
        LINEAR_VECTORIZED = READY and bool(torch.ops.gift_quant.int4_linear_vectorized())
        if not READY:
            log.warning("the linears and the quantized lm_head run without gift_quant's ops: %s", _tried)
    return _tried or None


def switch_off(why: str) -> None:
    """Keep this process off gift_quant's ops from now on (benchmarks and tests compare): torch's int8 kernel, int4
    chunks for the head, torch's int4 kernel for linears built after this (one already in gift_quant's layout keeps
    its op)."""
    global READY, LINEAR_VECTORIZED, _tried
    READY, LINEAR_VECTORIZED, _tried = False, False, why


def switch_off_linears() -> None:
    """Keep the linears built from now on on torch's int4 kernel; the head keeps its ops."""
    global LINEAR_VECTORIZED
    load()
    LINEAR_VECTORIZED = False


def _build() -> str:
    names = ", ".join(source.name for source in SOURCES)
    log.info("loading gift_quant's few-row ops (%s: built on a machine's first use, ~20 s)", names)
    try:
        from torch.utils.cpp_extension import load as build

        build(name=f"gift_quant_rows_{_cpu_tag()}", sources=[str(source) for source in SOURCES],
              extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], is_python_module=False)
        for op in ("gift_quant::int8_rows_mm", "gift_quant::int4_rows_mm"):
            torch.library.register_fake(op)(_logits)
        torch.library.register_fake("gift_quant::int4_linear_mm")(_linear_rows)
    except Exception as exc:  # no compiler, no ninja, a failed build: torch's kernels, int4 head chunks instead
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"building {names} failed ({type(exc).__name__}: {first[:200]})"
    return ""


def _logits(x: torch.Tensor, codes: torch.Tensor, *rest) -> torch.Tensor:
    """Both ops' output for tracing (``torch.compile``): float32 (rows of x, rows of the codes)."""
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=torch.float32)


def _linear_rows(x: torch.Tensor, packed: torch.Tensor, *rest) -> torch.Tensor:
    """The linear op's output for tracing: float32 (rows of x, 16 output rows per block of the packed codes)."""
    return x.new_empty((x.shape[0], packed.shape[0] * 16), dtype=torch.float32)


def rows_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (M, N) = x (M, K) · (qweight (N, K) int8 · scales (N,) fp16)ᵀ; :func:`load` must have succeeded."""
    return torch.ops.gift_quant.int8_rows_mm(x, qweight, scales)


def rows_mm4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """float32 (M, N) = x (M, K) · Wᵀ for an int4 head (gift_quant.embedding's format: codes + 8 two a byte, even
    column low; fp16 scales (N, groups) of ``group`` columns, even and at most ``MAX_GROUP4``)."""
    return torch.ops.gift_quant.int4_rows_mm(x, packed, scales, group)


def linear_mm4(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, group: int,
               vectorized: bool = True) -> torch.Tensor:
    """float32 (M, N) = x (M, K) · Wᵀ for a packed linear's int4 codes in gift_quant's layout
    (:func:`gift_quant.cpu_int4.pack_rows16`), W = (q − 8)·scale + offset per group of ``group`` columns (torch's
    kernel's bf16 (K/group, N, 2) tensor); ``vectorized=False`` runs the scalar loop (the same bits)."""
    return torch.ops.gift_quant.int4_linear_mm(x, packed, scale_offset, group, vectorized)
