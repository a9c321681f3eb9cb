"""Write the packed GIFT-SW checkpoint (or the merged dense one), and the `export` stage.

The format, its manifest and loading live in :mod:`gift_quant.checkpoint`. Folders are written into a temporary
sibling and renamed into place, so a failed export leaves nothing that loads.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from gift_quant import embedding as emb_q
from gift_quant.checkpoint import (
    FORMAT_VERSION,
    INDEX,
    PACKED_DTYPES,
    PACKED_SUFFIXES,
    QUANT_METHOD,
    guard_keys,
    guard_tensors,
    tensor_headers,
    write_manifest,
)
from gift_quant.errors import UserError
from gift_quant.io_utils import check_replaceable
from gift_quant.layers import quantized_modules
from gift_quant.ownership import is_export, staged_export
from gift_quant.packing import PackedLinear
from gift_quant.quantized import QuantizedWeight

# Keys of quantization_config derived from the tensors; quant_info cannot override them.
_DERIVED = ("quant_method", "format_version", "checkpoint_format", "desc_act", "dtype", "modules", "module_overrides",
            "embedding")


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def export_packed(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    quant_info: dict,
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype = torch.float16,
    embedding: str | None = None,
    embedding_group_size: int | None = None,
) -> dict:
    """Write the packed checkpoint of ``model`` (whose quantized linears are any modules with
    ``to_quantized_weight()``) to ``out_dir``; returns ``{"path", "files", **size_report}``.

    ``quant_info`` is stored in ``quantization_config``: JSON-able recipe settings such as ``salient`` (selection
    metric and count) and ``rotation`` (the record of ``rotate_model``, restored on load). ``bits`` /
    ``group_size`` / ``sym``, if given, must agree with the linears; the tensor-derived keys are always recomputed,
    so a reloaded model's ``gift_quant_config`` can be passed back as is. Unquantized tensors are written in
    ``dtype``; the quantized linears' scales and salient weights are always fp16 (the GPTQ format).

    ``embedding`` stores the input embedding and the lm_head (tied: once) as ``int8`` (per row), ``int4`` (groups
    of ``embedding_group_size``; see :mod:`gift_quant.embedding`), ``float16`` or ``bfloat16``; None keeps an
    already quantized embedding's format and otherwise stores them in ``dtype`` like every other tensor.
    """
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no quantized linears (modules with to_quantized_weight()) to pack")
    records = {name: m.to_quantized_weight() for name, m in modules.items()}
    emb_tensors, replaced, emb_record = emb_q.export_tensors(model, embedding, embedding_group_size)
    tensors, tied = _plain_tensors(model, modules, dtype, skip=replaced)
    tensors.update(emb_tensors)
    for name, m in modules.items():
        packed = PackedLinear.from_quantized(records[name], getattr(m, "bias", None), dtype)
        tensors.update({f"{name}.{k}": v for k, v in packed.state_dict().items()})
    tensors.update(guard_tensors(modules))  # loading without gift_quant fails instead of returning random weights
    config = copy.deepcopy(model.config)
    config.quantization_config = _quantization_config(records, quant_info, dtype)
    if emb_record is not None:
        config.quantization_config["embedding"] = emb_record
        # A quantized tied pair is tied by the record (the lm_head reads the embedding's tensors), not by HF's
        # parameter tying, which would look for an embedding `weight`.
        tied = emb_record["tied"] and emb_record["format"] in emb_q.FLOAT_FORMATS
        config.tie_word_embeddings = tied
    files = _write_folder(model, config, tokenizer, tensors, Path(out_dir), max_shard_size, dtype, tied)
    return {"path": str(out_dir), "files": files, **size_report(out_dir)}


def export_dense(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    max_shard_size: int | str = "2GB",
) -> dict:
    """Write a plain HF checkpoint (``nn.Linear`` everywhere, dequantized weights with the salient columns written
    back) that ``AutoModelForCausalLM.from_pretrained`` loads; returns ``{"path", "files"}``."""
    _require_plain_structure(model)
    modules = quantized_modules(model)
    emb_tensors, replaced, emb_tied = emb_q.dense_tensors(model)  # a reloaded quantized embedding, dequantized
    tensors, tied = _plain_tensors(model, modules, dtype, skip=replaced)
    if emb_tied is not None:
        tensors.update({k: v.to(dtype) for k, v in emb_tensors.items()})
        tied = emb_tied
    for name, m in modules.items():
        tensors[f"{name}.weight"] = m.to_quantized_weight().dequantize(torch.float32).to(dtype)
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(dtype)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if emb_tied:
        config.tie_word_embeddings = True
    files = _write_folder(model, config, tokenizer, tensors, Path(out_dir), max_shard_size, dtype, tied)
    return {"path": str(out_dir), "files": files}


def _require_plain_structure(model: nn.Module) -> None:
    """A dense checkpoint holds only what transformers rebuilds from the config: refuse models carrying extra
    modules (online rotations, adapters), whose computation would silently be lost."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a from_pretrained gift_sw model: rebuild the plain architecture
        del config.quantization_config
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    extra = {n for n, _ in model.named_modules()} - {n for n, _ in reference.named_modules()}
    # Children of quantized linears (none today) are part of the linear being merged.
    extra = {n for n in extra if not any(n.startswith(f"{q}.") for q in quantized_modules(model))}
    if extra:
        raise ValueError(f"cannot write a plain checkpoint: the model has modules transformers would not rebuild: "
                         f"{sorted(extra)[:3]} (export the packed format instead)")


