"""GPU path for the packed linears: the quantized part through an existing GPTQ kernel (gptqmodel, the optional
``gpu`` extra), the salient columns through PackedLinear's small dense matmul.

Our tensors are the GPTQ v1 layout, so a gptqmodel QuantLinear takes them as they are, with one conversion: its
kernels read zero points in the v2 convention (stored as they are, not minus one), so ``qzeros`` is repacked from
the true zero points. The salient columns carry code == zero point, so the kernel's product is exactly 0 there and
the salient term adds on top. gptqmodel's kernels compute in fp16/bf16: activations are cast to the scales' fp16
and the result back. Without CUDA or without gptqmodel, :func:`prepare` says why and the reference path runs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

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


class GptqMatmul:
    """The fast-matmul callable of :mod:`gift_quant.kernels` around a gptqmodel QuantLinear."""

    def __init__(self, qlinear: torch.nn.Module, dtype: torch.dtype = torch.float16) -> None:
        self.qlinear, self.dtype = qlinear, dtype

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.qlinear(x.to(self.dtype)).to(x.dtype)
        return y if bias is None else y + bias


def prepare(module: Any) -> tuple[GptqMatmul | None, str]:
    reason = unavailable(module.qweight.device.type)
    if reason is not None:
        return None, reason
    try:
        return GptqMatmul(build(module)), "gptq_cuda"
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as err:  # no kernel for these settings
        return None, f"gptqmodel: {' '.join(str(err).split())[:200]}"
