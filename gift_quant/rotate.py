"""QuaRot-style orthogonal rotations fused into a decoder-only causal LM (function-preserving).

The residual stream ``h`` (a row vector) becomes ``h·Q`` for an orthogonal ``Q``. Because every RMSNorm's scale is
first folded into the linears that read it, the norms are plain ``x / rms(x)``, which commutes with ``Q``
(``rms(h·Q) = rms(h)``). Hence:

* writers of the stream (embeddings, ``o_proj``, ``down_proj``) get ``W ← Qᵀ W`` (embedding rows ``E ← E·Q``);
* readers (``q/k/v/gate/up_proj``, ``lm_head``) get ``W ← W·Q``.

Module names come from the architecture table (``gift_quant.architectures``), so fused layouts (Phi-3's
``qkv_proj``/``gate_up_proj``) work the same way. Architectures whose norms cannot be folded (scales of ``1 + w``,
norms on the attention/MLP outputs as in Gemma-2/3) are refused with a ``UserError``: rotating them would silently
change the model.

Options:

* ``rotate_heads``: the same head_dim rotation ``R`` on every value head (``W_v ← blockdiag(Rᵀ) W_v``; in a fused
  ``qkv_proj`` only its value rows) and on the ``o_proj`` input block of every query head
  (``W_o ← W_o blockdiag(R)``). Using one ``R`` for all heads keeps GQA consistent: whichever kv head a query head
  reads, it undoes the same rotation.
* ``online_down_hadamard``: ``down_proj``'s input is rotated at run time by an :class:`OnlineRotation` and its
  transpose is fused into ``down_proj.weight``. Design: the rotation lives in the MLP, not in ``down_proj``:
  ``mlp.online_rotation`` is a new child module (one instance shared by all layers) and the MLP instance's
  ``forward`` computes ``down_proj(online_rotation(act(gate) * up))``. So ``model.layers.N.mlp.down_proj``
  stays a plain ``nn.Linear`` under its usual name, hooks on it see the rotated input its rotated weight expects,
  and a quantizer may swap it for another linear without losing the rotation. The rotation matrix is a
  non-persistent buffer (the state dict keeps HF's keys), rebuilt from the seed by :func:`restore_online_modules`
  after a reload.

"hadamard" mode uses a randomised Hadamard ``H·diag(±1)/√n`` when an order-``n`` Hadamard matrix can be built here
(Sylvester ``2^k``, optionally Kronecker'd with a Paley I/II matrix of a prime order: 12, 20, 24, 28, 36, ...; e.g.
576 = 36·16, 1536 = 12·128), else a seeded random orthogonal matrix; the record says which was used.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .architectures import Architecture, architecture, decoder_layers
from .errors import UserError
from .pinning import PinnedDtype

Kind = Literal["hadamard", "random"]
_SEED_OFFSETS = {"hidden": 0, "head": 1, "down": 2}  # distinct streams so the three rotations are independent


@dataclass(frozen=True)
class RotateSpec:
    mode: Kind = "hadamard"
    seed: int = 0
    rotate_heads: bool = False
    online_down_hadamard: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Orthogonal matrices
# ----------------------------------------------------------------------------------------------------------------


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the Legendre symbol mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """Hadamard matrix of order m from Paley I (m = q+1, q ≡ 3 mod 4) or II (m = 2(q+1), q ≡ 1 mod 4), q prime."""
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An unnormalised (±1) Hadamard matrix of order n as ``Paley(m) ⊗ Sylvester(2^k)``, or None if none is built."""
    for k in range(n.bit_length(), -1, -1):  # largest power of two first: smallest Paley factor
        if n % (1 << k):
            continue
        m = n >> k
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            h = torch.kron(base, _sylvester(1 << k))
            assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)), f"bad Hadamard construction {n}"
            return h
    return None


def rotation_kind(n: int, mode: Kind) -> Kind:
    """Which matrix ``orthogonal_matrix(n, mode, ...)`` builds: "hadamard" only if one is constructible."""
    if mode not in ("hadamard", "random"):
        raise ValueError(f"unknown rotation mode {mode!r}")
    return "hadamard" if mode == "hadamard" and hadamard_matrix(n) is not None else "random"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _unscaled_rotation(n: int, mode: Kind, seed: int) -> tuple[torch.Tensor, float]:
    """(M, s) with s·M orthogonal; a Hadamard M stays ±1 so it is exact in any float dtype."""
    if rotation_kind(n, mode) == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
        return hadamard_matrix(n) * signs, 1.0 / math.sqrt(n)
    gauss = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r)), 1.0  # sign fix: Haar-distributed and unique given the seed