def _plain_state(model: nn.Module, modules: dict[str, nn.Module], skip: set[str] = frozenset()
                 ) -> tuple[dict[str, torch.Tensor], bool]:
    """Every state-dict tensor outside the quantized linears (and the ``skip`` modules), with tied targets (HF's
    ``lm_head.weight``) dropped when they really share the source's storage. Returns (tensors, tied)."""
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{q}.") for q in (*modules, *skip))}
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    tied = bool(ties) and all(
        t in state and s in state and state[t].data_ptr() == state[s].data_ptr() for t, s in ties.items()
    )
    return ({k: v.detach() for k, v in state.items() if not (tied and k in ties)}, tied)


def _plain_tensors(
    model: nn.Module, modules: dict[str, nn.Module], dtype: torch.dtype, skip: set[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], bool]:
    """``_plain_state`` with floating tensors cast to ``dtype`` (refusing overflow)."""
    state, tied = _plain_state(model, modules, skip)
    out = {}
    for key, t in state.items():
        if t.is_floating_point():
            t = t.to(dtype)
            if not torch.isfinite(t).all():
                raise ValueError(f"{key} overflows {dtype}; export with dtype=torch.bfloat16")
        out[key] = t.contiguous()
    return out, tied


def _quantization_config(records: dict[str, QuantizedWeight], quant_info: dict, dtype: torch.dtype) -> dict:
    """quant_info (recipe settings: salient selection, rotation record, ...) plus what the tensors determine.

    bits / group_size / sym are the most common values among the linears; linears that differ are listed in
    ``module_overrides``. quant_info values for these three must agree, so a stale recipe cannot mislabel tensors.
    """
    info = json.loads(json.dumps(quant_info, default=str))
    settings = {n: {"bits": r.bits, "group_size": r.group_size, "sym": r.sym} for n, r in records.items()}
    common = dict(Counter(tuple(s.items()) for s in settings.values()).most_common(1)[0][0])
    for key, value in common.items():
        if key in info and info[key] != value:
            raise ValueError(f"quant_info says {key}={info[key]!r} but the quantized linears have {key}={value!r}")
    desc_act = any(not torch.equal(r.g_idx.cpu().long(), _default_g_idx(r)) for r in records.values())
    return {
        **{k: v for k, v in info.items() if k not in _DERIVED},
        **common,
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "checkpoint_format": "gptq",  # v1 packing: zeros stored minus one
        "desc_act": desc_act,
        "dtype": str(dtype).removeprefix("torch."),
        "rotation": info.get("rotation"),
        "modules": sorted(records),
        "module_overrides": {n: s for n, s in sorted(settings.items()) if s != common},
    }


def _default_g_idx(r: QuantizedWeight) -> torch.Tensor:
    in_features = r.shape[1]
    width = in_features if r.group_size == -1 else r.group_size
    return torch.arange(in_features) // width


def _write_folder(
    model: nn.Module,
    config: Any,
    tokenizer: Any,
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    max_shard_size: int | str,
    dtype: torch.dtype,
    tied: bool,
) -> list[str]:
    config.dtype = dtype
    if getattr(config, "tie_word_embeddings", False) and not tied:
        # The weights were not actually shared (e.g. a quantized lm_head): loading must not re-tie them.
        config.tie_word_embeddings = False
    with staged_export(out_dir) as tmp:  # the user's files beside an earlier export stay
        _write_tensors(tmp, tensors, max_shard_size)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        write_manifest(tmp)
        files = sorted(p.name for p in tmp.iterdir())
    return files


