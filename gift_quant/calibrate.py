"""Sequential calibration: the model loop around the per-linear algorithms (which know no models).

capture the inputs of decoder layer 0 (and every layer's call arguments) → for each layer: move it to the compute
device, collect every target linear's input statistics (one sub-group at a time when true-sequential, in the order the
architecture table gives: q/k/v → o → gate/up → down), let a handler quantize the group, then re-run the *quantized*
layer to produce the next layer's inputs (GPTQ convention). Only one layer's activations for the calibration set are
held at once, and only the current layer sits on the compute device.

Layers are always called with `use_cache=False` and no cache object: a shared cache would grow across calls and
corrupt every later layer's inputs. Each layer gets its own call arguments: models mixing sliding-window and full
attention (Gemma-2/3) give their layers different masks and rotary embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import CalibrateConfig
from .data import calibration_windows, check_not_eval_text, load_documents
from .architectures import architecture, decoder_layers
from .state import Calibration

log = logging.getLogger(__name__)

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


@dataclass
class Chunk:
    """A batch of calibration windows at the input of layer ``index``, with every layer's call keyword arguments."""

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    index: int = 0

    @property
    def kwargs(self) -> dict:
        return self.layer_kwargs[self.index]


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
    """Run the embeddings on `device` and record layer 0's input and what every layer is called with; stand-ins
    replace the layers meanwhile, so no block computes anything."""
    layers = decoder_layers(model)
    stack = model.get_submodule(architecture(model).layers.rpartition(".")[0])  # embeddings, rotary, norm, layers
    originals = list(layers)
    first: list[torch.Tensor] = []
    calls: list[dict] = []

    class Recorder(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            if not calls:
                first.append(hidden_states)
            calls.append({**{k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}, "use_cache": False})
            if len(calls) == len(originals):
                raise _Stop
            return hidden_states

    moved = [m for m in stack.children() if m is not layers]
    homes = [_device_of(m) for m in moved]
    for m in moved:
        m.to(device)
    for i in range(len(layers)):
        layers[i] = Recorder()
    chunks: list[Chunk] = []
    try:
        for batch in windows.split(batch_size):
            calls.clear()
            try:
                stack(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            chunks.append(Chunk(first[-1], list(calls)))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m, home in zip(moved, homes):
            m.to(home)
        first.clear()  # the Recorder class (a reference cycle) keeps these lists until the garbage collector runs:
        calls.clear()  # the chunks hold what they need, and layer 0's inputs must not outlive them
    return chunks


def run_layer(layer: nn.Module, chunks: list[Chunk]) -> list[Chunk]:
    """The layer's outputs for every chunk (the next layer's inputs)."""
    outs = []
    for c in chunks:
        out = layer(c.hidden, **c.kwargs)
        outs.append(Chunk(out[0] if isinstance(out, tuple) else out, c.layer_kwargs, c.index + 1))
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


def linear_groups(layer: nn.Module, targets: Callable[[str], bool],
                  groups: tuple[tuple[str, ...], ...] | None) -> list[dict[str, nn.Linear]]:
    """The target linears of one block (names relative to it) in the true-sequential ``groups`` of the architecture
    table, or all in one group when ``groups`` is None."""
    all_linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and targets(n)}
    if groups is None:
        return [all_linears] if all_linears else []
    ordered = [{n: all_linears.pop(n) for n in names if n in all_linears} for names in groups]
    if all_linears:  # targets outside the table's groups: their order is unknown, so do them together, last
        ordered.append(all_linears)
    return [g for g in ordered if g]


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
