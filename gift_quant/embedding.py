"""The quantized token embedding and lm_head of a packed export (the largest tensor of a small-vocabulary model).

Formats, symmetric (absmax) and without zero points, as llama.cpp's Q8_0/Q4_0 are:

* ``int8``: one scale per row, codes in [-127, 127], stored ``qweight`` int8 (vocab, hidden).
* ``int4``: one scale per ``group_size`` columns of a row (the last group may be shorter), codes in [-7, 7] stored
  as unsigned nibbles ``code + 8``, two per byte (even column in the low nibble): ``qweight`` uint8
  (vocab, ⌈hidden/2⌉).

``scales`` are fp16 (vocab, n_groups), rounded *up* from absmax/qmax, so no code ever needs clamping and every
weight is within scale/2 of its dequantized value; code × scale is exact in float32 (7 + 11 significant bits).

:class:`QuantizedEmbedding` gathers the rows of the ids and dequantizes only those (the same elementwise products
as the whole dequantized matrix). :class:`QuantizedLMHead` keeps no dequantized copy either (tied, it reads the
embedding's tensors: they are stored once): a few rows (decode) run gift_quant's ops (:mod:`gift_quant.cpu_rows`:
activations to int16 per block, the same bits on every CPU) or, for int8 where they cannot be built, torch's
(``_weight_int8pack_mm``: bf16, summed in an ISA-dependent order, close to float64), more rows
multiply vocabulary chunks dequantized one at a time (the reference's float32 products), and ``kernel="reference"``
(or autograd) multiplies the whole dequantized matrix like an ``nn.Linear`` holding it, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant import cpu_rows
from gift_quant.errors import CheckpointError
from gift_quant.kernels import FAST_DTYPES
from gift_quant.memory import scratch
from gift_quant.pinning import PinnedDtype

FORMATS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
STORED_DTYPES = {"int8": torch.int8, "int4": torch.uint8}
_FP16_MAX = torch.finfo(torch.float16).max
KERNEL_ROWS = 16  # the most rows torch's int8 kernel runs (crossover with the chunks measured on a 2-core AVX-512)
CHUNK_VALUES = 2**20  # weights dequantized per lm_head chunk: 4 MB in float32, about the packed linears' buffer


# ----------------------------------------------------------------------------------------------------------------
# Quantize / dequantize (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def n_groups(hidden: int, fmt: str, group_size: int | None) -> int:
    return 1 if fmt == "int8" else -(-hidden // group_size)


def quantize_rows(weight: torch.Tensor, fmt: str, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a (rows, hidden) float matrix in ``fmt``; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"embedding format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "int4" and (group_size is None or group_size < 1):
        raise ValueError("int4 embeddings need a positive group_size")
    rows, hidden = weight.shape
    width = hidden if fmt == "int8" else group_size
    groups = n_groups(hidden, fmt, group_size)
    w = F.pad(weight.detach().to(torch.float64), (0, groups * width - hidden)).view(rows, groups, width)
    scales = _round_up_fp16(w.abs().amax(dim=2) / QMAX[fmt])  # (rows, groups)
    if not torch.isfinite(scales).all():
        raise ValueError(f"embedding values beyond {QMAX[fmt] * _FP16_MAX:.3g} do not fit float16 scales")
    s = scales.to(torch.float64).unsqueeze(2)
    codes = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
    codes = codes.clamp(-QMAX[fmt], QMAX[fmt]).to(torch.int8).view(rows, groups * width)[:, :hidden]
    return (codes.contiguous() if fmt == "int8" else pack_nibbles(codes)), scales


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ≥ x (x ≥ 0, float64), so that |w| / scale ≤ qmax."""
    h = x.to(torch.float16)
    low = h.to(torch.float64) < x
    return torch.where(low, torch.nextafter(h, torch.tensor(math.inf, dtype=torch.float16)), h)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (rows, hidden) -> uint8 (rows, ⌈hidden/2⌉), code + 8, even column low."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    u = F.pad(u, (0, u.shape[1] % 2), value=8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :hidden]


