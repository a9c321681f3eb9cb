"""The forward of a model that stays in host memory, one decoder layer on the device at a time (as quantize does).

:func:`layered_logits` gives the logits the resident forward gives, window for window: the embeddings run on the
device (``calibrate.capture_layer0_inputs`` records layer 0's input and every layer's call arguments), each layer in
turn visits the device and maps the whole pass's hidden states to the next layer's, then the causal LM's own forward
computes the final norm, the head and any logit soft-capping from the last hidden states (stand-ins replace the
layers, so nothing model-specific is repeated here). The device holds one layer, the pass's hidden states (twice,
inputs and outputs) and one chunk's logits; the weights cross to the device once per pass.

:func:`visiting` puts a module on the device as a copy and restores its home tensors afterwards, so the model never
changes place, even when the pass fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .architectures import architecture, decoder_layers
from .calibrate import capture_layer0_inputs, run_layer


@contextmanager
def visiting(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Inside the block every parameter and buffer of ``modules`` is a copy on ``device`` (tied ones copied once);
    afterwards each holds its home tensor again and the copies are freed."""
    homes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if id(t) not in homes:
                    homes[id(t)] = t, t.data
                    t.data = t.data.to(device, copy=True)
        yield
    finally:
        for t, home in homes.values():
            t.data = home


def outer_modules(model: nn.Module) -> list[nn.Module]:
    """What runs outside the decoder layers: the embeddings, rotary tables, final norm and the head."""
    layers = decoder_layers(model)
    stack = model.get_submodule(architecture(model).layers.rpartition(".")[0])
    head = model.get_output_embeddings()
    return [m for m in stack.children() if m is not layers] + ([head] if head is not None else [])


class _Injector(nn.Module):
    """Stands in for the first decoder layer and returns the last layer's output; the others pass it through."""

    def __init__(self, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


@torch.no_grad()
def layered_logits(model: nn.Module, windows: torch.Tensor, device: torch.device,
                   batch_size: int = 1) -> Iterator[torch.Tensor]:
    """The logits (batch, seq, vocab) of each chunk of ``batch_size`` windows, in order, with ``model`` left in host
    memory and only one of its layers on ``device`` at a time."""
    outer = outer_modules(model)
    with visiting(outer, device):
        chunks = capture_layer0_inputs(model, windows, device, batch_size)
    layers = decoder_layers(model)
    for layer in layers:
        with visiting([layer], device):
            chunks = run_layer(layer, chunks)
    originals = list(layers)
    try:
        with visiting(outer, device):
            for chunk, batch in zip(chunks, windows.split(batch_size)):
                for i in range(len(layers)):
                    layers[i] = _Injector(chunk.hidden if i == 0 else None)
                yield model(input_ids=batch.to(device), use_cache=False).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