def _write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k].cpu() for k in keys}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_export_target(path: Path, output_dir: Path) -> None:
    """Refuse, before any work, an export path whose replacement could lose data: one that holds the working
    directory or the run's output folder, a file, or a folder that is not an earlier export."""
    from gift_quant.ownership import RUN_ENTRIES

    if Path(path).expanduser().is_symlink():  # replaced through the link, or a link to nowhere: never what was meant
        raise UserError(f"export path {path} is a symbolic link; give the folder itself")
    target = Path(path).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    for inside, what in ((Path.cwd().resolve(), "the working directory"), (out, "the output folder")):
        if target == inside or target in inside.parents:
            raise UserError(f"export path {path} contains {what}; export into a new subfolder instead")
    if target.is_relative_to(out) and target.relative_to(out).parts[0] in RUN_ENTRIES:
        raise UserError(f"export path {path} lies in {out / target.relative_to(out).parts[0]}, which the run writes "
                        f"itself; export into a new subfolder of the output folder")
    check_replaceable(target, is_export, "gift_quant export")


# ----------------------------------------------------------------------------------------------------------------
# Size accounting
# ----------------------------------------------------------------------------------------------------------------


def size_report(model_or_path: nn.Module | str | Path, embedding: str | None = None,
                embedding_group_size: int | None = None) -> dict:
    """Exact storage of the quantized linears and the whole checkpoint, by component.

    ``bits_per_weight`` = 8 · bytes of (qweight, qzeros, scales, g_idx, salient_idx, salient_weight) over the
    quantized linears' out·in weights (biases excluded: they are not weights and stay fp). ``fp16_bytes`` is the
    same model with every tensor in fp16 (tied weights once); ``ratio`` = checkpoint bytes / fp16 bytes, where
    checkpoint bytes are the safetensors files' sizes for a folder, or the tensor bytes an export would write
    (fp16 for everything unquantized, the embedding as ``embedding`` says: see :func:`export_packed`) for an
    in-memory model. ``bytes_by_component`` splits the tensor bytes (:func:`component_bytes`); the files hold them
    plus their JSON headers (``header_bytes``).
    """
    if isinstance(model_or_path, nn.Module):
        shapes, emb_names, record = _model_shapes(model_or_path, embedding, embedding_group_size)
    else:
        shapes = {k: (dt, shape) for k, (_, dt, shape) in tensor_headers(Path(model_or_path)).items()}
        emb_names, record = _folder_embedding_names(Path(model_or_path), shapes)
    quantized = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".qzeros")})
    components = component_bytes(shapes, quantized, emb_names)  # the guards' bytes count as "other": they are stored
    shapes = {k: v for k, v in shapes.items() if k not in guard_keys(quantized)}  # but are no model weight
    parts = {s: 0 for s in PACKED_SUFFIXES}
    n_weights = 0
    for name in quantized:
        for s in PACKED_SUFFIXES:
            dt, shape = shapes[f"{name}.{s}"]
            parts[s] += _nbytes(dt, shape)
        n_weights += shapes[f"{name}.g_idx"][1][0] * shapes[f"{name}.scales"][1][1]  # in · out
    packed_keys = {f"{n}.{s}" for n in quantized for s in PACKED_SUFFIXES}
    other = {k: v for k, v in shapes.items() if k not in packed_keys}
    fp16_elements = n_weights + sum(_numel(shape) for _, shape in other.values())
    fp16_elements -= _quantized_embedding_fp16_excess(shapes, emb_names, record)
    tensor_bytes = sum(components.values())
    if isinstance(model_or_path, nn.Module):
        checkpoint_bytes = tensor_bytes
    else:
        checkpoint_bytes = sum(p.stat().st_size for p in Path(model_or_path).glob("model*.safetensors"))
    quantized_bytes = sum(parts.values())
    return {
        "quantized_linears": len(quantized),
        "quantized_weights": n_weights,
        "quantized_bytes": quantized_bytes,
        "quantized_bytes_by_tensor": parts,
        "bits_per_weight": 8 * quantized_bytes / n_weights if n_weights else None,
        "bytes_by_component": components,
        "header_bytes": checkpoint_bytes - tensor_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "fp16_bytes": 2 * fp16_elements,
        "ratio": checkpoint_bytes / (2 * fp16_elements) if fp16_elements else None,
    }


COMPONENTS = ("linear_codes", "linear_salient", "linear_scales_zeros", "embedding", "lm_head", "other")


