import json
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from gift_quant.rotate import (
    OnlineRotation,
    RotateSpec,
    hadamard_matrix,
    orthogonal_matrix,
    restore_online_modules,
    rotate_model,
    rotation_kind,
)

OPTIONS = {
    "plain": {},
    "heads": {"rotate_heads": True},
    "down": {"online_down_hadamard": True},
    "both": {"rotate_heads": True, "online_down_hadamard": True},
}


def tiny_llama(
    hidden: int = 64, inter: int = 128, tie: bool = False, bias: bool = False, seed: int = 0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so that fusing them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def assert_rel_close(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, err


# ------------------------------------------------------------------ matrices


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 44, 48, 64, 72, 96, 576, 1536])
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 52, 66, 90, 100])
def test_no_hadamard_falls_back_to_random(n):
    assert hadamard_matrix(n) is None
    assert rotation_kind(n, "hadamard") == "random"


def test_smollm2_sizes_get_hadamard():
    for n in (576, 1536, 64):  # SmolLM2-135M hidden, intermediate, head_dim
        assert rotation_kind(n, "hadamard") == "hadamard"
    assert rotation_kind(576, "random") == "random"


@pytest.mark.parametrize("mode", ["hadamard", "random"])
@pytest.mark.parametrize("n", [12, 48, 64, 66, 576])
def test_orthogonal_matrix_properties(mode, n):
    q = orthogonal_matrix(n, mode, seed=3)
    assert q.dtype == torch.float64
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    assert torch.equal(q, orthogonal_matrix(n, mode, seed=3))
    assert not torch.allclose(q, orthogonal_matrix(n, mode, seed=4))
    if rotation_kind(n, mode) == "hadamard":
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    assert orthogonal_matrix(n, mode, seed=3, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------ function preservation


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", ["hadamard", "random"])
@pytest.mark.parametrize("tie", [False, True])
def test_rotation_preserves_logits(tie, mode, option):
    model = tiny_llama(tie=tie)
    x = ids()
    ref = logits(model, x)
    record = rotate_model(model, RotateSpec(mode=mode, seed=5, **OPTIONS[option]))
    assert_rel_close(logits(model, x), ref)
    assert record["untied_embeddings"] == tie
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    model.tie_weights(recompute_mapping=False)  # transformers re-ties from its cached mapping (e.g. in from_pretrained)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_rel_close(logits(model, x), ref)
    assert record["hidden_matrix"] == mode
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)


