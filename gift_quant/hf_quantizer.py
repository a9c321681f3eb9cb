"""``quant_method: gift_sw`` for transformers: ``AutoModelForCausalLM.from_pretrained(export_dir)`` builds the
model with :class:`~gift_quant.packing.PackedLinear` modules, so ``pipeline``, ``generate``, the ``Trainer`` and
lm-eval take an export unchanged.

Registered through transformers' public hooks (``register_quantization_config``, ``register_quantizer``) by
:func:`register`, which ``import gift_quant`` runs as soon as transformers' quantizer registry is imported. Before
any weight is read the quantizer checks the folder against its manifest and every tensor header against the config
(:mod:`gift_quant.checkpoint`), raising ``CheckpointError``; after loading it checks the values, restores online
rotations and builds the fast kernels (:mod:`gift_quant.kernels`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from gift_quant import checkpoint as ckpt
from gift_quant import embedding

log = logging.getLogger(__name__)


class GiftSWConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed export, kept whole (bits, group_size, sym, modules,
    module_overrides, dtype, format_version, salient, rotation, recover, ...) so that it round-trips."""

    def __init__(self, **fields: Any) -> None:
        fields.pop("quant_method", None)
        self.quant_method = ckpt.QUANT_METHOD
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}


class GiftSWHfQuantizer(HfQuantizer):
    """Loads pre-quantized gift_sw checkpoints (there is nothing to quantize on the fly)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("gift_sw checkpoints cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        if not checkpoint_files:
            raise ckpt.CheckpointError("gift_sw checkpoints load from a folder of safetensors files")
        folder = Path(checkpoint_files[0]).parent
        qc = self.quantization_config.to_dict()
        ckpt.verify_manifest(folder, ckpt.VERIFY_CHECKSUMS.get())
        ckpt.check_quantization_config(qc, folder)
        headers = ckpt.tensor_headers(folder)
        ckpt.install_packed_linears(model, qc, headers, dtype or model.dtype)
        embedding.install(model, qc, dtype or model.dtype)  # int8/int4 embedding and lm_head, if the export has one
        ckpt.check_tensors(model, headers, qc)
        guards = {rf"^{re.escape(k)}$" for k in ckpt.guard_keys(qc["modules"])}  # see checkpoint.GUARD_SUFFIX
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | guards

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from gift_quant.packing import set_kernel

        qc = self.quantization_config.to_dict()
        ckpt.check_packed_values(model, qc)
        embedding.check_values(model, qc)
        if qc.get("rotation"):
            from gift_quant.rotate import restore_online_modules

            restore_online_modules(model, qc["rotation"])  # non-persistent buffers: built on the loaded device
        model.gift_quant_config = qc
        _own_storage(model, ckpt.DTYPES[qc["dtype"]])
        used = set_kernel(model)
        log.info("gift_sw: packed linears per kernel: %s", dict(used))
        return model

    def is_serializable(self) -> bool:
        # save_pretrained would write no manifest and the compute dtype's tensors: export_packed is the writer.
        log.warning("gift_sw models are saved with gift_quant.export_packed(model, tokenizer, path, "
                    "quant_info=model.gift_quant_config), not save_pretrained")
        return False

    @property
    def is_trainable(self) -> bool:
        return True  # the unquantized parameters (and adapters) train; PackedLinear backpropagates to its input

    @property
    def is_qat_trainable(self) -> bool:
        # The Trainer refuses a quantized model without adapters unless this is True, even to evaluate it.
        return True


def _own_storage(model: Any, stored: torch.dtype) -> None:
    """Copy tensors that alias the safetensors memory map (those loaded without a dtype change: integers, fp16
    packed scales and salient weights, and floats in the export's ``stored`` dtype) into memory of their own, one
    at a time, so the map is released: while mapped, every page of the file that loading touched (the fp16 source
    of a float32 embedding included) stays resident in the process."""
    def aliased(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and (not t.is_floating_point() or t.dtype in (stored, torch.float16))

    for p in model.parameters():  # tied parameters once
        if aliased(p):
            p.data = p.data.clone()
    for module in model.modules():
        for name, t in module._buffers.items():
            if t is not None and aliased(t):
                module._buffers[name] = t.clone()


def register() -> None:
    """Make transformers know ``quant_method: gift_sw`` (idempotent)."""
    if ckpt.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(ckpt.QUANT_METHOD)(GiftSWConfig)
    if ckpt.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(ckpt.QUANT_METHOD)(GiftSWHfQuantizer)


register()


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    *,
    verify_checksums: bool = True,
    kernel: str = "auto",
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` on a packed checkpoint, moved to ``device``:
    quantized linears are :class:`PackedLinear`, everything else is in ``dtype``. Every file is checked against the
    manifest (size, and sha256 unless ``verify_checksums=False``), every tensor against the config; any problem
    raises :class:`~gift_quant.checkpoint.CheckpointError`. ``kernel``: ``auto`` (fastest available) or ``reference`` (see
    :func:`gift_quant.packing.set_kernel`)."""
    from transformers import AutoModelForCausalLM

    from gift_quant.packing import set_kernel

    register()
    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"{path}: not a checkpoint folder")
    if not (path / ckpt.MANIFEST).is_file():
        raise ckpt.CheckpointError(f"{path / ckpt.MANIFEST}: missing (not a gift_quant export)")
    token = ckpt.VERIFY_CHECKSUMS.set(verify_checksums)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ckpt.CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RuntimeError, SafetensorError) as err:
        raise ckpt.CheckpointError(f"{path}: {type(err).__name__}: {ckpt.one_line(err)}") from err
    finally:
        ckpt.VERIFY_CHECKSUMS.reset(token)
    model = model.to(device).eval()
    set_kernel(model, kernel)
    return model
