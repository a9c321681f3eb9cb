"""The memory and time model (gift_quant/estimate.py) against independent references: the published parameter counts
of Llama-2, the bytes real modules hold, the bytes autograd really saves, and the trainable count each method sets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import import_tool

from gift_quant.config import RecoverConfig, SelectConfig
from gift_quant.estimate import (BUILTIN, Context, Shape, find_config, model_bytes, report, saved_per_token,
                                 trainable_count, training_parts)
from gift_quant.layers import MixedPrecisionLinear, pack_frozen, replace_linears
from gift_quant.methods import METHODS
from gift_quant.models import find_linears
from gift_quant.quantizer import QuantSpec, rtn
from gift_quant.methods import setup_of

TARGETS = [r"\.(q|k|v|o)_proj$", r"\.(gate|up|down)_proj$"]
SHAPES = [dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
          dict(hidden_size=96, intermediate_size=80, num_attention_heads=3, num_key_value_heads=3),
          dict(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=1)]


def test_llama2_parameter_counts_are_the_published_ones():
    counts = {name: Shape.from_config(cfg).params for name, cfg in BUILTIN.items() if "Llama" in name}
    assert counts == {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320,
                      "meta-llama/Llama-2-70b-hf": 68_976_648_192}


def tiny(layers: int = 2, **shape) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, num_hidden_layers=layers, max_position_embeddings=256, use_cache=False,
                      **{**SHAPES[0], **shape})
    return LlamaForCausalLM(cfg), cfg.to_dict()


def held(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quantize(model, bits: int, fraction: float, group_size: int = -1, sym: bool = True) -> None:
    records = {}
    for name, lin in find_linears(model, TARGETS).items():
        k = round(fraction * lin.in_features)
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        records[name] = rtn(lin.weight, spec, torch.arange(k) * (lin.in_features // max(k, 1)))
    replace_linears(model, records, MixedPrecisionLinear.from_quantized)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_bytes_are_what_the_modules_hold(bits, shape):
    model, cfg = tiny(**shape)
    ctx = Context(Shape.from_config(cfg), 4, cuda=False, select=SelectConfig(fraction=0.125), bits=bits)
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    assert model_bytes(ctx, "fp") == held(model) - rotary
    quantize(model, bits, 0.125)
    assert model_bytes(ctx, "dense") == held(model) - rotary
    pack_frozen(model)
    assert model_bytes(ctx, "packed") == held(model) - rotary


def saved_bytes(model, tokens: int) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once; the model's own tensors excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    x = torch.randint(0, 128, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(v for k, v in seen.items() if k not in own)


@pytest.mark.parametrize("method, scales", [("gift_sw", False), ("salient_ft", True), ("scales_only", False),
                                            ("ste", False), ("ste_lsq", False), ("lora", False)])
@pytest.mark.parametrize("shape", SHAPES)
def test_saved_activations_match_autograd(method, scales, shape):
    """Per layer, per token and per weight: from 1- and 3-layer models (the loss's part cancels) at two lengths."""
    saved = {}
    for layers in (1, 3):
        for tokens in (32, 64):
            model, cfg = tiny(layers, **shape)
            quantize(model, 3, 0.125)
            rc = RecoverConfig(method=method, train_scales=scales)
            METHODS[method].prepare(model, setup_of(rc, torch.device("cpu"), torch.float32))
            saved[layers, tokens] = saved_bytes(model.train(), tokens)
    per_layer = {t: (saved[3, t] - saved[1, t]) / 2 for t in (32, 64)}
    per_token = (per_layer[64] - per_layer[32]) / 32
    ctx = Context(Shape.from_config(cfg), 4, cuda=False, select=SelectConfig(fraction=0.125), bits=3)
    parts, _ = training_parts(ctx, rc, 32)
    assert saved_per_token(ctx, method, scales, rank_of(model)) == pytest.approx(per_token, rel=0.03)
    assert parts["saved activations"] / ctx.shape.layers == pytest.approx(per_layer[32], rel=0.03)


def rank_of(model) -> int:
    return next((m.r["default"] for m in model.modules() if hasattr(m, "r") and isinstance(m.r, dict)), 0)


@pytest.mark.parametrize("group_size, sym", [(-1, True), (16, False)])  # asymmetric: the zero points may train too
@pytest.mark.parametrize("method, scales", [("gift_sw", False), ("gift_sw", True), ("scales_only", False),
                                            ("ste", False), ("ste_lsq", False), ("lora", False)])
def test_trainable_counts_are_what_the_methods_train(method, scales, group_size, sym):
    model, cfg = tiny()
    quantize(model, 3, 0.125, group_size, sym)
    rc = RecoverConfig(method=method, train_scales=scales)
    n = METHODS[method].prepare(model, setup_of(rc, torch.device("cpu"), torch.float32))
    ctx = Context(Shape.from_config(cfg), 4, cuda=False, select=SelectConfig(fraction=0.125), bits=3,
                  group_size=group_size, sym=sym)
    assert trainable_count(ctx, rc) == n


def test_configs_come_from_disk_or_the_builtin_table_never_the_network(tmp_path, monkeypatch):
    _, cfg = tiny()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    assert find_config(str(tmp_path / "model"))[0]["hidden_size"] == 64
    assert find_config("meta-llama/Llama-2-70b-chat-hf")[0]["num_key_value_heads"] == 8
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert find_config("nobody/no-such-model-xyz")[0] is None


def test_dry_run_prints_the_estimate_or_says_it_is_unavailable(tmp_path, capsys):
    from gift_quant.recipe import main

    recipe = tmp_path / "r.yaml"
    text = ("model: {name: meta-llama/Llama-2-70b-hf, dtype: float16, device: cuda}\n"
            "stages:\n  - calibrate: {}\n  - select: {count: 128}\n  - quantize: {bits: 3}\n"
            "  - recover: {frozen: FROZEN, seq_len: 2048, gradient_checkpointing: true}\n")
    rows = {}
    for frozen in ("dense", "packed"):
        recipe.write_text(text.replace("FROZEN", frozen))
        assert main([str(recipe), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "68.98B parameters" in out
        (rows[frozen],) = [line for line in out.splitlines() if line.startswith("| recover")]
    assert "over 80 GB" in rows["dense"] and "over 80 GB" not in rows["packed"]  # packed: 70B trains on one GPU
    recipe.write_text(text.replace("FROZEN", "packed").replace("meta-llama/Llama-2-70b-hf", "nobody/no-such-model-xyz"))
    assert main([str(recipe), "--dry-run"]) == 0
    assert "estimate: unavailable" in capsys.readouterr().out


def test_packed_frozen_part_is_about_bits_over_8_bytes_per_weight():
    ctx = Context(Shape.from_config(BUILTIN["meta-llama/Llama-2-70b-hf"]), 2, cuda=True,
                  select=SelectConfig(count=128), bits=3)
    weights = ctx.shape.layers * ctx.shape.block_weights
    frozen = lambda form: model_bytes(ctx, form) - ctx.shape.other_params * 2  # noqa: E731
    assert frozen("dense") / weights == pytest.approx(3 + 128 * 2 / 8192 * 1.1, rel=0.05)
    assert frozen("packed") / weights == pytest.approx(3 / 8, rel=0.15)  # + fp16 salient columns and the grid
    assert "unavailable" not in report(
        __import__("gift_quant.recipe", fromlist=["load_recipe"]).load_recipe("recipes/llama2_3bit.yaml"))


def test_distillation_adds_the_teacher_pass():
    """KD runs the fp teacher over every training token first: on a GPU it visits beside the quantized model (the
    stage's peak when that exceeds training's) and it stays in host RAM; its forward adds to the time."""
    from gift_quant.estimate import recover

    ctx = lambda: Context(Shape.from_config(BUILTIN["meta-llama/Llama-2-7b-hf"]), 2, cuda=True,  # noqa: E731
                          select=SelectConfig(count=128), bits=3)
    cfg = dict(method="gift_sw", max_steps=100, batch_size=4, seq_len=1024, gradient_checkpointing=True)
    lm, kd = recover(ctx(), RecoverConfig(**cfg)), recover(ctx(), RecoverConfig(loss="kd", **cfg))
    fp = ctx().shape.layers * ctx().shape.block_weights * 2
    assert kd.peak >= model_bytes(ctx()) + fp and kd.peak > lm.peak
    assert kd.host >= lm.host + fp
    teacher_seconds = 100 * 4 * 1024 * 2 * 6.7e9 / ctx().rates.matmul  # ≈ 2 FLOPs per parameter and token
    assert kd.seconds - lm.seconds == pytest.approx(teacher_seconds, rel=0.1)


def test_a_block_wise_time_budget_bounds_the_whole_stage():
    from gift_quant.config import CalibrateConfig, ReconstructConfig
    from gift_quant.estimate import reconstruct

    ctx = lambda: Context(Shape.from_config(BUILTIN["meta-llama/Llama-2-7b-hf"]), 2, cuda=True,  # noqa: E731
                          select=SelectConfig(count=128), bits=3)
    calib = CalibrateConfig(num_samples=128, seq_len=2048)
    free = reconstruct(ctx(), ReconstructConfig(method="block_ap", epochs=2), calib).seconds
    timed = reconstruct(ctx(), ReconstructConfig(method="block_ap", epochs=2, max_minutes=1.0), calib).seconds
    until_clock = reconstruct(ctx(), ReconstructConfig(method="block_ap", epochs=None, max_minutes=1.0), calib)
    assert free > 60 and timed == 60  # targets and checks included, as the stage counts them
    assert until_clock.seconds == 60  # epochs: null trains until the budget ends it


def test_compare_counts_every_seed_the_sweep_and_one_teacher_pass():
    from gift_quant.config import CompareConfig
    from gift_quant.estimate import compare, recover

    ctx = lambda: Context(Shape.from_config(BUILTIN["meta-llama/Llama-2-7b-hf"]), 2, cuda=True,  # noqa: E731
                          select=SelectConfig(count=128), bits=3)
    cfg = dict(methods=["gift_sw", "salient_ft"], max_steps=100, batch_size=4, seq_len=1024)
    from gift_quant.compare import method_config

    # one seed's run as the stage makes it (its perplexity curve included)
    one = {m: recover(ctx(), method_config(CompareConfig(**cfg), m, 1e-4, 0)).seconds for m in cfg["methods"]}
    lm = compare(ctx(), CompareConfig(seeds=[0, 1, 2], lr_sweep=[1e-4, 3e-4], sweep_fraction=0.5, lr_sweep_extend=0,
                                      **cfg))
    # after each run its perplexity: 3 seeds × 16 × 2048 final tokens and 2 sweep runs × 8 × 1024 held-out tokens
    # per method, ≈ 2 FLOPs per parameter and token
    evals = 2 * (3 * 16 * 2048 + 2 * 8 * 1024) * 2 * 6.7e9 / ctx().rates.matmul
    assert lm.seconds - (3 + 2 * 0.5) * sum(one.values()) == pytest.approx(evals, rel=0.1)
    with_none = compare(ctx(), CompareConfig(seeds=[0, 1, 2], lr_sweep=[1e-4, 3e-4], sweep_fraction=0.5,
                                             lr_sweep_extend=0, **{**cfg, "methods": ["none", *cfg["methods"]]}))
    assert with_none.seconds == lm.seconds  # `none` trains and measures nothing
    kd = compare(ctx(), CompareConfig(seeds=[0, 1, 2], lr_sweep=[1e-4, 3e-4], sweep_fraction=0.5, lr_sweep_extend=0,
                                      loss="kd", **cfg))
    # the sweep's extensions past an edge are counted as if all were needed (an upper bound)
    extended = compare(ctx(), CompareConfig(seeds=[0, 1, 2], lr_sweep=[1e-4, 3e-4], sweep_fraction=0.5, **cfg))
    assert extended.seconds - (3 + 4 * 0.5) * sum(one.values()) == pytest.approx(
        2 * (3 * 16 * 2048 + 4 * 8 * 1024) * 2 * 6.7e9 / ctx().rates.matmul, rel=0.1)
    run = dict(method="gift_sw", max_steps=100, batch_size=4, seq_len=1024)
    teacher = recover(ctx(), RecoverConfig(loss="kd", **run)).seconds - recover(ctx(), RecoverConfig(**run)).seconds
    assert kd.seconds == pytest.approx(lm.seconds + teacher, rel=1e-6)


def test_the_teacher_runs_layer_by_layer_where_it_does_not_fit():
    """KD at 70B on one 80 GB GPU: the fp16 teacher (138 GB) cannot be resident, so auto visits it layer by layer:
    on the device one decoder layer (the bytes a real layer holds), the pass's hidden states and one window's
    logits; the teacher waits in host RAM and its weights cross once per teacher_windows windows. At 7B it fits."""
    from gift_quant.estimate import (GPU_MEMORY, HOST_TO_DEVICE, recover, teacher_copy_seconds, teacher_parts,
                                     teacher_placement)

    def ctx(name: str, cuda: bool = True) -> Context:
        return Context(Shape.from_config(BUILTIN[name]), 2, cuda=cuda, select=SelectConfig(count=128), bits=3)

    big = "meta-llama/Llama-2-70b-hf"
    cfg = dict(method="gift_sw", max_steps=250, batch_size=4, gradient_accumulation_steps=4, seq_len=1024,
               gradient_checkpointing=True, frozen="packed", loss="kd")
    fp = model_bytes(ctx(big), "fp")
    for top_k in (64, None):
        kd = RecoverConfig(kd_top_k=top_k, **cfg)
        assert teacher_placement(ctx(big), kd, live=top_k is None) == "layered"
        row = recover(ctx(big), kd)
        assert row.peak < GPU_MEMORY and row.host >= fp
        forced = recover(ctx(big), RecoverConfig(kd_top_k=top_k, teacher="resident", **cfg))
        assert forced.peak > GPU_MEMORY + fp / 2  # what the resident teacher would need
    assert teacher_placement(ctx("meta-llama/Llama-2-7b-hf"), RecoverConfig(**cfg), live=False) == "resident"
    assert teacher_placement(ctx(big, cuda=False), RecoverConfig(**cfg), live=False) == "resident"  # one memory
    # the copies: the whole teacher once per 64 windows of the 4000 the pass reads
    assert teacher_copy_seconds(ctx(big), RecoverConfig(**cfg), 4000) == pytest.approx(63 * fp / HOST_TO_DEVICE)
    # against a real decoder layer and real hidden states (float32, a layer larger than the embeddings)
    model, config = tiny(layers=3)
    small = Context(Shape.from_config(config), 4, cuda=True)
    parts = teacher_parts(small, RecoverConfig(loss="kd", teacher="layered", teacher_windows=8, seq_len=32),
                          live=False, windows=20)
    norms = sum(p.numel() * 4 for n, p in model.model.layers[0].named_parameters() if "norm" in n)
    assert parts["teacher layer (layered)"] == held(model.model.layers[0]) - norms
    hidden = small.shape.hidden + 2 * small.shape.head_dim  # hidden states + the rotary cos/sin per token
    assert parts["teacher activations (layered)"] == 2 * 8 * 32 * hidden * 4


def test_scaling_table_rows_are_the_stages_they_label():
    # The docs' Llama-2 table labels its rows by position: its recipe must be the shipped recipe's stages through the
    # quantized evaluation, then the table's own two recoveries, packed evaluation and export (not the recipe's own).
    scaling_table = import_tool("scaling_table")
    stages = scaling_table.recipe().stages
    assert [s.name for s in stages] == ["evaluate", "calibrate", "select", "quantize", "evaluate", "recover",
                                        "recover", "evaluate", "export"]
    assert len(stages) == len(scaling_table.LABELS)
    assert [s.config.frozen for s in stages if s.name == "recover"] == ["dense", "packed"]
