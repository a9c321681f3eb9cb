"""Fingerprints of resumable results: saved layers and training checkpoints are reused only when everything that
decides them is unchanged — the model's weights (not just its name), the data actually used, the stages before, and
the stage's own settings."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import torch

# Stages that leave the model as they found it: adding or changing one never invalidates later results.
NO_EFFECT = {"evaluate", "compare", "export", "zero_shot"}
# Settings that change what is logged or whether to resume, not what is computed.
NOT_RESULT = {"resume"}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included) without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def fingerprint(state, settings: dict[str, Any], tensors: Iterable[torch.Tensor] = ()) -> str:
    """sha256 over the model (recipe entry and weight digest), the stages before the running one that change the
    model, ``settings`` and the bytes of ``tensors`` (calibration windows, training blocks, fixed columns)."""
    before = [{s.name: s.config.model_dump(mode="json", exclude=NOT_RESULT)} for s in state.stages_before
              if s.name not in NO_EFFECT]
    payload = {"model": state.recipe.model.model_dump(mode="json", exclude={"device"}),
               "weights": state.weights_digest, "before": before, "settings": settings}
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