def component_bytes(shapes: dict, quantized: list[str], emb_names: dict[str, str]) -> dict[str, int]:
    """Tensor bytes per component: the quantized linears' codes (qweight, g_idx), salient columns (indices and
    weights) and grid (scales, qzeros); the embedding and the untied lm_head (``emb_names``: module -> component,
    whatever their format); everything else (norms, biases, ...)."""
    kind = {"qweight": "linear_codes", "g_idx": "linear_codes", "salient_idx": "linear_salient",
            "salient_weight": "linear_salient", "scales": "linear_scales_zeros", "qzeros": "linear_scales_zeros"}
    linears = set(quantized)
    out = dict.fromkeys(COMPONENTS, 0)
    for key, (dt, shape) in shapes.items():
        module, _, suffix = key.rpartition(".")
        part = kind[suffix] if module in linears and suffix in kind else emb_names.get(module, "other")
        out[part] += _nbytes(dt, shape)
    return out


def _quantized_embedding_fp16_excess(shapes: dict, emb_names: dict[str, str], record: dict | None) -> int:
    """Elements that a quantized embedding's codes and scales count beyond its fp16 weight (vocab · hidden), so
    that fp16_bytes stays the model in fp16."""
    if not record or record["format"] not in emb_q.FORMATS:
        return 0
    return sum(_numel(shapes[f"{m}.qweight"][1]) + _numel(shapes[f"{m}.scales"][1]) - _numel(record["shape"])
               for m in emb_names)


def _model_shapes(model: nn.Module, embedding: str | None, group_size: int | None
                  ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str], dict | None]:
    """What export_packed would write for ``model``, as key -> (dtype, shape), unquantized floats in fp16; the
    embedding's module names (-> component) and its record."""
    modules = quantized_modules(model)
    emb_tensors, replaced, record = emb_q.export_tensors(model, embedding, group_size)
    state, _ = _plain_state(model, modules, replaced)
    shapes = {k: (torch.float16 if t.is_floating_point() else t.dtype, tuple(t.shape)) for k, t in state.items()}
    shapes.update({k: (t.dtype, tuple(t.shape)) for k, t in emb_tensors.items()})
    for name, m in modules.items():
        packed = m if isinstance(m, PackedLinear) else PackedLinear.from_quantized(m.to_quantized_weight(),
                                                                                   getattr(m, "bias", None))
        for k, t in packed.state_dict().items():
            shapes[f"{name}.{k}"] = (PACKED_DTYPES.get(k, torch.float16), tuple(t.shape))
    shapes.update({k: (t.dtype, tuple(t.shape)) for k, t in guard_tensors(modules).items()})
    emb_name, _, head_name, head = emb_q.find_embeddings(model)
    names = {emb_name: "embedding"}
    if head_name and not (record["tied"] if record else f"{head_name}.weight" not in shapes):
        names[head_name] = "lm_head"
    return shapes, names, record


