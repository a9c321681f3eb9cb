"""The decoder architectures gift_quant knows: one declarative entry per Hugging Face ``config.model_type``.

What differs between decoder families is data here, not branches in the stages: where the decoder blocks are, which
linears a block holds in true-sequential order (each group's inputs depend only on the groups before it), which
norms feed attention and the MLP and how they scale, and what rotation needs. Every stage reads the entry through
:func:`architecture`, which refuses (one line) a model whose type is missing or whose modules disagree with it;
the runner calls it before any stage (``pipeline.preflight``).

Adding an architecture is one entry in ``ARCHITECTURES`` and one tiny config in ``tests/test_architectures.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Architecture:
    """Names are relative to the causal LM (``layers``, ``final_norm``) or to one decoder block (the rest)."""

    layers: str = "model.layers"  # the nn.ModuleList of decoder blocks
    final_norm: str = "model.norm"
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # read the attention norm
    attn_out: str = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # gate first; a single fused linear holds [gate; up]
    mlp_out: str = "mlp.down_proj"
    mlp_act: str = "mlp.act_fn"  # down_proj(act(gate) * up)
    attn_norm: str = "input_layernorm"  # feeds attention
    mlp_norm: str = "post_attention_layernorm"  # feeds the MLP
    extra_norms: tuple[str, ...] = ()  # norms on the attention / MLP outputs, before the residual add
    norm: Literal["w", "1+w"] = "w"  # RMSNorm output: x / rms(x) · w, or · (1 + w)
    tied_embeddings: bool = False  # the family's checkpoints usually share lm_head with the embeddings

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The block's linears in true-sequential order: q/k/v (or qkv) → o → gate/up (or gate_up) → down."""
        return self.attn_in, (self.attn_out,), self.mlp_in, (self.mlp_out,)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)

    @property
    def value(self) -> str:
        """The linear whose last num_key_value_heads · head_dim output rows are the value heads (v_proj, qkv_proj)."""
        return self.attn_in[-1]

    @property
    def mlp(self) -> str:
        return self.mlp_out.rpartition(".")[0]

    @property
    def norms(self) -> tuple[str, ...]:
        return (self.attn_norm, self.mlp_norm, *self.extra_norms)

    def rotation_refusal(self) -> str | None:
        """Why fused rotations would change this architecture's function, or None when they are supported: a norm
        scale can be folded into the next linears only when it multiplies by w and nothing normalises the branch
        outputs (rms(h·Q) = rms(h) holds for the residual stream, not for a per-channel scale after it)."""
        reasons = (["its norms multiply by (1 + w)"] if self.norm != "w" else []) + (
            [f"it normalises the attention/MLP outputs ({', '.join(self.extra_norms)})"] if self.extra_norms else [])
        return " and ".join(reasons) or None

    def block_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def missing(self, model: nn.Module) -> str | None:
        """The first module this entry names that ``model`` lacks, as a full name (None when all are there)."""
        layers = _submodule(model, self.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return f"{self.layers} (a list of decoder blocks)"
        if _submodule(model, self.final_norm) is None:
            return self.final_norm
        for i, block in enumerate(layers):
            for name in (*self.linears, *self.norms, self.mlp_act):
                if _submodule(block, name) is None:
                    return self.block_prefix(i) + name
        return None


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


LLAMA = Architecture()
GEMMA = Architecture(mlp_norm="pre_feedforward_layernorm", norm="1+w", tied_embeddings=True,
                     extra_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(tied_embeddings=True),  # SmolLM2 and Llama-3.2 1B/3B tie; Llama-2 7B does not
    "mistral": LLAMA,
    "qwen2": Architecture(tied_embeddings=True),  # q/k/v biases; 0.5B-3B tie
    "qwen3": Architecture(tied_embeddings=True),  # q_norm/k_norm act on q and k per head: rotation-neutral
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "phi3": Architecture(attn_in=("self_attn.qkv_proj",), mlp_in=("mlp.gate_up_proj",), mlp_act="mlp.activation_fn"),
}


def architecture(model: nn.Module) -> Architecture:
    """``model``'s table entry; a UserError (one line) when its type is missing or its modules disagree with it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UserError(f"model type '{model_type}' ({type(model).__name__}) is not in gift_quant's architecture "
                        f"table: its decoder-layer path and linear groups are unknown (supported: "
                        f"{', '.join(ARCHITECTURES)}; see 'Adding an architecture' in the README)")
    missing = arch.missing(model)
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