def orthogonal_matrix(n: int, mode: Kind, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded n×n orthogonal matrix: randomised Hadamard ``H·diag(±1)/√n`` if mode is "hadamard" and one is
    constructible (see :func:`rotation_kind`), else a Haar-random orthogonal matrix."""
    m, scale = _unscaled_rotation(n, mode, seed)
    return (m * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Online rotation before down_proj
# ----------------------------------------------------------------------------------------------------------------


class OnlineRotation(PinnedDtype):
    """x ↦ x·(scale·M) computed in float32, for a fixed orthogonal scale·M (row-vector convention)."""

    _PINNED = ("matrix",)  # a bf16 model must not round the rotation itself

    def __init__(self, matrix: torch.Tensor, scale: float, kind: Kind):
        super().__init__()
        self.register_buffer("matrix", matrix.to(torch.float32), persistent=False)
        self.scale, self.kind = scale, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to(x.device) is a no-op normally; it covers layers dispatched to other devices than the shared module.
        return (torch.matmul(x.to(torch.float32), self.matrix.to(x.device)) * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.matrix.shape[0]}, kind={self.kind}"


def _install_online_rotation(layer: nn.Module, arch: Architecture, rotation: OnlineRotation) -> None:
    """Give the block's gated MLP the rotation as a child and a forward that applies it to down_proj's input."""
    mlp = layer.get_submodule(arch.mlp)
    gate_up = [n.rpartition(".")[2] for n in arch.mlp_in]
    act, down = arch.mlp_act.rpartition(".")[2], arch.mlp_out.rpartition(".")[2]

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        outs = [getattr(self, n)(x) for n in gate_up]
        gate, up = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)  # a fused linear holds [gate; up]
        return getattr(self, down)(self.online_rotation(getattr(self, act)(gate) * up))

    mlp.online_rotation = rotation
    mlp.forward = types.MethodType(forward, mlp)


def _down_rotation(n: int, mode: Kind, seed: int, device: torch.device) -> OnlineRotation:
    m, scale = _unscaled_rotation(n, mode, seed)
    return OnlineRotation(m, scale, rotation_kind(n, mode)).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Fusing
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _fuse(
    linear: nn.Module,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
) -> None:
    """W ← left · (W · diag(in_scale)) · right and b ← left · b, in float64 with a single rounding back."""
    w = linear.weight.to(torch.float64)
    if in_scale is not None:
        w = w * in_scale.to(w)
    if right is not None:
        w = w @ right.to(w)
    if left is not None:
        w = left.to(w) @ w
        if getattr(linear, "bias", None) is not None:
            linear.bias.copy_((left.to(w) @ linear.bias.to(w)).to(linear.bias.dtype))
    linear.weight.copy_(w.to(linear.weight.dtype))


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    if getattr(norm, "bias", None) is not None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise TypeError(f"{type(norm).__name__} is not a weight-only RMSNorm")
    return norm.weight.detach().clone()


@torch.no_grad()
def _untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own weight and stop transformers from re-tying it on save/load. Returns whether it was tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    # transformers 5 caches the tie mapping at init and re-ties from it in save/load: recompute it from the config.
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


def _rotate_layer(layer: nn.Module, arch: Architecture, q: torch.Tensor, head: torch.Tensor | None,
                  down: torch.Tensor | None, value_rows: int) -> None:
    part = layer.get_submodule
    w_attn, w_mlp = _norm_weight(part(arch.attn_norm)), _norm_weight(part(arch.mlp_norm))
    for name in arch.attn_in:
        heads = head is not None and name == arch.value
        v_left = _value_heads_rotation(head, part(name).out_features, value_rows) if heads else None
        _fuse(part(name), left=v_left, right=q, in_scale=w_attn)
    o_proj = part(arch.attn_out)
    _fuse(o_proj, left=q.T, right=None if head is None else _block_diag(head, o_proj.in_features))
    for name in arch.mlp_in:
        _fuse(part(name), right=q, in_scale=w_mlp)
    _fuse(part(arch.mlp_out), left=q.T, right=down)
    part(arch.attn_norm).weight.fill_(1.0)
    part(arch.mlp_norm).weight.fill_(1.0)


def _block_diag(block: torch.Tensor, size: int) -> torch.Tensor:
    """The per-head rotation repeated along the diagonal of a size×size matrix (one block per head)."""
    return torch.block_diag(*[block] * (size // block.shape[0]))


def _value_heads_rotation(head: torch.Tensor, rows: int, value_rows: int) -> torch.Tensor:
    """Left factor rotating the value heads, the last ``value_rows`` output rows of v_proj (all of them) or of a
    fused qkv_proj (whose q and k rows stay as they are)."""
    keep = torch.eye(rows - value_rows, dtype=head.dtype, device=head.device)
    return torch.block_diag(keep, _block_diag(head.T, value_rows))


def check_rotatable(model: nn.Module) -> Architecture:
    """``model``'s architecture entry; a UserError (one line) when fused rotations would change its function."""
    arch = architecture(model)
    refusal = arch.rotation_refusal()
    if refusal is not None:
        raise UserError(f"rotate: {model.config.model_type} cannot be rotated without changing the model: "
                        f"{refusal}; drop the rotate stage")
    return arch


@torch.no_grad()
def rotate_model(model: nn.Module, spec: RotateSpec) -> dict:
    """Fuse norms and rotations into the causal LM in place; returns a JSON-able record of what was done."""
    arch = check_rotatable(model)
    cfg = model.config
    device = model.get_input_embeddings().weight.device
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    value_rows = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
    seeds = {role: spec.seed + off for role, off in _SEED_OFFSETS.items()}

    def matrix(n: int, role: str) -> torch.Tensor:
        return orthogonal_matrix(n, spec.mode, seeds[role]).to(device)

    q = matrix(hidden, "hidden")
    head = matrix(head_dim, "head") if spec.rotate_heads else None
    # One OnlineRotation shared by all MLPs: it is a fixed parameter-free function, and one n×n float32 buffer per
    # layer would add ~9 MB per layer for SmolLM2's n=1536.
    down = _down_rotation(inter, spec.mode, seeds["down"], device) if spec.online_down_hadamard else None
    down_t = None if down is None else down.matrix.to(torch.float64) * down.scale

    untied = _untie_lm_head(model)
    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.to(torch.float64) @ q).to(emb.weight.dtype))
    for layer in decoder_layers(model):
        _rotate_layer(layer, arch, q, head, down_t, value_rows)
        if down is not None:
            _install_online_rotation(layer, arch, down)
    final_norm = model.get_submodule(arch.final_norm)
    _fuse(model.get_output_embeddings(), right=q, in_scale=_norm_weight(final_norm))
    final_norm.weight.fill_(1.0)

    return {
        **asdict(spec),
        "hidden_size": hidden,
        "hidden_matrix": rotation_kind(hidden, spec.mode),
        "hidden_seed": seeds["hidden"],
        "head_dim": head_dim,
        "head_matrix": rotation_kind(head_dim, spec.mode) if spec.rotate_heads else None,
        "head_seed": seeds["head"],
        "intermediate_size": inter,
        "down_matrix": rotation_kind(inter, spec.mode) if spec.online_down_hadamard else None,
        "down_seed": seeds["down"],
        "online_modules": f"{arch.layers}.*.{arch.mlp}.online_rotation" if spec.online_down_hadamard else None,
        "untied_embeddings": untied,
    }


