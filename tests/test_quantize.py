"""The layer-by-layer driver and the quantize stage on tiny random Llamas (every architecture: test_architectures)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from gift_quant.architectures import ARCHITECTURES
from gift_quant.calibrate import capture_layer0_inputs, linear_groups
from gift_quant.config import QuantizeConfig, SelectConfig
from gift_quant.layers import MixedPrecisionLinear
from gift_quant.quantize import LayerCheckpoints, LinearQuantizer, quantize_model

CPU = torch.device("cpu")


def windows(n=8, seq=32, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def quantized(model, method="gptq", bits=3, fraction=None, **kw):
    select = SelectConfig(fraction=fraction) if fraction else None
    rows = quantize_model(model, LinearQuantizer(QuantizeConfig(method=method, bits=bits), select), windows(), device=CPU,
                          batch_size=3, **kw)
    return model, rows


def records(model):
    return {n: m.to_quantized_weight() for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}


def test_true_sequential_groups_follow_the_block():
    layer = tiny_llama().model.layers[0]
    groups = linear_groups(layer, lambda n: True, ARCHITECTURES["llama"].groups)
    assert [sorted(g) for g in groups] == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                           ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert len(linear_groups(layer, lambda n: "mlp" in n, None)) == 1


@torch.no_grad()
def output_error(model, ref_model, w):
    out = model(input_ids=w, output_hidden_states=True).hidden_states[-1]
    ref = ref_model(input_ids=w, output_hidden_states=True).hidden_states[-1]
    return (out - ref).pow(2).mean().item()


def test_gptq_beats_rtn_and_salient_columns_help():
    fp = tiny_llama()
    w = windows(seed=5)
    err = {}
    for method, fraction in [("rtn", None), ("gptq", None), ("gptq", 0.125)]:
        m, rows = quantized(copy.deepcopy(fp), method=method, fraction=fraction)
        assert len(rows) == 14  # 7 projections x 2 layers
        err[method, fraction] = output_error(m, fp, w)
    assert err["gptq", None] < err["rtn", None]
    assert err["gptq", 0.125] < err["gptq", None]


def test_quantized_model_is_the_fake_quant_model_and_salient_columns_get_no_codes():
    fp = tiny_llama()
    model, rows = quantized(copy.deepcopy(fp), fraction=0.125)
    ref = copy.deepcopy(fp)
    for name, qw in records(model).items():
        k = qw.salient_idx.numel()
        assert k == round(qw.shape[1] / 8)
        assert torch.equal(qw.codes[:, qw.salient_idx].float(), qw.zeros[:, qw.g_idx[qw.salient_idx].long()])
        assert torch.all(qw.quantized_part()[:, qw.salient_idx] == 0)
        ref.get_submodule(name).weight.data = qw.dequantize()
    w = windows(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=w).logits, ref(input_ids=w).logits, rtol=1e-4, atol=1e-4)
    assert {r["salient"] for r in rows} == {8, 16}


def test_rtn_without_selection_needs_no_data():
    model = tiny_llama()
    rows = quantize_model(model, LinearQuantizer(QuantizeConfig(method="rtn", bits=4), None), None, device=CPU)
    assert len(rows) == 14 and all(r["salient"] == 0 for r in rows)
    assert len(records(model)) == 14


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    full, _ = quantized(tiny_llama(), fraction=0.125)
    ckpt = LayerCheckpoints(tmp_path / "q", "fp-1", resume=True)
    quantized(tiny_llama(), fraction=0.125, checkpoints=ckpt, stop_after=0)  # "crash" after layer 0
    assert sorted(p.name for p in (tmp_path / "q").glob("layer_*")) == ["layer_0000.safetensors"]
    resumed_model = tiny_llama()
    resumed, rows = quantized(resumed_model, fraction=0.125, checkpoints=LayerCheckpoints(tmp_path / "q", "fp-1", True))
    a, b = records(full), records(resumed)
    assert a.keys() == b.keys() and len(rows) == 14
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes), name
        assert torch.equal(a[name].salient_weight, b[name].salient_weight), name
        assert torch.equal(a[name].scales, b[name].scales), name


def test_a_changed_fingerprint_starts_over(tmp_path):
    ckpt = LayerCheckpoints(tmp_path / "q", "fp-1", resume=True)
    quantized(tiny_llama(), checkpoints=ckpt, stop_after=0)
    assert list((tmp_path / "q").glob("layer_*"))
    LayerCheckpoints(tmp_path / "q", "fp-2", resume=True)
    assert not list((tmp_path / "q").glob("layer_*"))


def test_targets_select_modules_by_name():
    model = tiny_llama()
    cfg = QuantizeConfig(method="gptq", bits=4, targets=[r"mlp\.(up|down)_proj$"])
    rows = quantize_model(model, LinearQuantizer(cfg, None), windows(), device=CPU)
    assert sorted({r["module"].split(".")[-1] for r in rows}) == ["down_proj", "up_proj"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_bad_group_size_is_a_user_error():
    from gift_quant.errors import UserError

    with pytest.raises(UserError, match="does not divide"):
        quantize_model(tiny_llama(), LinearQuantizer(QuantizeConfig(method="rtn", group_size=48), None), None, device=CPU)


def test_linears_reading_one_input_share_statistics_exactly():
    """q/k/v share one Hessian accumulation; it must equal the one each would have gathered alone."""
    from gift_quant.calibrate import observe
    from gift_quant.quantize import collect_stats

    model = tiny_llama()
    layer = model.model.layers[0]
    chunks = capture_layer0_inputs(model, windows(), CPU, batch_size=3)
    quantizer = LinearQuantizer(QuantizeConfig(method="gptq"), None)
    group = {n: layer.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    shared = collect_stats(layer, chunks, group, quantizer)
    for name, linear in group.items():
        alone = quantizer.new_stats(linear)
        observe(layer, chunks, {name: linear}, lambda n, x: alone.add(x))
        assert torch.equal(shared[name].gptq.H, alone.gptq.H) and shared[name].tokens == alone.tokens == 8 * 32
        assert torch.equal(shared[name].norms.linf, alone.norms.linf)
    assert shared["self_attn.q_proj"].gptq.H is not shared["self_attn.k_proj"].gptq.H
