"""The GPU path's fallbacks and dtypes, without a GPU: a fake gptqmodel (its private modules as sys.modules entries)
whose QuantLinear dequantizes the tensors it is given, or fails the way a version mismatch or a broken build does.
The real kernel is checked by tests/test_kernels.py::test_cuda_gptq_kernel_matches_reference on a CUDA machine."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from gift_quant import gptq_cuda
from gift_quant.bitpack import unpack_codes, unpack_dim0
from gift_quant.packing import PackedLinear
from tests.test_kernels import record

PRIVATE = ("gptqmodel", "gptqmodel.models", "gptqmodel.models._const", "gptqmodel.quantization", "gptqmodel.utils",
           "gptqmodel.utils.backend", "gptqmodel.utils.importer")


class FakeQuantLinear(torch.nn.Module):
    """Reads qweight, v2 qzeros, scales and g_idx as a GPTQ kernel does; computes in the input's dtype."""

    dtypes = (torch.float16, torch.bfloat16)
    seen: list = []

    def __init__(self, bits, in_features, out_features, **_):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, out_features

    def post_init(self):
        pass

    def forward(self, x):
        if x.dtype not in self.dtypes:
            raise RuntimeError(f"expected half input, got {x.dtype}")
        type(self).seen.append(x.dtype)
        codes = unpack_codes(self.qweight, self.bits, self.in_features).float()
        zeros = unpack_dim0(self.qzeros.t().contiguous(), self.bits, self.out_features).float()
        g = self.g_idx.long()
        w = self.scales.t().float()[:, g] * (codes - zeros[:, g])
        return (x.float() @ w.t()).to(x.dtype)


def fake_gptqmodel(monkeypatch, qlinear=FakeQuantLinear, missing=None, select_error=None):
    def select(**_):
        if select_error is not None:
            raise select_error
        return qlinear

    for name in PRIVATE:
        monkeypatch.setitem(sys.modules, name, None if name == missing else types.ModuleType(name))
    if missing != "gptqmodel.models._const":
        sys.modules["gptqmodel.models._const"].DEVICE = str
    sys.modules["gptqmodel.quantization"].FORMAT = types.SimpleNamespace(GPTQ="gptq")
    sys.modules["gptqmodel.utils.backend"].BACKEND = str
    sys.modules["gptqmodel.utils.importer"].select_quant_linear = select
    monkeypatch.setattr(gptq_cuda, "unavailable", lambda device_type="cuda": None)  # as if on a CUDA machine
    monkeypatch.setattr(FakeQuantLinear, "seen", [])


def module(bits=4, group_size=64, act_order=False) -> PackedLinear:
    return PackedLinear.from_quantized(record(bits=bits, group_size=group_size, act_order=act_order),
                                       dtype=torch.float32)


class BrokenBuild(FakeQuantLinear):
    def post_init(self):
        raise RuntimeError("CUDA extension gptqmodel_exllama_kernels failed to build")


@pytest.mark.parametrize("failure,kind", [
    (dict(missing="gptqmodel.models._const"), "ModuleNotFoundError"),  # a private module moved in a release
    (dict(select_error=AttributeError("'BACKEND' has no attribute 'EXLLAMA_V2'")), "AttributeError"),
    (dict(select_error=TypeError("select_quant_linear() got an unexpected keyword argument 'pack_dtype'")),
     "TypeError"),
    (dict(qlinear=BrokenBuild), "RuntimeError"),
])
def test_any_import_or_build_failure_falls_back_with_the_reason(monkeypatch, failure, kind):
    fake_gptqmodel(monkeypatch, **failure)
    fast, reason = gptq_cuda.prepare(module())
    assert fast is None and reason.startswith("reference (gptqmodel unusable") and kind in reason


@pytest.mark.parametrize("act_order", [False, True])
def test_compute_dtype_follows_the_model(monkeypatch, act_order):
    fake_gptqmodel(monkeypatch)
    m = module(act_order=act_order)
    fast, used = gptq_cuda.prepare(m)
    assert used == "gptq_cuda"
    for dtype, kernel in [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                          (torch.float32, torch.bfloat16)]:
        FakeQuantLinear.seen.clear()
        x = torch.randn(3, m.in_features).to(dtype)
        y = fast(x)
        assert FakeQuantLinear.seen == [kernel] and y.dtype == dtype  # bf16 models are never squeezed into fp16
        want = x.double() @ m.quantized_part(torch.float64).t()
        assert (y.double() - want).abs().max() <= gptq_cuda.PROBE_RTOL * want.abs().max()


def test_a_dtype_the_kernel_fails_takes_the_reference_path(monkeypatch):
    class Fp16Only(FakeQuantLinear):
        dtypes = (torch.float16,)

    fake_gptqmodel(monkeypatch, qlinear=Fp16Only)
    m = module()
    fast, used = gptq_cuda.prepare(m)
    assert used.startswith("gptq_cuda (bfloat16 inputs on the reference path: RuntimeError")
    x = torch.randn(3, m.in_features, dtype=torch.bfloat16)
    assert torch.equal(fast(x), F.linear(x, m.quantized_part(torch.bfloat16)))


def test_a_kernel_that_computes_something_else_is_refused(monkeypatch):
    class Wrong(FakeQuantLinear):
        def forward(self, x):
            return super().forward(x) * 1.5

    fake_gptqmodel(monkeypatch, qlinear=Wrong)
    fast, used = gptq_cuda.prepare(module())
    assert fast is None and "differs from the reference" in used
