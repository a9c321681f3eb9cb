"""The packed GIFT-SW checkpoint: its format, its manifest, and loading it.

A packed checkpoint is a Hugging Face–style folder:

* ``config.json`` — the model config plus ``quantization_config`` (``quant_method: "gift_sw"``). Once ``gift_quant``
  is imported, ``AutoModelForCausalLM.from_pretrained(folder)`` loads it through :mod:`gift_quant.hf_quantizer`;
  ``gift_quant.load_quantized`` (in :mod:`gift_quant.hf_quantizer`) wraps that call.
* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``): per quantized
  linear ``<name>.qweight/.qzeros/.scales/.g_idx/.salient_idx/.salient_weight`` (+ ``.bias``) in the GPTQ v1 layout
  of :mod:`gift_quant.packing`, every other tensor in the export dtype (fp16 or bf16), tied weights saved once.
* tokenizer and generation files, and ``gift_quant_manifest.json`` (size + sha256 of every other file), written last.

Loading checks every file against the manifest and every tensor against the config before any weight is read; a
problem raises :class:`CheckpointError` with one line. The writer is :mod:`gift_quant.export`.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gift_quant import embedding
from gift_quant.errors import CheckpointError
from gift_quant.io_utils import PARTIAL_MARK, file_sha256
from gift_quant.packing import PackedLinear

QUANT_METHOD = "gift_sw"
FORMAT_VERSION = 1
MANIFEST = "gift_quant_manifest.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")
PACKED_DTYPES = {
    "qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32, "salient_idx": torch.int32,
    "scales": torch.float16, "salient_weight": torch.float16,
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Without gift_quant imported, transformers skips the unknown quant_method with a mere warning and would fill plain
# nn.Linear layers with random weights. A one-byte tensor under each quantized linear's ``weight`` name cannot fill
# an nn.Linear weight, so such a load fails (size mismatch) instead; the gift_sw quantizer ignores these tensors.
GUARD_SUFFIX = "weight"


def guard_keys(modules) -> set[str]:
    return {f"{name}.{GUARD_SUFFIX}" for name in modules}


def guard_tensors(modules) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(1, dtype=torch.int8) for key in sorted(guard_keys(modules))}
# load_quantized(verify_checksums=False) reaches the quantizer, which from_pretrained builds, through this.
VERIFY_CHECKSUMS: contextvars.ContextVar[bool] = contextvars.ContextVar("gift_quant_verify_checksums", default=True)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ----------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file in the folder (the manifest itself excluded)."""
    entries = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARK)
    }
    manifest = {"format": "gift_quant", "format_version": FORMAT_VERSION, "files": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({one_line(err)})") from err


def verify_manifest(folder: Path, verify_checksums: bool = True) -> None:
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files")
    if manifest.get("format") != "gift_quant" or not isinstance(files, dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a gift_quant manifest")
    for name, entry in files.items():
        p = folder / name
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise CheckpointError(f"{folder / MANIFEST}: malformed entry for {name}")
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != entry["size"]:
            raise CheckpointError(f"{p}: size {p.stat().st_size} != {entry['size']} in the manifest (truncated?)")
        if verify_checksums and file_sha256(p) != entry["sha256"]:
            raise CheckpointError(f"{p}: sha256 does not match the manifest (corrupted)")
    for needed in ("config.json", *shard_files(folder)):
        if needed not in files:
            raise CheckpointError(f"{folder / needed}: not covered by the manifest")


def shard_files(folder: Path) -> list[str]:
    if (folder / INDEX).is_file():
        return [INDEX, *sorted(set(read_json(folder / INDEX).get("weight_map", {}).values()))]
    return [SINGLE]


# ----------------------------------------------------------------------------------------------------------------
# Config and tensor checks (no tensor data read)
# ----------------------------------------------------------------------------------------------------------------


def check_quantization_config(qc: Any, path: Path) -> None:
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: config.json has no quantization_config with quant_method '{QUANT_METHOD}'")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {qc.get('format_version')!r} is not {FORMAT_VERSION}")
    missing = [k for k in ("bits", "group_size", "sym", "modules", "dtype") if k not in qc]
    if missing or qc["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: quantization_config lacks or mis-sets {missing or ['dtype']}")


def tensor_headers(folder: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
    """key -> (file, dtype, shape) from the safetensors headers, without reading the data."""
    sharded = (folder / INDEX).is_file()
    files = shard_files(folder)[1:] if sharded else [SINGLE]
    headers = {}
    for name in files:
        try:
            with safe_open(folder / name, "pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    headers[key] = (folder / name, _safetensors_dtype(s.get_dtype()), tuple(s.get_shape()))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{folder / name}: unreadable safetensors file ({one_line(err)})") from err
    if sharded and {k: str(v[0].name) for k, v in headers.items()} != read_json(folder / INDEX)["weight_map"]:
        raise CheckpointError(f"{folder / INDEX}: weight_map disagrees with the tensors in the shards")
    return headers


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise CheckpointError(f"unsupported tensor dtype {name}")
    return table[name]


def install_packed_linears(model: nn.Module, qc: dict, headers: dict, dtype: torch.dtype) -> None:
    """Swap every listed nn.Linear for an empty PackedLinear shaped by the config and the checkpoint (on the
    linear's own device: meta when transformers builds the skeleton)."""
    overrides = qc.get("module_overrides") or {}
    for name in qc["modules"]:
        spec = {k: qc[k] for k in ("bits", "group_size", "sym")} | overrides.get(name, {})
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized module {name} does not exist in a {type(model).__name__}") from None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"quantized module {name} is a {type(old).__name__}, not nn.Linear")
        for suffix in PACKED_SUFFIXES:
            if f"{name}.{suffix}" not in headers:
                raise CheckpointError(f"tensor {name}.{suffix} is missing")
        gs = spec["group_size"]
        n_groups = 1 if gs == -1 else -(-old.in_features // gs)
        k_shape = headers[f"{name}.salient_idx"][2]  # k is free; a malformed shape fails the shape check
        new = PackedLinear(
            old.in_features, old.out_features, bits=spec["bits"], group_size=gs, sym=spec["sym"],
            n_groups=n_groups, n_salient=k_shape[0] if k_shape else 0, bias=old.bias is not None, dtype=dtype,
            device=old.weight.device,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def check_tensors(model: nn.Module, headers: dict, qc: dict) -> None:
    """The checkpoint holds exactly the model's tensors (tied copies may be absent), with the model's shapes and
    the stored dtypes the config promises."""
    targets = model.state_dict()
    headers = {k: v for k, v in headers.items() if k not in guard_keys(qc["modules"])}  # older exports lack them
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    optional = set(ties) if getattr(model.config, "tie_word_embeddings", False) and ties else set()
    missing = sorted(set(targets) - set(headers) - optional)
    unexpected = sorted(set(headers) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    stored = DTYPES[qc["dtype"]]
    packed = {f"{n}.{s}": PACKED_DTYPES[s] for n in qc["modules"] for s in PACKED_SUFFIXES}
    packed.update(embedding.stored_dtypes(qc))
    for key, (_, dt, shape) in headers.items():
        target = targets[key]
        want = packed.get(key, stored if target.is_floating_point() else target.dtype)
        if shape != tuple(target.shape) or dt != want:
            raise CheckpointError(f"tensor {key}: {dt} {list(shape)} in the checkpoint, expected {want} "
                                  f"{list(target.shape)} from the config")


def check_packed_values(model: nn.Module, qc: dict) -> None:
    """Value checks the shapes cannot express (g_idx range, salient order, finite scales, zero points)."""
    for name in qc["modules"]:
        try:
            model.get_submodule(name).check()
        except ValueError as err:
            raise CheckpointError(f"quantized module {name}: {one_line(err)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