def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, hidden: int,
                    group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float (..., hidden) from (..., hidden-or-packed) codes and (..., groups) scales; float32 products (exact)."""
    codes = (qweight if fmt == "int8" else unpack_nibbles(qweight, hidden)).to(torch.float32)
    groups = scales.shape[-1]
    width = hidden if fmt == "int8" else group_size
    codes = F.pad(codes, (0, groups * width - hidden)).unflatten(-1, (groups, width))
    w = (codes * scales.to(torch.float32).unsqueeze(-1)).flatten(-2)[..., :hidden]
    return w.to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


def _register_rows(module: nn.Module, rows: int, width: int, fmt: str, group_size: int | None,
                   device: torch.device | str | None) -> None:
    """Empty ``qweight`` (rows, codes of ``width`` values: int8, or two 4-bit codes a byte) and fp16 ``scales``
    buffers, for the checkpoint's tensors to load into."""
    stored = width if fmt == "int8" else -(-width // 2)
    module.register_buffer("qweight", torch.zeros(rows, stored, dtype=STORED_DTYPES[fmt], device=device))
    groups = n_groups(width, fmt, group_size)
    module.register_buffer("scales", torch.zeros(rows, groups, dtype=torch.float16, device=device))


class QuantizedEmbedding(PinnedDtype):
    """Drop-in for ``nn.Embedding`` (and Gemma's scaled subclass): rows gathered as codes, then dequantized into
    ``dtype`` (the model's compute dtype, which follows ``model.to(dtype)``; the fp16 scales stay fp16)."""

    _PINNED = ("scales",)

    def __init__(self, num_embeddings: int, embedding_dim: int, *, fmt: str, group_size: int | None = None,
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.fmt, self.group_size, self.padding_idx = fmt, group_size, padding_idx
        self.scalar_embed_scale = embed_scale  # Gemma multiplies the rows by sqrt(hidden)
        self.dtype = dtype
        _register_rows(self, num_embeddings, embedding_dim, fmt, group_size, device)

    @classmethod
    def from_embedding(cls, emb: nn.Module, fmt: str, group_size: int | None = None,
                       weight: torch.Tensor | None = None) -> "QuantizedEmbedding":
        """Quantize ``emb``'s weight (or ``weight``, e.g. a dequantized one) into a new module."""
        w = emb.weight if weight is None else weight
        m = cls.like(emb, fmt, group_size, dtype=w.dtype, device=w.device)
        m.qweight, m.scales = quantize_rows(w, fmt, group_size)
        return m

    @classmethod
    def like(cls, emb: nn.Module, fmt: str, group_size: int | None, dtype: torch.dtype,
             device: torch.device | str | None) -> "QuantizedEmbedding":
        """An empty module shaped like ``emb`` (a meta skeleton's embedding while transformers loads)."""
        return cls(emb.num_embeddings, emb.embedding_dim, fmt=fmt, group_size=group_size,
                   padding_idx=emb.padding_idx, embed_scale=getattr(emb, "scalar_embed_scale", None), dtype=dtype,
                   device=device)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.qweight, self.scales, self.fmt, self.embedding_dim, self.group_size,
                               dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = dequantize_rows(self.qweight.index_select(0, flat), self.scales.index_select(0, flat), self.fmt,
                               self.embedding_dim, self.group_size, self.dtype)
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        if self.scalar_embed_scale is not None:  # as Gemma's module: a float32 0-d tensor cast to the dtype
            rows = rows * torch.tensor(self.scalar_embed_scale, device=rows.device).to(self.dtype)
        return rows

    def check(self) -> None:
        if not torch.isfinite(self.scales).all() or (self.scales < 0).any():
            raise ValueError("embedding scales must be finite and non-negative")
        if self.fmt == "int8" and (self.qweight == -128).any():
            raise ValueError("int8 embedding codes must lie in [-127, 127]")

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows model.to(dtype); device moves keep it
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        gs = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}{gs}"


class QuantizedLMHead(PinnedDtype):
    """Drop-in for a bias-free ``lm_head`` ``nn.Linear``: logits = x · dequantized(W)ᵀ in the input's dtype, on
    the path the module docstring describes (``kernel``: ``auto`` or ``reference``, set by
    :func:`gift_quant.packing.set_kernel`).

    Tied, it owns no tensors and reads those of ``tied_to`` (a :class:`QuantizedEmbedding` of the same model, not
    registered as a child: the state dict holds the tensors once, and device moves reach them through the model)."""

    _PINNED = ("scales",)

    def __init__(self, in_features: int, out_features: int, *, fmt: str, group_size: int | None = None,
                 tied_to: QuantizedEmbedding | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size = fmt, group_size
        self.kernel = "auto"
        self._kernel_scales: tuple[tuple, torch.Tensor | None] = ((), None)  # (key of the scales, bf16 copy)
        self.__dict__["tied_to"] = tied_to  # plain attribute: not a submodule
        if tied_to is None:
            _register_rows(self, out_features, in_features, fmt, group_size, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int | None = None,
                    weight: torch.Tensor | None = None) -> "QuantizedLMHead":
        w = linear.weight if weight is None else weight
        m = cls(linear.in_features, linear.out_features, fmt=fmt, group_size=group_size, device=w.device)
        m.qweight, m.scales = quantize_rows(w, fmt, group_size)
        return m

    @property
    def tied(self) -> bool:
        return self.tied_to is not None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.tied_to if self.tied else self
        return src.qweight, src.scales

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qweight, scales = self.tensors()
        return dequantize_rows(qweight, scales, self.fmt, self.in_features, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference" or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.dequantized(x.dtype))  # a transient dense copy, as the in-memory model's
        if self._few_rows_fit(x):
            return self._few_rows(x)
        return self._chunked(x)

    def _few_rows_fit(self, x: torch.Tensor) -> bool:
        """Whether a few-row kernel runs these logits: few rows on the CPU, on gift_quant's ops (int8; int4 with an
        even group of at most ``MAX_GROUP4`` columns) or, for int8 where they cannot be built, on torch's, which
        also needs ``in_features`` a multiple of 16 (its vector loops read whole blocks of 16 columns: other widths
        read past the rows, seen with torch 2.13)."""
        qweight, _ = self.tensors()
        if not (x.device.type == "cpu" and x.dtype in FAST_DTYPES and x.numel() > 0 and qweight.is_contiguous()):
            return False
        if not cpu_rows.READY and not torch.compiler.is_compiling():
            cpu_rows.load()  # the first few-row forward of the process builds or loads the ops (then a no-op)
        if x.numel() > self.kernel_rows() * self.in_features:
            return False
        if self.fmt == "int4":
            return cpu_rows.READY and self.group_size % 2 == 0 and self.group_size <= cpu_rows.MAX_GROUP4
        return cpu_rows.READY or (self.in_features % 16 == 0 and hasattr(torch, "_weight_int8pack_mm"))

    @staticmethod
    def kernel_rows() -> int:
        """The most rows the few-row kernel runs: gift_quant's ops cost ~1.6 ms a row on SmolLM2's head and pass
        the chunks' cost at ~8 rows, torch's int8 kernel at ~16."""
        return cpu_rows.MAX_ROWS if cpu_rows.READY else KERNEL_ROWS

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the codes and scales: on gift_quant's ops (:mod:`gift_quant.cpu_rows`: activations to int16
        per block, exact integer sums, float32 out) when they are built, else (int8) on torch's kernel (bf16:
        activations and scales rounded to it, as torch's int4 kernel for the linears does)."""
        qweight, scales = self.tensors()
        flat = x.reshape(-1, self.in_features)
        if cpu_rows.READY:
            y = (cpu_rows.rows_mm(flat, qweight, scales) if self.fmt == "int8"
                 else cpu_rows.rows_mm4(flat, qweight, scales, self.group_size))
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        # A fresh copy: the kernel's vector loads need 32-byte aligned rows (a view into x may not be aligned).
        aligned = torch.empty(flat.shape, dtype=torch.bfloat16)
        aligned.copy_(flat)
        y = torch._weight_int8pack_mm(aligned, qweight, self.kernel_scales())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def prepare(self) -> None:
        """Make the few-row kernel ready before the first forward (not inside a compiled graph's tracing): build or
        load gift_quant's ops, else keep torch's int8 kernel's bf16 scales."""
        if self.tensors()[0].device.type != "cpu":
            return
        if cpu_rows.load() is not None and self.fmt == "int8":
            self.kernel_scales()

    def kernel_scales(self) -> torch.Tensor:
        """The int8 kernel's bf16 scales (vocab,), kept between forwards (2 bytes a row): a compiled graph needs
        them as a tensor of their own (Inductor's lowering of the kernel takes no cast as input), and it reads the
        copy made when it was traced (:func:`gift_quant.packing.set_kernel` makes one)."""
        if not torch.compiler.is_compiling():
            _, scales = self.tensors()
            key = (scales.data_ptr(), scales._version, scales.device)
            if self._kernel_scales[0] != key:
                self._kernel_scales = (key, scales.view(-1).to(torch.bfloat16))
        return self._kernel_scales[1]

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        """The logits a chunk of vocabulary rows at a time, each chunk dequantized into the thread's reusable
        buffers: no dense copy of the weight stays resident, and the transient one is a chunk."""
        flat = x.reshape(-1, self.in_features)
        out = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        step = max(1, CHUNK_VALUES // self.in_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            torch.mm(flat, self._rows(start, stop, x.dtype).t(), out=out[:, start:stop])
        return out.view(*x.shape[:-1], self.out_features)

    def _rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the dequantized weight in ``dtype``: the float32 products of ``dequantized``
        (exact), then rounded to ``dtype``; in scratch buffers, valid until the next chunk."""
        qweight, scales = (t[start:stop] for t in self.tensors())
        shape = (stop - start, self.in_features)
        w = scratch(shape[0] * shape[1], torch.float32, qweight.device).view(shape)
        if self.fmt == "int8":  # in place, no temporaries: one scale per row
            w.copy_(qweight).mul_(scales.to(torch.float32))
        else:
            w.copy_(dequantize_rows(qweight, scales, self.fmt, self.in_features, self.group_size))
        if dtype == torch.float32:
            return w
        return scratch(w.numel(), dtype, w.device).view(shape).copy_(w)

    def check(self) -> None:
        if not self.tied:
            QuantizedEmbedding.check(self)  # the same value rules

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, tied={self.tied}"


# ----------------------------------------------------------------------------------------------------------------
# The export record (``quantization_config["embedding"]``): writing and loading
# ----------------------------------------------------------------------------------------------------------------

FLOAT_FORMATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def find_embeddings(model: nn.Module) -> tuple[str, nn.Module, str | None, nn.Module | None]:
    """(name, module) of the input embedding and of the lm_head (None when there is none or it has a bias)."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or id(emb) not in names:
        raise ValueError(f"{type(model).__name__} has no input embedding module")
    if head is None or id(head) not in names or getattr(head, "bias", None) is not None:
        return names[id(emb)], emb, None, None
    return names[id(emb)], emb, names[id(head)], head


def _weight(m: nn.Module) -> torch.Tensor:
    return m.dequantized(torch.float32) if hasattr(m, "dequantized") else m.weight.detach()


def _is_tied(emb: nn.Module, head: nn.Module) -> bool:
    if isinstance(head, QuantizedLMHead):
        return head.tied_to is emb
    w, e = getattr(head, "weight", None), getattr(emb, "weight", None)
    return w is not None and e is not None and w.data_ptr() == e.data_ptr()


def export_tensors(model: nn.Module, fmt: str | None, group_size: int | None = None
                   ) -> tuple[dict[str, torch.Tensor], set[str], dict | None]:
    """What a packed export writes for the embedding and lm_head in ``fmt`` (int8, int4, float16, bfloat16; None
    keeps a quantized embedding's own format and otherwise changes nothing): (tensors, the module prefixes they
    replace in the state dict, the ``quantization_config["embedding"]`` record). A tied pair is written once."""
    emb_name, emb, head_name, head = find_embeddings(model)
    if fmt is None:
        if not isinstance(emb, QuantizedEmbedding):
            return {}, set(), None
        fmt, group_size = emb.fmt, emb.group_size
    if fmt not in (*FORMATS, *FLOAT_FORMATS):
        raise ValueError(f"embedding format must be one of {(*FORMATS, *FLOAT_FORMATS)}, got {fmt!r}")
    tied = head is not None and _is_tied(emb, head)
    gs = group_size if fmt == "int4" else None
    pairs = [(emb_name, _weight(emb))] + ([(head_name, _weight(head))] if head is not None and not tied else [])
    tensors = {}
    for name, w in pairs:
        if fmt in FLOAT_FORMATS:
            t = w.to(FLOAT_FORMATS[fmt])
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}.weight overflows {fmt}; export with embedding: int8 or bfloat16")
            tensors[f"{name}.weight"] = t.contiguous()
        else:
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = quantize_rows(w, fmt, gs)
    record = {"format": fmt, "group_size": gs, "module": emb_name, "lm_head": head_name, "tied": tied,
              "shape": list(pairs[0][1].shape)}
    return tensors, {emb_name, *([head_name] if head_name else [])}, record


def dense_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str], bool | None]:
    """For a plain (dense) export of a model with a quantized embedding: the dequantized ``weight`` tensors, the
    prefixes they replace, and whether the lm_head is tied (None: nothing to change)."""
    emb_name, emb, head_name, head = find_embeddings(model)
    if not isinstance(emb, QuantizedEmbedding) and not isinstance(head, QuantizedLMHead):
        return {}, set(), None
    tied = head is not None and _is_tied(emb, head)
    tensors = {f"{emb_name}.weight": _weight(emb)}
    if head is not None and not tied:
        tensors[f"{head_name}.weight"] = _weight(head)
    return tensors, {emb_name, *([head_name] if head_name else [])}, tied