@pytest.mark.parametrize(
    ("hidden", "inter", "kind_h", "kind_i"),
    # 52 = 4·13 has a Hadamard matrix (Paley II over GF(25)) but no prime-order construction here; 90 ≡ 2 mod 4 has none
    [(48, 96, "hadamard", "hadamard"), (52, 90, "random", "random"), (64, 90, "hadamard", "random")],
)
def test_sizes_with_and_without_hadamard(hidden, inter, kind_h, kind_i):
    model = tiny_llama(hidden=hidden, inter=inter)
    x = ids()
    ref = logits(model, x)
    record = rotate_model(model, RotateSpec(mode="hadamard", rotate_heads=True, online_down_hadamard=True))
    assert_rel_close(logits(model, x), ref)
    assert (record["hidden_matrix"], record["down_matrix"], record["head_matrix"]) == (kind_h, kind_i, "hadamard")
    assert record["hidden_size"] == hidden and record["intermediate_size"] == inter and record["head_dim"] == 16
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("option", ["plain", "both"])
def test_rotation_with_biases(option):
    model = tiny_llama(bias=True)
    x = ids()
    ref = logits(model, x)
    rotate_model(model, RotateSpec(**OPTIONS[option]))
    assert_rel_close(logits(model, x), ref)


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream: the embedding output and every decoder layer's output."""
    outs = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))]
    for layer in model.model.layers:
        out = lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())  # noqa: E731
        hooks.append(layer.register_forward_hook(out))
    logits(model, x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_residual_stream_is_rotated_by_q(mode):
    model = tiny_llama()
    x = ids()
    before = _layer_outputs(model, x)
    rotate_model(model, RotateSpec(mode=mode, seed=2, rotate_heads=True, online_down_hadamard=True))
    q = orthogonal_matrix(64, mode, seed=2, dtype=torch.float32)
    for h, h_rot in zip(before, _layer_outputs(model, x)):
        assert_rel_close(h_rot, h @ q)


def test_online_rotation_layout_and_swappable_down_proj():
    model = tiny_llama()
    keys = set(model.state_dict())
    x = ids()
    ref = logits(model, x)
    record = rotate_model(model, RotateSpec(online_down_hadamard=True))
    assert set(model.state_dict()) == keys  # the online buffer is non-persistent: HF keys unchanged
    for layer in model.model.layers:
        assert type(layer.mlp.down_proj) is nn.Linear
        assert isinstance(layer.mlp.online_rotation, OnlineRotation)
        # a quantizer replacing down_proj keeps the rotation, which lives in the MLP
        old = layer.mlp.down_proj
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.data.copy_(old.weight.data)
        layer.mlp.down_proj = new
    assert_rel_close(logits(model, x), ref)
    assert record["online_modules"] == "model.layers.*.mlp.online_rotation"


def test_online_rotation_keeps_float32_matrix_under_dtype_casts():
    model = tiny_llama()
    rotate_model(model, RotateSpec(online_down_hadamard=True))
    model.to(torch.bfloat16)
    rot = model.model.layers[0].mlp.online_rotation
    assert rot.matrix.dtype == torch.float32
    u = torch.randn(3, 128, dtype=torch.bfloat16)
    ref = u.double() @ orthogonal_matrix(128, "hadamard", seed=2)
    assert rot(u).dtype == torch.bfloat16
    assert_rel_close(rot(u).double(), ref, tol=1e-2)


# ------------------------------------------------------------------ outliers


def _max_to_mean(acts: list[torch.Tensor]) -> float:
    """Mean over tokens and stream positions of max|x| / mean|x| across channels."""
    a = torch.stack(acts).abs()
    return (a.amax(-1) / a.mean(-1)).mean().item()


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_rotation_spreads_outlier_channels(mode):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 40]] += 10.0  # two massive channels in the residual stream
    x = ids()
    before = _max_to_mean(_layer_outputs(model, x))
    rotate_model(model, RotateSpec(mode=mode))
    after = _max_to_mean(_layer_outputs(model, x))
    # Gaussian-like channels give max/mean ≈ 3 at n = 64; the outliers push it far above, rotation brings it back.
    assert before > 12 and after < 4, (before, after)


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny_llama(tie=tie)
    x = ids()
    record = rotate_model(model, RotateSpec(mode="hadamard", seed=7, rotate_heads=True, online_down_hadamard=True))
    rotated = logits(model, x)
    model.save_pretrained(tmp_path)

    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.allclose(logits(loaded, x), rotated, atol=1e-3)  # the online rotation is not in the weights
    restore_online_modules(loaded, record)
    torch.testing.assert_close(logits(loaded, x), rotated, rtol=0, atol=1e-6)


def test_restore_without_online_rotation_is_noop():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    restore_online_modules(model, rotate_model(tiny_llama(), RotateSpec()))
    assert not hasattr(model.model.layers[0].mlp, "online_rotation")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ the real model


def residual_outlier_stats(model, input_ids) -> list[tuple[float, float]]:
    """Per decoder layer output: (token-averaged kurtosis across channels, max/mean of the per-channel max |x|)."""
    with torch.no_grad():
        hidden = model(input_ids, output_hidden_states=True, use_cache=False).hidden_states
    stats = []
    for h in hidden[1:-1]:  # layer outputs; the last entry is after the final norm
        x = h.reshape(-1, h.shape[-1]).double()
        z = x - x.mean(-1, keepdim=True)
        kurtosis = ((z**4).mean(-1) / (z**2).mean(-1) ** 2).mean().item()
        channel_max = x.abs().amax(0)
        stats.append((kurtosis, (channel_max.max() / channel_max.mean()).item()))
    return stats


@pytest.mark.slow
def test_rotation_removes_residual_outliers_in_smollm2(data_dir):
    """QuaRot's observation on Llama, checked on SmolLM2: a few residual channels carry huge values (kurtosis far
    above a Gaussian's 3); after the Hadamard rotation every layer's residual stream is close to Gaussian."""
    from gift_quant.config import ModelConfig, TextSource
    from gift_quant.data import calibration_windows, load_documents
    from gift_quant.models import load_model

    model, tok = load_model(ModelConfig())
    x = calibration_windows(tok, load_documents(TextSource(dataset="c4"), data_dir), 2, 256, 0)
    with torch.no_grad():
        reference = model(x, use_cache=False).logits
    before = residual_outlier_stats(model, x)
    rotate_model(model, RotateSpec(mode="hadamard"))
    after = residual_outlier_stats(model, x)
    with torch.no_grad():
        rotated = model(x, use_cache=False).logits
    assert ((rotated - reference).norm() / reference.norm()).item() < 1e-4  # same function

    for (k0, r0), (k1, r1) in zip(before, after):
        assert k1 < 4 and k1 < k0 / 5, (k0, k1)  # near-Gaussian, and far below the outlier-heavy original
        assert r1 < 3 and r1 < r0 / 2, (r0, r1)
    assert sum(k for k, _ in before) / len(before) > 20  # the outliers really are there to remove