def _folder_embedding_names(folder: Path, shapes: dict) -> tuple[dict[str, str], dict | None]:
    """module -> component for the embedding and lm_head of an export, and its record; without one (older
    exports) the tensors shaped (vocab_size, hidden) named like an embedding or an lm_head."""
    config = json.loads((folder / "config.json").read_text())
    record = (config.get("quantization_config") or {}).get("embedding")
    if record:
        names = {record["module"]: "embedding"}
        if record.get("lm_head") and not record["tied"]:
            names[record["lm_head"]] = "lm_head"
        return names, record
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    names = {}
    for key, (_, shape) in shapes.items():
        module, _, suffix = key.rpartition(".")
        if suffix == "weight" and len(shape) == 2 and shape[0] == vocab:
            names[module] = "embedding" if "embed" in module else "lm_head"
    return names, None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return _numel(shape) * torch.empty(0, dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline stage
# ----------------------------------------------------------------------------------------------------------------


def export_stage(state, cfg) -> None:
    """Stage `export`: write the packed (or dense) checkpoint, report its real size, and optionally reload it and
    measure the perplexity the deployed model will have."""
    from gift_quant.models import check_finite

    path = Path(cfg.path or state.output_dir / cfg.format)
    check_export_target(path, state.output_dir)
    dtype = getattr(torch, cfg.dtype)
    model = state.model
    check_finite(model, "before export, the model's")
    start = time.perf_counter()
    if cfg.format == "packed":
        try:
            size = export_packed(model, state.tokenizer, path, quant_info=_quant_info(state),
                                 max_shard_size=cfg.max_shard_size, dtype=dtype, embedding=cfg.embedding,
                                 embedding_group_size=cfg.embedding_group_size)  # with the folder's size report
        except ValueError as e:  # a value the format's fp16 cannot hold, a malformed shard size
            raise UserError(f"export: {e}") from e
        state.record("export", "bits_per_weight", round(size["bits_per_weight"], 4), path=str(path),
                     checkpoint_mb=round(size["checkpoint_bytes"] / 2**20, 2), fp16_mb=round(size["fp16_bytes"] / 2**20, 2),
                     size_ratio_vs_fp16=round(size["ratio"], 4), seconds=round(time.perf_counter() - start, 1),
                     note=f"export: packed checkpoint in {path}, bits per weight of the quantized linears include "
                          f"scales, zeros, g_idx and the fp16 salient columns")
        _record_sizes(state, cfg, size)
    else:
        try:
            export_dense(model, state.tokenizer, path, dtype=dtype, max_shard_size=cfg.max_shard_size)
        except ValueError as e:
            raise UserError(f"export: {e}") from e
        size = sum(p.stat().st_size for p in path.glob("model*.safetensors"))
        state.record("export", "checkpoint_mb", round(size / 2**20, 2), path=str(path),
                     seconds=round(time.perf_counter() - start, 1),
                     note=f"export: dense {cfg.dtype} checkpoint in {path} (no size saving: weights dequantized)")
    if cfg.verify is not None:
        _verify_reload(state, cfg, path)


def _record_sizes(state, cfg, size: dict) -> None:
    """The checkpoint's bytes by component, and its size against the source model file (the GGUF it was converted
    from, else the model in fp16) and against fp16."""
    from gift_quant.models import source_gguf

    gguf = source_gguf(state.recipe.model)
    source_bytes = gguf.stat().st_size if gguf else size["fp16_bytes"]
    mb = lambda n: round(n / 2**20, 2)  # noqa: E731  (MiB, as the other size rows)
    parts = dict(size["bytes_by_component"])
    state.record("export", "checkpoint_mb", mb(size["checkpoint_bytes"]), bytes=size["checkpoint_bytes"],
                 bytes_by_component=parts, header_bytes=size["header_bytes"], source=str(gguf) if gguf else "fp16",
                 source_bytes=source_bytes, size_ratio_vs_source=round(size["checkpoint_bytes"] / source_bytes, 4),
                 size_ratio_vs_fp16=round(size["ratio"], 4),
                 note=f"export size in MiB (embedding {_embedding_label(cfg)}): "
                      + ", ".join(f"{_LABELS[k]} {mb(v)}" for k, v in parts.items())
                      + f", headers {mb(size['header_bytes'])}; total {mb(size['checkpoint_bytes'])} = "
                      + (f"{size['checkpoint_bytes'] / source_bytes:.3f}× the source GGUF {gguf.name} "
                         f"({mb(source_bytes)}), " if gguf else "")
                      + f"{size['ratio']:.3f}× fp16 ({mb(size['fp16_bytes'])})")


_LABELS = {"linear_codes": "linears' codes", "linear_salient": "salient columns", "linear_scales_zeros": "scales/zeros",
           "embedding": "embedding", "lm_head": "lm_head", "other": "norms/other"}


def _embedding_label(cfg) -> str:
    return f"int4 in groups of {cfg.embedding_group_size}" if cfg.embedding == "int4" else cfg.embedding


def _verify_reload(state, cfg, path: Path) -> None:
    """Reload from disk and evaluate like the recipe's last evaluate stage: the number a user of the file gets."""
    from transformers import AutoModelForCausalLM

    from .evaluate import measure, metric_name

    dtype = getattr(torch, cfg.verify)
    if cfg.format == "packed":
        from gift_quant.hf_quantizer import load_quantized

        reloaded = load_quantized(path, device=state.device, dtype=dtype)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(state.device).eval()
    ev = _last_evaluate(state)
    result = measure(state, reloaded, ev)
    state.record("export", f"{metric_name(ev)}_reloaded", result.value, tokens=result.tokens,
                 seconds=round(result.seconds, 1), label=f"reloaded {cfg.format} ({cfg.verify})")
    del reloaded


def _last_evaluate(state):
    from .config import EvaluateConfig

    configs = [s.config for s in state.stages_before if s.name == "evaluate"]
    return configs[-1] if configs else EvaluateConfig()


def _quant_info(state) -> dict:
    select = state.selection
    info = {"salient": select.model_dump(mode="json") if select else None, "rotation": state.rotation}
    if state.quantization is not None:
        q = state.quantization.config
        info.update(method=q.method, bits=q.bits, group_size=q.group_size, sym=q.sym)
    if state.recovery is not None:
        info["recover"] = state.recovery.summary
    return info
