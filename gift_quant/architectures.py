"""The decoder architectures gift_quant knows: one declarative entry per Hugging Face ``config.model_type``.

What differs between decoder families is data here, not branches in the stages: where the decoder blocks are, which
linears a block holds in true-sequential order (each group's inputs depend only on the groups before it), which
norms feed attention and the MLP and how they scale, and what rotation needs. Every stage reads the entry through
:func:`architecture`, which refuses (one line) a model whose type is missing or whose modules disagree with it;
the runner calls it before any stage (``pipeline.preflight``).

Adding an architecture is one entry in ``architecture_table.ARCHITECTURES`` and one tiny config in
``tests/test_architectures.py``.
"""

from __future__ import annotations

import re

from torch import nn

from .architecture_table import ARCHITECTURES, Architecture
from .errors import UserError


def _missing(arch: Architecture, model: nn.Module) -> str | None:
    """The first module this entry names that ``model`` lacks, as a full name (None when all are there)."""
    layers = _submodule(model, arch.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"{arch.layers} (a list of decoder blocks)"
    if _submodule(model, arch.final_norm) is None:
        return arch.final_norm
    for i, block in enumerate(layers):
        for name in (*arch.linears, *arch.norms, arch.mlp_act):
            if _submodule(block, name) is None:
                return arch.block_prefix(i) + name
    return None


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def architecture(model: nn.Module) -> Architecture:
    """``model``'s table entry; a UserError (one line) when its type is missing or its modules disagree with it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UserError(f"model type '{model_type}' ({type(model).__name__}) is not in gift_quant's architecture "
                        f"table: its decoder-layer path and linear groups are unknown (supported: "
                        f"{', '.join(ARCHITECTURES)}; see 'Adding an architecture' in the README)")
    missing = _missing(arch, model)
    if missing is not None:
        raise UserError(f"this {model_type} model ({type(model).__name__}) has no {missing}, which gift_quant's "
                        f"architecture table lists for '{model_type}'")
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture(model).layers)


def block_norm_weights(model: nn.Module, block: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """The weights of the norms the table lists, in ``block`` (names relative to it) or in every block and the final
    norm of ``model`` (full names): the few fp tensors recovery may train beside the quantized linears."""
    arch = architecture(model)
    if block is not None:
        return {f"{n}.weight": block.get_submodule(n).weight for n in arch.norms}
    found = {f"{arch.block_prefix(i)}{n}.weight": b.get_submodule(n).weight
             for i, b in enumerate(decoder_layers(model)) for n in arch.norms}
    return {**found, f"{arch.final_norm}.weight": model.get_submodule(arch.final_norm).weight}


def target_linears(model: nn.Module, patterns: list[str] | None) -> dict[str, nn.Linear]:
    """The decoder blocks' linears to quantize, by full name: every linear the table lists (``patterns`` None), or
    those whose full name matches any regex of ``patterns`` (re.search). A UserError when there are none."""
    arch = architecture(model)
    regexes = [re.compile(p) for p in patterns or ()]
    chosen = {}
    for i, block in enumerate(decoder_layers(model)):
        prefix = arch.block_prefix(i)
        for name, m in block.named_modules():
            wanted = name in arch.linears if patterns is None else any(r.search(prefix + name) for r in regexes)
            if wanted and isinstance(m, nn.Linear):
                chosen[prefix + name] = m
    if not chosen:
        raise UserError(f"quantize targets {patterns} match no linear of the decoder blocks (this model's: "
                        f"{arch.block_prefix(0)}{{{', '.join(arch.linears)}}})")
    return chosen
