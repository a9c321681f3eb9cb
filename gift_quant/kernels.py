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

from typing import Any, Callable

import torch

from gift_quant import cpu_int4, gptq_cuda

KERNELS = ("auto", "reference")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FastMatmul = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def build_fast(module: Any) -> tuple[FastMatmul | None, str]:
    """The fast matmul for ``module`` on its current device, or None and why the reference path runs."""
    if module.kernel == "reference":
        return None, "reference (requested)"
    device = module.qweight.device.type
    if device == "cpu":
        return cpu_int4.prepare(module)
    if device == "cuda":
        return gptq_cuda.prepare(module)
    return None, f"no fast kernel on {device}"
