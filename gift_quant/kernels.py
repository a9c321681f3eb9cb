"""Which matmul computes a PackedLinear's quantized part.

* CPU: torch's int4 kernel (:mod:`gift_quant.cpu_int4`) for 2/3/4-bit codes.
* CUDA: a GPTQ kernel from gptqmodel (:mod:`gift_quant.gptq_cuda`, the optional ``gpu`` extra).
* Otherwise, under autograd, for float64 inputs, or with ``kernel="reference"``: the reference path of
  :class:`gift_quant.packing.PackedLinear` (dequantize the codes, dense matmul), which is also the tests' oracle.

A fast form is derived from the module's buffers (the checkpoint tensors) and rebuilt when they change, so loading,
``load_state_dict`` and device moves need no special care (the CPU form may hold the only copy of the codes:
PackedLinear puts ``qweight`` back before a move, a load or a rebuild).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any, Callable

import torch

KERNELS = ("auto", "reference")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FastMatmul = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def build_fast(module: Any) -> tuple[FastMatmul | None, str]:
    """The fast matmul for ``module`` on its current device, or None and why the reference path runs."""
    if module.kernel == "reference":
        return None, "reference (requested)"
    device = module.qweight.device.type
    if device == "cpu":
        from gift_quant import cpu_int4

        return cpu_int4.prepare(module)
    if device == "cuda":
        from gift_quant import gptq_cuda

        return gptq_cuda.prepare(module)
    return None, f"no fast kernel on {device}"


def trim_heap() -> None:
    """Hand the heap memory freed by the builds' temporaries back to the OS (glibc keeps it otherwise, and it would
    count as the model's resident memory); glibc's malloc_trim, elsewhere a no-op."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per thread and dtype that the many-row paths dequantize weights into (every packed linear's
    prefill, the quantized lm_head's chunks): a fresh MB-sized weight per matmul would churn the allocator (glibc
    keeps such freed blocks: ~50 MB of RSS on SmolLM2). The caller uses it before the next call for the same dtype."""
    buffers = _scratch.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