def _record(qc: dict) -> dict | None:
    rec = qc.get("embedding")
    if rec is None:
        return None  # a checkpoint from before the field: the embedding is a plain tensor in qc["dtype"]
    ok = (isinstance(rec, dict) and rec.get("format") in (*FORMATS, *FLOAT_FORMATS)
          and isinstance(rec.get("module"), str) and isinstance(rec.get("tied"), bool)
          and (rec.get("format") != "int4" or (isinstance(rec.get("group_size"), int) and rec["group_size"] > 0)))
    if not ok:
        raise CheckpointError(f"quantization_config.embedding is malformed: {rec!r}")
    return rec


def stored_dtypes(qc: dict) -> dict[str, torch.dtype]:
    """key -> dtype the checkpoint must hold for the embedding and lm_head tensors (empty for old checkpoints)."""
    rec = _record(qc)
    if rec is None:
        return {}
    names = [rec["module"]] + ([rec["lm_head"]] if rec.get("lm_head") and not rec["tied"] else [])
    if rec["format"] in FLOAT_FORMATS:
        return {f"{n}.weight": FLOAT_FORMATS[rec["format"]] for n in names}
    return {k: v for n in names for k, v in ((f"{n}.qweight", STORED_DTYPES[rec["format"]]),
                                               (f"{n}.scales", torch.float16))}