def restore_online_modules(model: nn.Module, record: dict) -> None:
    """Re-insert the online rotations of ``record`` into a model loaded from already-rotated weights."""
    if not record.get("online_down_hadamard"):
        return
    n, mode, seed = record["intermediate_size"], record["mode"], record["down_seed"]
    if rotation_kind(n, mode) != record["down_matrix"]:
        raise ValueError(f"cannot rebuild the {record['down_matrix']} down rotation of size {n}")
    emb = model.get_input_embeddings()  # a plain or a quantized embedding (weight, or qweight and scales)
    down = _down_rotation(n, mode, seed, next(t.device for t in (*emb.parameters(), *emb.buffers())))
    arch = architecture(model)
    for layer in decoder_layers(model):
        _install_online_rotation(layer, arch, down)


def rotate_stage(state, cfg) -> None:
    """Stage `rotate`: fuse the rotation into the full-precision model; it must run before calibration statistics
    are taken, so salient columns are chosen in the rotated basis."""
    record = rotate_model(state.model, RotateSpec(**cfg.model_dump()))  # the recipe's rules put it before quantize
    state.rotation = record
    state.record("rotate", "rotation", record["hidden_matrix"], note=f"rotate: {record['hidden_matrix']} "
                 f"{record['hidden_size']}x{record['hidden_size']} residual rotation, seed {record['seed']}"
                 + (", per-head" if cfg.rotate_heads else "") + (", online down_proj" if cfg.online_down_hadamard else ""))
