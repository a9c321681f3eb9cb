"""The decoder architectures gift_quant knows, as data and without torch: one declarative entry per Hugging Face
``config.model_type`` (where the decoder blocks are, which linears a block holds in true-sequential order, which norms
feed attention and the MLP and how they scale). ``architectures`` checks a loaded model against its entry and gives
the stages its modules; ``--dry-run``'s estimate reads the same entries for a config's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
