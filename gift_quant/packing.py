"""The linear that runs straight from the packed checkpoint tensors (layout: :mod:`gift_quant.bitpack`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant import cpu_int4
from gift_quant.bitpack import block_shape, pack_codes, pack_zeros, packed_rows, unpack_codes, unpack_zeros
from gift_quant.embedding import QuantizedLMHead
from gift_quant.kernels import FAST_DTYPES, KERNELS, build_fast
from gift_quant.memory import trim_heap
from gift_quant.pinning import PinnedDtype
from gift_quant.quantized import QuantizedWeight

class PackedLinear(PinnedDtype):
    """y = x W_qᵀ + x[..., S] W_Sᵀ + b, the quantized part W_q computed from the packed codes.

    The buffers are exactly the checkpoint's tensors (``state_dict()`` is what export writes). ``scales`` and
    ``salient_weight`` stay fp16 under ``model.to(dtype)`` (only device moves apply): they are the stored values,
    and a cast to bf16 would round them. ``dtype`` is the bias's (the model's compute dtype); the forward computes
    in the input's dtype.

    W_q x runs on a fast kernel for the device when one fits (``kernel="auto"``, see :mod:`gift_quant.kernels`;
    ``kernel_used`` names it, or says why not) and otherwise on the reference path: W_q dequantized from the codes
    at every forward. ``cache_dense=True`` keeps the reference path's dequantized weight between forwards (speed for
    memory).

    Codes resident once: when the fast form is the CPU int4 kernel's, which gives the codes back exactly
    (:func:`gift_quant.cpu_int4.codes`), ``qweight`` is released (an empty stand-in) and every reader of the codes
    (``codes()``, hence the reference path, ``check``, ``to_quantized_weight``; ``state_dict`` and export, which
    get the checkpoint tensor bit for bit) reads them from the kernel form. Device moves, ``load_state_dict`` and a
    rebuild put ``qweight`` back first.
    """

    _PINNED = ("scales", "salient_weight")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        n_groups: int,
        n_salient: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        cache_dense: bool = False,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        block_shape(bits)  # validates bits
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.cache_dense = cache_dense
        self.kernel = kernel
        self.kernel_used = "not built yet"
        self._fast: tuple[tuple, Any] = ((), None)  # (buffer key, fast matmul or None)
        self._stub: torch.Tensor | None = None  # qweight's empty stand-in while the fast form holds the codes
        self._dense: torch.Tensor | None = None
        self._order_key: tuple | None = None
        self._order_ok = False
        i32 = dict(dtype=torch.int32, device=device)
        f16 = dict(dtype=torch.float16, device=device)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_rows(out_features, bits), **i32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, **f16))
        self.register_buffer("g_idx", torch.zeros(in_features, **i32))
        self.register_buffer("salient_idx", torch.zeros(n_salient, **i32))
        self.register_buffer("salient_weight", torch.zeros(out_features, n_salient, **f16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16
    ) -> "PackedLinear":
        out_features, in_features = qw.shape
        sal = qw.salient_idx.long()
        if sal.numel() and not torch.equal(qw.codes[:, sal].to(torch.float32), qw.zeros[:, qw.g_idx[sal].long()]):
            raise ValueError("salient columns must carry code == zero point (quantized part exactly 0)")
        for name, t in (("scales", qw.scales), ("salient_weight", qw.salient_weight)):
            if not torch.isfinite(t.to(torch.float16)).all():
                raise ValueError(f"{name} overflows float16")
        m = cls(
            in_features, out_features, bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
            n_groups=qw.scales.shape[1], n_salient=sal.numel(), bias=bias is not None, dtype=dtype,
            device=qw.codes.device,
        )
        m.qweight.copy_(pack_codes(qw.codes, qw.bits))
        m.qzeros.copy_(pack_zeros(qw.zeros, qw.bits))
        m.scales.copy_(qw.scales.t())
        m.g_idx.copy_(qw.g_idx)
        m.salient_idx.copy_(sal)
        m.salient_weight.copy_(qw.salient_weight)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def codes(self) -> torch.Tensor:
        if self._released():
            return cpu_int4.codes(self._fast[1], self.in_features)
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        return unpack_zeros(self.qzeros, self.bits, self.out_features)

    def quantized_part(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized low-bit weight (out, in), salient columns exactly 0; the same float32 arithmetic as
        ``QuantizedWeight.quantized_part`` so a reloaded model reproduces the in-memory one bit for bit."""
        codes, zeros = self.codes().to(torch.float32), self.zeros()
        scales = self.scales.t().to(torch.float32).contiguous()
        if self._groups_in_order():
            # Same elementwise products as the gather below, broadcast per group instead of indexed per column.
            n_groups = scales.shape[1]
            w = scales.unsqueeze(2) * (codes.view(self.out_features, n_groups, -1) - zeros.unsqueeze(2))
            w = w.reshape(self.out_features, self.in_features)
        else:
            g = self.g_idx.long()
            w = scales[:, g] * (codes - zeros[:, g])
        # Row-major like the record's: F.linear on a column-major weight takes another BLAS path (other rounding).
        return w.to(dtype).contiguous()

    def _groups_in_order(self) -> bool:
        """Whether column j is in group j // (in / n_groups) (no act-order permutation); cached per g_idx version
        (``prepare`` fills the cache, which a compiled graph reads as it was when traced)."""
        if torch.compiler.is_compiling():
            return self._order_ok
        key = (self.g_idx.data_ptr(), self.g_idx._version, self.scales.shape[0])
        if self._order_key != key:
            n_groups = self.scales.shape[0]
            width = self.in_features // n_groups if n_groups else 0
            self._order_ok = bool(
                width * n_groups == self.in_features
                and torch.equal(self.g_idx.long(), torch.arange(self.in_features, device=self.g_idx.device) // width)
            )
            self._order_key = key
        return self._order_ok

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_dense:
            return self.quantized_part(dtype)
        if self._dense is None or self._dense.dtype != dtype or self._dense.device != self.qweight.device:
            self._dense = self.quantized_part(dtype)
        return self._dense

    def clear_cache(self) -> None:
        self._dense = None

    def _buffers_key(self) -> tuple:
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return (self.kernel, self.qweight.device, *((t.data_ptr(), t._version) for t in tensors))

    def prepare(self) -> str:
        """Build the fast form for the current buffers and device if they changed; returns ``kernel_used``."""
        if self._fast[0] != self._buffers_key():
            self._groups_in_order()  # refreshed with the form: what a compiled graph reads
            self._drop_fast()  # before building the new one (peak memory)
            fast, self.kernel_used = build_fast(self)
            self._fast = (self._buffers_key(), fast)
            self._release()
        return self.kernel_used

    def _drop_fast(self) -> None:
        self._restore()  # the old form may hold the only copy of the codes
        self._fast = ((), None)

    def _released(self) -> bool:
        """Whether ``qweight`` is the stand-in (not a tensor someone has put there since)."""
        return self._stub is not None and self._buffers.get("qweight") is self._stub

    def _release(self) -> None:
        """Free ``qweight`` when the fast form can give its codes back exactly (the CPU int4 form, whose layout
        was read back at build): the codes are then resident once, in the kernel's half byte per weight."""
        fast = self._fast[1]
        if not isinstance(fast, cpu_int4.Int4Weight) or not fast.readable:
            return
        self._stub = self._buffers["qweight"] = self.qweight.new_empty(0)
        self._fast = (self._buffers_key(), fast)  # keyed on the stand-in: it does not trigger a rebuild

    def _restore(self) -> None:
        """Put the checkpoint tensor back into ``qweight`` if it was released (before it moves, loads or
        rebuilds: those read or replace ``qweight`` itself)."""
        if self._released():
            self._buffers["qweight"] = self._packed_codes()
        self._stub = None

    def _packed_codes(self) -> torch.Tensor:
        """The checkpoint's ``qweight``, bit for bit: the codes of a kernel form that fits are a multiple of 32
        columns (whole int32 words, no padding), so packing them again gives back every bit."""
        return pack_codes(self.codes(), self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        fast = None
        if x.dtype in FAST_DTYPES and not (x.requires_grad and torch.is_grad_enabled()):
            if not torch.compiler.is_compiling():  # a compiled graph keeps the form it was traced with
                self.prepare()
            fast = self._fast[1]
        if fast is None:
            y = F.linear(x, self._dense_weight(x.dtype), bias)
            if self.salient_idx.numel():  # a small dense (out × k) matmul on every path
                y = y + F.linear(x.index_select(-1, self.salient_idx), self.salient_weight.to(x.dtype))
            return y
        y = fast(x, bias)
        if self.salient_idx.numel():
            # In float32 from the stored fp16 values: on the CPU a few-row bf16 GEMM costs several times the float32
            # one (≈ half of a decode step's linear time), and the fp16 weights are not rounded to bf16 on the way.
            x_s = x.index_select(-1, self.salient_idx).reshape(-1, self.salient_idx.numel())
            y.view(-1, self.out_features).add_(torch.mm(x_s.float(), self.salient_weight.t().float()))
        return y

    def to_quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            codes=self.codes(),
            scales=self.scales.t().to(torch.float32).contiguous(),
            zeros=self.zeros(),
            g_idx=self.g_idx.clone(),
            salient_idx=self.salient_idx.to(torch.int64),
            salient_weight=self.salient_weight.to(torch.float32),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
        )

    def check(self) -> None:
        """Value checks the shapes cannot express; raises ValueError naming the first problem."""
        n_groups = self.scales.shape[0]
        if self.in_features and (self.g_idx.min() < 0 or self.g_idx.max() >= n_groups):
            raise ValueError(f"g_idx outside [0, {n_groups})")
        sal = self.salient_idx.long()
        if sal.numel() and (sal[0] < 0 or sal[-1] >= self.in_features or (sal.diff() <= 0).any()):
            raise ValueError("salient_idx must be strictly increasing within [0, in_features)")
        if not torch.isfinite(self.scales).all() or not torch.isfinite(self.salient_weight).all():
            raise ValueError("non-finite scales or salient weights")
        zeros = self.zeros()
        if self.sym and (zeros != 2 ** (self.bits - 1)).any():
            raise ValueError(f"sym=True but zero points differ from {2 ** (self.bits - 1)}")
        if sal.numel():
            zeros = zeros[:, self.g_idx[sal].long()]
            if not torch.equal(self.codes()[:, sal].to(torch.float32), zeros):
                raise ValueError("salient columns do not carry code == zero point")

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.clear_cache()
        if self._released() and fn(self._stub) is not self._stub:
            self._restore()  # a move (or any new tensor): the codes travel as the checkpoint tensor
        super()._apply(fn, recurse)  # PinnedDtype: scales and salient weights keep their stored fp16
        if self._fast[0] != self._buffers_key():  # moved: the old device's fast form is stale
            self._drop_fast()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self.clear_cache()
        self._restore()  # qweight needs its shape to load into, and its codes if the state dict lacks it
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released():  # the checkpoint tensor, not the stand-in
            destination[prefix + "qweight"] = self._packed_codes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, k={self.salient_idx.numel()}, bias={self.bias is not None}"
        )


def packed_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_kernel(model: nn.Module, kernel: str = "auto") -> Counter:
    """Choose the kernel of every PackedLinear of ``model`` and build the fast forms now (so they are part of the
    memory after loading, not of the first forward), and that of a quantized lm_head (which picks its path at each
    forward, by rows and format). Returns how many linears run on each path."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for m in model.modules():
        if isinstance(m, QuantizedLMHead):
            m.kernel = kernel
            m.prepare()
    modules = packed_linears(model).values()
    used = Counter()
    for m in modules:
        m.kernel = kernel
        used[m.prepare()] += 1
    trim_heap()
    return used