def install(model: nn.Module, qc: dict, dtype: torch.dtype) -> None:
    """Swap the embedding (and lm_head) of a skeleton for empty quantized modules shaped by the record, on their
    own device (meta while transformers loads); nothing for float formats and old checkpoints."""
    rec = _record(qc)
    if rec is None or rec["format"] in FLOAT_FORMATS:
        return
    fmt, gs = rec["format"], rec.get("group_size")
    emb = _submodule(model, rec["module"], nn.Embedding)
    qemb = QuantizedEmbedding.like(emb, fmt, gs, dtype=dtype, device=emb.weight.device)
    _replace(model, rec["module"], qemb)
    if rec.get("lm_head"):
        head = _submodule(model, rec["lm_head"], nn.Linear)
        if head.bias is not None:
            raise CheckpointError(f"{rec['lm_head']} has a bias: the quantized lm_head has none")
        _replace(model, rec["lm_head"], QuantizedLMHead(
            head.in_features, head.out_features, fmt=fmt, group_size=gs, tied_to=qemb if rec["tied"] else None,
            device=head.weight.device))


def check_values(model: nn.Module, qc: dict) -> None:
    rec = _record(qc)
    if rec is None or rec["format"] in FLOAT_FORMATS:
        return
    for name in filter(None, (rec["module"], rec.get("lm_head"))):
        try:
            model.get_submodule(name).check()
        except ValueError as err:
            raise CheckpointError(f"quantized {name}: {err}") from None


def _submodule(model: nn.Module, name: str, kind: type) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"embedding module {name} does not exist in a {type(model).__name__}") from None
    if not isinstance(m, kind):
        raise CheckpointError(f"{name} is a {type(m).__name__}, not {kind.__name__}")
    return m


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
