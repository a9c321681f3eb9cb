"""Sequential calibration: the model loop around the per-linear algorithms (which know no models).

capture the inputs of decoder layer 0 → for each layer: move it to the compute device, collect every target linear's
input statistics (one sub-group at a time when true-sequential: q/k/v → o → gate/up → down), let a handler quantize
the group, then re-run the *quantized* layer to produce the next layer's inputs (GPTQ convention). Only one layer's
activations for the calibration set are held at once, and only the current layer sits on the compute device.

Layers are always called with `use_cache=False` and no cache object: a shared cache would grow across calls and
corrupt every later layer's inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import CalibrateConfig
from .data import calibration_windows, check_not_eval_text, load_documents
from .models import decoder_layers
from .state import Calibration

log = logging.getLogger(__name__)

# Inside one Llama block, each group's input depends only on the groups before it.
SEQUENTIAL_GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


@dataclass
class Chunk:
    """A batch of calibration windows at the current layer's input, with the layer call's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict


class _Stop(Exception):
    """Raised by a hook once every linear of interest has seen its input: the rest of the forward is not needed."""


def calibrate_stage(state, cfg: CalibrateConfig) -> None:
    """Stage `calibrate`: draw the calibration windows that the quantize stage's layer-by-layer pass consumes."""
    check_not_eval_text(cfg, "calibration")
    docs = load_documents(cfg, state.recipe.data.dir)
    windows = calibration_windows(state.tokenizer, docs, cfg.num_samples, cfg.seq_len, cfg.seed)
    state.calibration = Calibration(cfg, windows)
    state.record("calibrate", "calibration_tokens", int(windows.numel()), tokens=int(windows.numel()), seconds=0.0,
                 note=f"calibration: {cfg.num_samples} windows x {cfg.seq_len} tokens of {cfg.dataset}, seed {cfg.seed}")


@torch.no_grad()
def capture_layer0_inputs(model, windows: torch.Tensor, device: torch.device, batch_size: int) -> list[Chunk]:
    """Run the embeddings on `device` and stop at decoder layer 0, keeping what it was called with."""
    layers = decoder_layers(model)
    chunks: list[Chunk] = []
    first = layers[0]

    class Catcher(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            for k in _CACHE_KWARGS:
                kwargs.pop(k, None)
            kwargs["use_cache"] = False
            chunks.append(Chunk(hidden_states, kwargs))
            raise _Stop

    inner = model.model
    moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]
    homes = [_device_of(m) for m in moved]
    for m in moved:
        m.to(device)
    layers[0] = Catcher()
    try:
        for batch in windows.split(batch_size):
            try:
                inner(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = first
        for m, home in zip(moved, homes):
            m.to(home)
    return chunks


def run_layer(layer: nn.Module, chunks: list[Chunk]) -> list[Chunk]:
    """The layer's outputs for every chunk (the next layer's inputs)."""
    outs = []
    for c in chunks:
        out = layer(c.hidden, **c.kwargs)
        outs.append(Chunk(out[0] if isinstance(out, tuple) else out, c.kwargs))
    return outs


def observe(layer: nn.Module, chunks: list[Chunk], linears: dict[str, nn.Linear],
            observer: Callable[[str, torch.Tensor], None]) -> None:
    """Feed every chunk through `layer`, handing each named linear's input to `observer`; stop early when all
    of them have been seen for a chunk."""
    seen: set[str] = set()

    def hook(name):
        def fn(module, args):
            observer(name, args[0])
            seen.add(name)
            if len(seen) == len(linears):
                raise _Stop
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for c in chunks:
            seen.clear()
            try:
                layer(c.hidden, **c.kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def linear_groups(layer: nn.Module, targets: Callable[[str], bool], true_sequential: bool) -> list[dict[str, nn.Linear]]:
    """The target linears of one block, grouped for sequential processing (names relative to the block)."""
    all_linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and targets(n)}
    if not true_sequential:
        return [all_linears] if all_linears else []
    groups = [{n: all_linears.pop(n) for n in names if n in all_linears} for names in SEQUENTIAL_GROUPS]
    if all_linears:  # a block layout we don't know the order of: do the rest together, last
        groups.append(all_linears)
    return [g for g in groups if g]


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
