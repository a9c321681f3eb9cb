"""GPU path for the packed linears: the quantized part through an existing GPTQ kernel (gptqmodel, the optional
``gpu`` extra), the salient columns through PackedLinear's small dense matmul.

Our tensors are the GPTQ v1 layout, so a gptqmodel QuantLinear takes them as they are, with one conversion: its
kernels read zero points in the v2 convention (stored as they are, not minus one), so ``qzeros`` is repacked from
the true zero points. The salient columns carry code == zero point, so the kernel's product is exactly 0 there and
the salient term adds on top. gptqmodel's kernels compute in fp16/bf16: fp16 activations stay fp16, bf16 and float32
ones run in bf16 (float32's range: a float32 or bf16 model's activations can overflow fp16), and the result is cast
back.

gptqmodel's internals change between releases, so anything going wrong while importing or building it (an import or
attribute error of its private modules, a kernel that fails to compile or to run) is a reason, not a crash: each
built kernel is also run once per compute dtype on a probe and compared with the reference dequantization, and the
reference path runs for a dtype it fails (``kernel_used`` says which and why). Without CUDA or without gptqmodel,
:func:`prepare` says why too.
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from gift_quant.bitpack import pack_dim0


def unavailable(device_type: str = "cuda") -> str | None:
    """Why the GPTQ kernel cannot run here (None when it can)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed (pip install 'gift_quant[gpu]')"
    return None


def pack_zeros_v2(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros (out, n_groups) -> qzeros int32 (n_groups, packed out) holding the zero points themselves (GPTQ v2)."""
    return pack_dim0(zeros.round().to(torch.int64), bits).t().contiguous()


def build(module: Any, device_type: str = "cuda", backend: str = "auto") -> torch.nn.Module:
    """A gptqmodel QuantLinear (no bias: PackedLinear adds it) holding ``module``'s quantized part."""
    from gptqmodel.models._const import DEVICE
    from gptqmodel.quantization import FORMAT
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    desc_act = not module._groups_in_order()
    settings = dict(bits=module.bits, group_size=module.group_size, desc_act=desc_act, sym=module.sym)
    cls = select_quant_linear(**settings, device=DEVICE(device_type), backend=BACKEND(backend), format=FORMAT.GPTQ,
                              pack_dtype=torch.int32)
    qlinear = cls(**settings, in_features=module.in_features, out_features=module.out_features, bias=False,
                  pack_dtype=torch.int32, backend=BACKEND(backend), adapter=None, register_buffers=True)
    device = module.qweight.device
    qlinear.qweight = module.qweight.clone()
    qlinear.qzeros = pack_zeros_v2(module.zeros(), module.bits).to(device)
    qlinear.scales = module.scales.clone()
    qlinear.g_idx = module.g_idx.clone()
    qlinear.to(device).eval()
    qlinear.post_init()
    return qlinear


KERNEL_DTYPES = (torch.float16, torch.bfloat16)
PROBE_RTOL = 2.0**-5  # bf16 output rounding (2^-9) and half-precision accumulation, relative to max |y|


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The half precision an input of ``dtype`` runs in: fp16 only for fp16 (bf16 has float32's range)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


class GptqMatmul:
    """The fast-matmul callable of :mod:`gift_quant.kernels` around a gptqmodel QuantLinear. ``dtype`` forces the
    kernel's compute dtype; by default it follows the input (:func:`kernel_dtype`). Inputs whose dtype is not in
    ``dtypes`` (those the probe passed) take ``module``'s reference path."""

    def __init__(self, qlinear: torch.nn.Module, dtype: torch.dtype | None = None, module: Any = None,
                 dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> None:
        self.qlinear, self.dtype, self.dtypes = qlinear, dtype, dtypes
        self._module = None if module is None else weakref.ref(module)  # the module holds this: no cycle

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.dtype or kernel_dtype(x.dtype)
        if dtype not in self.dtypes and self._module is not None:
            return F.linear(x, self._module().quantized_part(x.dtype), bias)
        y = self.qlinear(x.to(dtype)).to(x.dtype)
        return y if bias is None else y + bias


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def probe(qlinear: torch.nn.Module, module: Any, dtype: torch.dtype) -> str | None:
    """Why the kernel fails a 2-row product in ``dtype`` against the reference dequantization (None: it passes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, module.in_features, generator=g).to(module.qweight.device)
    want = x @ module.quantized_part(torch.float32).t()
    try:
        y = qlinear(x.to(dtype)).float()
    except Exception as err:  # noqa: BLE001 - any kernel failure means: not this dtype
        return _reason(err)
    if y.shape != want.shape or not bool(((y - want).abs().max() <= PROBE_RTOL * want.abs().max()).item()):
        return "its output differs from the reference dequantization"
    return None


def prepare(module: Any) -> tuple[GptqMatmul | None, str]:
    reason = unavailable(module.qweight.device.type)
    if reason is not None:
        return None, reason
    try:
        qlinear = build(module)
    except Exception as err:  # noqa: BLE001 - gptqmodel's private API or its kernel build: fall back, say why
        return None, f"reference (gptqmodel unusable: {_reason(err)})"
    failed = {dtype: probe(qlinear, module, dtype) for dtype in KERNEL_DTYPES}
    passed = tuple(dtype for dtype, why in failed.items() if why is None)
    if not passed:
        why = "; ".join(f"{str(d).removeprefix('torch.')}: {r}" for d, r in failed.items())
        return None, f"reference (gptqmodel {type(qlinear).__name__} fails its probe: {why})"
    used = "gptq_cuda"
    for dtype, why in failed.items():
        if why is not None:
            used += f" ({str(dtype).removeprefix('torch.')} inputs on the reference path: {why})"
    return GptqMatmul(qlinear, module=module, dtypes=passed), used
