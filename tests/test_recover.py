"""Tests for the recover and compare stages (gift_quant/recover.py, gift_quant/compare.py).

A tiny random Llama (hidden 64, 2 layers, vocab 128) quantized with RTN records stands in for the quantize stage; a
byte-level tokenizer and small local text files stand in for the tokenizer and C4/WikiText-2. References are
independent: closed-form parameter counts, float64 perplexities, direct activation statistics.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from conftest import import_tool

from gift_quant.compare import compare_stage, earlier_perplexities, gap_recovered
from gift_quant.config import CalibrateConfig, CompareConfig, EvaluateConfig, QuantizeConfig, Recipe, RecoverConfig, SelectConfig, Stage
from gift_quant.layers import MixedPrecisionLinear, NoiseSpec, STELinear, replace_linears
from gift_quant.models import find_linears
from gift_quant.state import Calibration, RunState
from gift_quant.quantizer import QuantSpec, rtn
from gift_quant.layers import mixed_linears
from gift_quant.methods import METHODS, gift_params, lora_rank
from gift_quant.methods import setup_of
from gift_quant.method_specs import scales_train
from gift_quant.recover import recover_stage, training_blocks
from gift_quant.training import TokenBlocks, prepare_output, write_checksums
from gift_quant.training import train as train_blocks
from gift_quant.saliency import quant_error

TARGETS = [r"\.(q|k|v|o)_proj$", r"\.(gate|up|down)_proj$"]
CPU = torch.device("cpu")
TRAIN_TEXT = " ".join(f"the {a} fox jumps over the {b} dog number {i}." for i, (a, b) in
                      enumerate(zip(["quick", "brown", "red", "slow"] * 40, ["lazy", "old", "tired", "big"] * 40)))
EVAL_TEXT = "a lazy dog sleeps under the quick brown fox while the old cat watches. " * 20


class ByteTokenizer:
    """Bytes as token ids 1..127, EOS 0: all a tokenizer has to do for these stages."""

    eos_token_id = 0

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = [1 + b % 127 for b in text.encode()]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def tiny_fp(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def quantized(fp: nn.Module, k: int = 4, seed: int = 0) -> nn.Module:
    """What the quantize stage hands over: every target linear a 3-bit RTN MixedPrecisionLinear, k salient columns."""
    model = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(seed)
    records = {n: rtn(lin.weight, QuantSpec(bits=3), torch.randperm(lin.in_features, generator=g)[:k])
               for n, lin in find_linears(model, TARGETS).items()}
    replace_linears(model, records, lambda qw, b: MixedPrecisionLinear.from_quantized(qw, b, NoiseSpec()))
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, which costs much on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def texts(tmp_path: Path) -> SimpleNamespace:
    (tmp_path / "train.txt").write_text(TRAIN_TEXT)
    (tmp_path / "eval.txt").write_text(EVAL_TEXT)
    return SimpleNamespace(train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.txt"))


def prepare(model: nn.Module, cfg: RecoverConfig) -> int:
    """What the recover stage does before training (STE's latent weights start on the grid here: no teacher)."""
    return METHODS[cfg.method].prepare(model, setup_of(cfg, CPU, torch.float32))


def finish(model: nn.Module, method: str, dtype: torch.dtype) -> dict:
    return METHODS[method].finish(model, dtype)


def train(model, blocks: torch.Tensor, *args, **kwargs):
    return train_blocks(model, TokenBlocks(blocks), *args, **kwargs)


def run_state(tmp_path: Path, model: nn.Module, stages: list[Stage]) -> RunState:
    """A run state positioned at the recipe's recover or compare stage; a plain RTN quantize stage stands before it
    when the test's recipe has none (the quantized model is handed in)."""
    if "quantize" not in [s.name for s in stages]:
        stages = [Stage(name="quantize", config=QuantizeConfig(method="rtn", bits=3)), *stages]
    state = RunState(recipe=Recipe(stages=stages), output_dir=tmp_path / "out")
    state.position = next(i for i, s in enumerate(stages) if s.name in ("recover", "compare"))
    state.model, state.tokenizer = model, ByteTokenizer()
    return state


def recover_cfg(texts, **kw) -> RecoverConfig:
    base = dict(dataset=texts.train, eval_dataset=texts.eval, max_steps=2, batch_size=2,
                gradient_accumulation_steps=2, seq_len=16, learning_rate=1e-2, warmup_ratio=0.0, eval_seq_len=16,
                eval_windows=2)
    return RecoverConfig(**{**base, **kw})


def ref_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Pooled next-token NLL over the windows, accumulated in float64."""
    with torch.no_grad():
        logits = model.eval()(input_ids=windows).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    return math.exp(nll.item() / windows[:, 1:].numel())


def eval_windows(text: str, n: int, seq_len: int) -> torch.Tensor:
    ids = ByteTokenizer()(text, return_tensors="pt").input_ids.view(-1)
    return ids[: n * seq_len].view(n, seq_len)


# ---------------------------------------------------------------- what each method trains


def expected_trainable(model: nn.Module, method: str, scales: bool = False) -> int:
    layers = mixed_linears(model).values()
    steps = sum(m.scales.numel() for m in layers)  # one step size per row (per-channel RTN records)
    if method in ("gift_sw", "salient_ft"):
        return sum(m.out_features * m.num_salient for m in layers) + (steps if scales else 0)
    if method == "scales_only":
        return steps
    if method in ("ste", "ste_lsq"):
        return sum(m.out_features * m.in_features for m in layers) + (steps if method == "ste_lsq" else 0)
    return lora_rank(model) * sum(m.in_features + m.out_features for m in layers)


SUFFIXES = {"gift_sw": ("salient_weight",), "salient_ft": ("salient_weight",), "ste": ("weight",),
            "ste_lsq": ("weight", "scales"), "scales_only": ("scales",), "lora": ("weight",)}


@pytest.mark.parametrize("method, scales", [("gift_sw", False), ("gift_sw", True), ("salient_ft", False),
                                            ("scales_only", False), ("ste", False), ("ste_lsq", False),
                                            ("lora", False)])
def test_method_trains_only_its_parameters(method: str, scales: bool, tmp_path: Path, texts) -> None:
    fp = tiny_fp()
    model = quantized(fp)
    expected = expected_trainable(model, method, scales)
    cfg = recover_cfg(texts, method=method, train_scales=scales)
    state = run_state(tmp_path, model, [Stage(name="recover", config=cfg)])

    n = prepare(model, cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert n == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    suffix = SUFFIXES[method] + (("scales",) if scales else ())
    assert all(name.endswith(suffix) for name in trainable)
    assert all(any(name.endswith(x) for name in trainable) for x in suffix)
    # The estimate's and the benchmark's rule for "the step sizes train" is what the method does.
    assert any(name.endswith("scales") for name in trainable) == scales_train(method, scales)
    if method == "ste":
        assert all(isinstance(model.get_submodule(name.rsplit(".", 1)[0]), STELinear) for name in trainable)
    if method == "lora":
        assert all(".lora_A." in name or ".lora_B." in name for name in trainable)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train(model, training_blocks(state, cfg), None, cfg, tmp_path / "ckpt", CPU, "test", n)
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (key in trainable), key
    # Every method sees the same tokens: steps × batch × accumulation × seq_len.
    assert report.tokens == 2 * 2 * 2 * 16
    assert report.steps == 2 and report.trainable_params == expected


def test_ste_finish_requantizes_to_what_it_trained(tmp_path: Path, texts) -> None:
    model = quantized(tiny_fp())
    cfg = recover_cfg(texts, method="ste")
    state = run_state(tmp_path, model, [Stage(name="recover", config=cfg)])
    n = prepare(model, cfg)
    train(model, training_blocks(state, cfg), None, cfg, tmp_path / "ckpt", CPU, "test", n)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ste_logits = model.eval()(input_ids=x).logits
        finish(model, "ste", torch.float32)
        assert not any(isinstance(m, STELinear) for m in model.modules())
        assert len(mixed_linears(model)) == 14
        assert not any(p.requires_grad for p in model.parameters())
        # The STE forward is the fake-quant of the trained weights: the re-quantized layers compute the same.
        torch.testing.assert_close(model(input_ids=x).logits, ste_logits, rtol=0, atol=1e-5)


def test_noise_only_for_gift_sw(texts) -> None:
    for method, active in [("gift_sw", True), ("salient_ft", False), ("lora", False)]:
        model = quantized(tiny_fp())
        prepare(model, recover_cfg(texts, method=method, noise_scale=0.25))
        for m in mixed_linears(model).values():
            assert m.noise.active == active
            if active:  # σ = 0.25 · Δ of the layer's own grid
                torch.testing.assert_close(m.noise_std(), 0.25 * m.scales)


# ---------------------------------------------------------------- training works and resumes


def test_short_run_lowers_loss_on_a_fixed_batch(tmp_path: Path, texts) -> None:
    model = quantized(tiny_fp())
    cfg = recover_cfg(texts, method="gift_sw", max_steps=15, batch_size=1, gradient_accumulation_steps=1,
                      learning_rate=3e-2, warmup_ratio=0.0)
    batch = eval_windows(TRAIN_TEXT, 1, 16)
    loss_before = model(input_ids=batch, labels=batch).loss.item()
    n = prepare(model, cfg)
    report = train(model, batch.repeat(8, 1), None, cfg, tmp_path / "ckpt", CPU, "test", n)
    finish(model, "gift_sw", torch.float32)
    with torch.no_grad():
        loss_after = model(input_ids=batch, labels=batch).loss.item()
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)
    assert report.loss_last < report.loss_first


class StopAt(TrainerCallback):
    """Simulates an interrupted run: save and stop after `step` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("method", ["gift_sw", "lora"])
def test_resume_reproduces_the_uninterrupted_run(method: str, tmp_path: Path, texts) -> None:
    fp = tiny_fp()
    cfg = recover_cfg(texts, method=method, max_steps=4, save_steps=2, batch_size=1, gradient_accumulation_steps=1)
    state = run_state(tmp_path, quantized(fp), [Stage(name="recover", config=cfg)])
    data = training_blocks(state, cfg)

    def trained(out: str, callbacks=()) -> tuple[nn.Module, object]:
        model = quantized(fp)
        n = prepare(model, cfg)
        return model, train(model, data, None, cfg, tmp_path / out, CPU, "same", n, callbacks)

    whole, whole_report = trained("whole")
    _, first = trained("split", [StopAt(2)])
    assert first.steps == 2 and first.resumed_from is None
    resumed, second = trained("split")
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-2")
    assert second.steps == 4 and second.tokens == whole_report.tokens == 4 * 16
    assert second.cpu_seconds > first.cpu_seconds and second.seconds > first.seconds  # the saved part is counted

    params = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    start = dict(quantized(fp).named_parameters()) if method == "gift_sw" else {}
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, params[name], rtol=0, atol=1e-6)
            if name in start:
                assert not torch.equal(p, start[name])  # it trained


def test_rerun_of_a_finished_stage_reloads_its_result(tmp_path: Path, texts) -> None:
    fp = tiny_fp()
    cfg = recover_cfg(texts, method="gift_sw", max_steps=3, eval_steps=2)
    first = run_state(tmp_path, quantized(fp), [Stage(name="recover", config=cfg)])
    recover_stage(first, cfg)
    again = run_state(tmp_path, quantized(fp), first.recipe.stages)  # same recipe, same output folder
    recover_stage(again, cfg)
    report = again.recovery.report
    assert again.recovery.exportable and json.loads(json.dumps(again.recovery.summary))["method"] == "gift_sw"
    assert report.resumed_from.endswith("checkpoint-3") and report.tokens == 3 * 2 * 2 * 16
    for name, m in mixed_linears(first.model).items():
        assert torch.equal(m.salient_weight, mixed_linears(again.model)[name].salient_weight)
    curve = [(r["step"], r["value"]) for r in first.results if r["metric"].endswith("_ppl_training")]
    assert [s for s, _ in curve] == [0, 2, 3]  # start, every eval_steps, and the last step
    assert curve == [(r["step"], r["value"]) for r in again.results if r["metric"].endswith("_ppl_training")]


@pytest.mark.parametrize("train_scales", [False, True])
def test_packed_frozen_part_trains_as_the_dense_one(tmp_path: Path, texts, train_scales: bool) -> None:
    """frozen: packed changes where the frozen part lives, not what trains: the same tensors come out, and the
    model keeps its bit-packed layers afterwards."""
    fp = tiny_fp()
    results = {}
    for frozen in ("dense", "packed"):
        cfg = recover_cfg(texts, method="gift_sw", frozen=frozen, train_scales=train_scales)
        state = run_state(tmp_path / frozen, quantized(fp), [Stage(name="recover", config=cfg)])
        recover_stage(state, cfg)
        results[frozen] = {n: m.to_quantized_weight() for n, m in mixed_linears(state.model).items()}
        kinds = {type(m).__name__ for m in mixed_linears(state.model).values()}
        assert kinds == {"PackedMixedPrecisionLinear" if frozen == "packed" else "MixedPrecisionLinear"}
    for name, a in results["dense"].items():
        b = results["packed"][name]
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(b.salient_weight, a.salient_weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.scales, a.scales, rtol=0, atol=1e-7)
    assert not torch.equal(results["dense"][name].salient_weight, quantized(fp).get_submodule(name).salient_weight)


def test_packed_frozen_part_needs_a_method_that_keeps_one() -> None:
    for method in ("ste", "ste_lsq", "lora"):
        with pytest.raises(ValueError, match="frozen: packed"):
            RecoverConfig(method=method, frozen="packed")
    with pytest.raises(ValueError, match="before quantization"):
        RecoverConfig(method="gift_sw", order="before", frozen="packed")
    compare = CompareConfig(methods=["gift_sw", "ste"], frozen="packed")  # applied where it applies
    from gift_quant.compare import method_config

    assert [method_config(compare, m, 1e-4, 0).frozen for m in compare.methods] == ["packed", "dense"]


def test_stale_checkpoints_are_not_resumed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert prepare_output(out, "a", resume=True) is None

    def checkpoint(step: int) -> Path:
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / "trainable.safetensors").write_bytes(b"tensors")
        write_checksums(ckpt)
        return ckpt

    ckpt = checkpoint(3)
    (out / "checkpoint-5").mkdir()  # incomplete: killed while saving, no checksums
    assert prepare_output(out, "a", resume=True) == ckpt
    damaged = checkpoint(7)
    (damaged / "trainable.safetensors").write_bytes(b"tensorz")  # corrupted after it was written
    assert prepare_output(out, "a", resume=True) == ckpt  # the newest intact one
    assert prepare_output(out, "b", resume=True) is None  # settings changed: start over
    assert not list(out.glob("checkpoint-*"))
    ckpt = checkpoint(3)
    assert prepare_output(out, "b", resume=False) is None and not ckpt.exists()


# ---------------------------------------------------------------- LoRA rank


@pytest.mark.parametrize("k", [4, 5, 7])
def test_lora_rank_matches_gift_sw_parameter_count(k: int, texts) -> None:
    model = quantized(tiny_fp(), k=k)
    layers = mixed_linears(model).values()
    gift = sum(m.out_features * k for m in layers)
    per_rank = sum(m.in_features + m.out_features for m in layers)
    r = lora_rank(model)
    assert gift_params(model) == gift
    # The closest achievable count: no other rank comes nearer to GIFT-SW's.
    assert all(abs(r * per_rank - gift) <= abs(other * per_rank - gift) for other in range(1, 4 * r + 2))
    assert prepare(model, recover_cfg(texts, method="lora")) == r * per_rank
    x = torch.randint(0, 128, (1, 16))
    plain = quantized(tiny_fp(), k=k)
    with torch.no_grad():  # B starts at zero: the adapters change nothing before training
        torch.testing.assert_close(model.eval()(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=1e-6)
    other = quantized(tiny_fp(), k=k)
    assert prepare(other, recover_cfg(texts, method="lora", lora_rank=3)) == 3 * per_rank


# ---------------------------------------------------------------- Pre-GIFT-SW (order: before)


def test_pre_gift_sw_trains_selected_columns_of_the_fp_model(tmp_path: Path, texts) -> None:
    fp = tiny_fp()
    model = copy.deepcopy(fp)
    cfg = recover_cfg(texts, method="gift_sw", order="before", max_steps=3)
    quant = QuantizeConfig(method="rtn", bits=3)
    select = SelectConfig(metric="gift", fraction=1 / 16, overrides={r"down_proj$": 8})
    calib_cfg = CalibrateConfig(num_samples=3, seq_len=16)
    state = run_state(tmp_path, model, [Stage(name="calibrate", config=calib_cfg), Stage(name="select", config=select),
                                        Stage(name="recover", config=cfg), Stage(name="quantize", config=quant)])
    calib = torch.randint(1, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    state.selection, state.calibration = select, Calibration(calib_cfg, calib)

    # Independent reference: activation maxima captured directly, s_j = max_i |D_ij| · max_t |X_tj|.
    x_max: dict[str, torch.Tensor] = {}
    linears = find_linears(fp, TARGETS)

    def capture(name: str, x: torch.Tensor) -> None:
        seen = x.detach().double().abs().flatten(0, -2).amax(0)
        x_max[name] = torch.maximum(x_max[name], seen) if name in x_max else seen

    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=n: capture(n, a[0])) for n, lin in linears.items()]
    with torch.no_grad():
        fp(input_ids=calib)
    for h in hooks:
        h.remove()

    recover_stage(state, cfg)
    salient = state.fixed_salient
    assert set(salient) == set(linears)
    for name, lin in linears.items():
        k = 8 if name.endswith("down_proj") else round(lin.in_features / 16)
        scores = quant_error(lin.weight.double(), 3).abs().amax(0) * x_max[name]
        assert torch.equal(salient[name], scores.topk(k).indices.sort().values)
        new = model.get_submodule(name)
        assert type(new) is nn.Linear
        mask = torch.zeros(lin.in_features, dtype=torch.bool)
        mask[salient[name]] = True
        assert torch.equal(new.weight[:, ~mask], lin.weight[:, ~mask])  # frozen columns untouched
        assert not torch.equal(new.weight[:, mask], lin.weight[:, mask])  # salient columns trained
    for name, p in fp.named_parameters():  # embeddings, norms, lm_head frozen
        if not any(name.startswith(t + ".") for t in linears):
            assert torch.equal(p, model.get_parameter(name)), name


# ---------------------------------------------------------------- compare


def test_earlier_perplexities_pick_rows_of_the_same_model_and_settings() -> None:
    rows = [
        {"stage": "evaluate", "after": "model", "metric": "w_ppl", "value": 10.0, "seq_len": 2048, "windows": 4},
        {"stage": "calibrate", "after": "evaluate", "metric": "seconds", "value": 1.0},
        {"stage": "evaluate", "after": "quantize", "metric": "w_ppl", "value": 30.0, "seq_len": 2048, "windows": 4},
        {"stage": "evaluate", "after": "evaluate", "metric": "w_ppl", "value": 31.0, "seq_len": 2048, "windows": 2},
        {"stage": "evaluate", "after": "evaluate", "metric": "c4_ppl", "value": 50.0, "seq_len": 2048, "windows": 4},
    ]
    assert earlier_perplexities(rows, "evaluate", "w_ppl", 2048, 4) == (10.0, 30.0)
    assert earlier_perplexities(rows, "evaluate", "w_ppl", 2048, 2) == (None, 31.0)
    assert earlier_perplexities(rows, "recover", "w_ppl", 2048, 4) == (10.0, None)  # the model changed since
    assert earlier_perplexities(rows, "evaluate", "w_ppl", 1024, 4) == (None, None)
    assert gap_recovered(10.0, 30.0, 15.0) == pytest.approx(75.0)
    assert gap_recovered(None, 30.0, 15.0) is None


def test_compare_writes_table_json_and_plot(tmp_path: Path, texts) -> None:
    fp = tiny_fp()
    model = quantized(fp)
    ptq_ppl = ref_perplexity(model, eval_windows(EVAL_TEXT, 2, 32))
    # A random model has no real quantization gap (fp and PTQ both sit near the vocabulary size), so the fp row the
    # stage must pick up from the results is given a value that opens one.
    fp_ppl = 0.5 * ptq_ppl
    cfg = CompareConfig(methods=["gift_sw", "ste", "lora", "none"], dataset=texts.train, eval_dataset=texts.eval,
                        max_steps=2, seq_len=16, learning_rate=1e-2, learning_rates={"ste": 1e-3}, eval_steps=1,
                        eval_windows=2, eval_seq_len=16, final_seq_len=32, final_windows=2)
    stages = [Stage(name="evaluate", config=EvaluateConfig(dataset=texts.eval, seq_len=32, max_windows=2)),
              Stage(name="quantize", config=QuantizeConfig(method="rtn", bits=3)), Stage(name="compare", config=cfg)]
    state = run_state(tmp_path, model, stages)
    state.teacher = fp  # the model before quantization: STE's latent weights start from it
    state.results.append({"stage": "evaluate", "after": "model", "metric": "eval_ppl", "value": fp_ppl,
                          "tokens": 2 * 31, "seq_len": 32, "windows": 2})
    start_state = {k: v.clone() for k, v in model.state_dict().items()}

    summary = compare_stage(state, cfg)

    assert state.model is model and all(torch.equal(v, model.state_dict()[k]) for k, v in start_state.items())
    out = tmp_path / "out"
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["fp_ppl"] == pytest.approx(fp_ppl) and saved["sources"] == {"fp": "results", "start": "measured"}
    assert saved["ptq_ppl"] == pytest.approx(ptq_ppl, rel=1e-5)
    by = {m["method"]: m for m in saved["methods"]}
    assert list(by) == cfg.methods
    curve_start = ref_perplexity(model, eval_windows(EVAL_TEXT, 2, 16))
    for name in ("gift_sw", "ste", "lora"):
        m = by[name]
        assert m["tokens"] == 2 * 16 and m["steps"] == 2
        assert m["ppl_before"] == pytest.approx(ptq_ppl, rel=1e-5)
        assert m["gap_recovered_pct"] == pytest.approx(100 * (m["ppl_before"] - m["ppl_after"]) /
                                                      (m["ppl_before"] - fp_ppl))
        assert [p["step"] for p in m["curve"]] == [0, 1, 2]
        assert m["curve"][0]["tokens"] == 0 and m["curve"][-1]["tokens"] == 2 * 16
        assert m["curve"][0]["ppl"] == pytest.approx(curve_start, rel=1e-5)  # the same start for every method
        assert m["peak_mb"] > 0 and m["seconds"] > 0
    assert by["ste"]["learning_rate"] == 1e-3 and by["gift_sw"]["learning_rate"] == 1e-2
    assert by["ste"]["trainable_params"] == expected_trainable(model, "ste")
    assert by["lora"]["trainable_params"] == expected_trainable(model, "lora")
    assert by["none"]["tokens"] == 0 and by["none"]["ppl_after"] == by["none"]["ppl_before"]
    assert summary["methods"][0]["method"] == "gift_sw"

    for name in ("gift_sw", "ste", "lora"):  # training CPU time rises along every curve
        cpu = [p["cpu_minutes"] for p in by[name]["curve"]]
        assert cpu[0] == 0 and all(b > a for a, b in zip(cpu, cpu[1:]))
    view = saved["equal_cpu"]
    assert {m["method"] for m in view["methods"]} == {"gift_sw", "ste", "lora"}
    ends = [by[n]["curve"][-1]["cpu_minutes"] for n in ("gift_sw", "ste", "lora")]
    assert view["cpu_minutes"] == pytest.approx(min(ends))
    table = (out / "comparison.md").read_text()
    for name in cfg.methods:
        assert f"| {name} |" in table
    assert "At equal CPU time" in table
    merged_md = _merged_parts(saved, cfg.methods, tmp_path / "merged")
    assert merged_md == table  # methods run in separate processes merge into the same comparison
    png = (out / "recovery.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = [r for r in state.results if r["stage"] == "compare"]
    assert [r["method"] for r in rows] == cfg.methods


def _merged_parts(saved: dict, order: list[str], out: Path) -> str:
    """Split a comparison's methods into parts as separate runs would write them, merge them with the tool, and
    return the merged report; disagreeing parts are refused."""
    render_comparison = import_tool("render_comparison")
    parts = [{**saved, "methods": saved["methods"][:2]}, {**saved, "methods": saved["methods"][1:]}]
    render_comparison.write_outputs(out, render_comparison.merge(parts, order))
    with pytest.raises(ValueError, match="ptq_ppl"):
        render_comparison.merge([saved, {**saved, "ptq_ppl": 1.01 * saved["ptq_ppl"]}])
    with pytest.raises(ValueError, match="training"):
        render_comparison.merge([saved, {**saved, "training": {**saved["training"], "seq_len": 8}}])
    return (out / "comparison.md").read_text()


def _curve_run(cpu_per_step: float, ppl_per_step: float, offset: float = 0.0) -> dict:
    return {"curve": [{"step": s, "tokens": 8 * s, "cpu_minutes": cpu_per_step * s,
                       "ppl": 40 - ppl_per_step * s + offset} for s in (0, 10, 20)]}


def test_equal_cpu_view_reads_every_run_at_the_shortest_whole_run() -> None:
    from gift_quant.comparison_report import equal_cpu_view

    def entry(name, cpu_per_step, ppl_per_step):
        runs = [_curve_run(cpu_per_step, ppl_per_step, offset) for offset in (0.0, 0.2, 0.4)]
        return {"method": name, "tokens": 160, "steps": 20, "seeds": [0, 1, 2], "runs": runs}

    untrained = {"method": "none", "tokens": 0, "steps": 0, "seeds": [0], "runs": [{"curve": []}]}
    view = equal_cpu_view([entry("cheap", 0.1, 0.5), entry("dear", 0.4, 1.0), untrained])
    assert view["cheapest"] == "cheap" and view["cpu_minutes"] == pytest.approx(2.0)  # 20 steps × 0.1
    cheap, dear = view["methods"]
    assert cheap["steps"] == pytest.approx(20) and cheap["ppl_after"] == pytest.approx(40 - 10 + 0.2)
    # 2 CPU minutes is step 5 of the dear method: halfway between its evaluations at steps 0 and 10
    assert dear["steps"] == pytest.approx(5) and dear["ppl_after"] == pytest.approx(40 - 5 + 0.2)
    assert dear["ppl_after_std"] == pytest.approx(0.2) and dear["full_ppl"] == pytest.approx(40 - 20 + 0.2)
    old_runs = {"method": "old", "tokens": 160, "steps": 20, "seeds": [0],
                "runs": [{"curve": [{"step": 0, "tokens": 0, "ppl": 40.0}, {"step": 20, "tokens": 160, "ppl": 30.0}]}]}
    assert equal_cpu_view([entry("cheap", 0.1, 0.5), old_runs]) is None  # curves without CPU times


def test_a_rate_picked_at_the_edge_of_the_sweep_is_flagged() -> None:
    from gift_quant.comparison_report import _at_sweep_edge

    sweep = [{"learning_rate": lr} for lr in (3e-5, 1e-4, 3e-4)]
    assert _at_sweep_edge({"learning_rate": 3e-4, "lr_sweep": sweep})
    assert _at_sweep_edge({"learning_rate": 3e-5, "lr_sweep": sweep})
    assert not _at_sweep_edge({"learning_rate": 1e-4, "lr_sweep": sweep})
    assert _at_sweep_edge({"learning_rate": 1e-4, "lr_sweep": sweep[:2]})  # two rates have no inside


def test_a_pick_at_an_edge_extends_the_sweep_one_log_step_past_it() -> None:
    from gift_quant.compare import _beyond_edge

    def trials(**ppl):
        return {float(k[2:].replace("_", "-")): {"heldout_ppl": v} for k, v in ppl.items()}

    assert _beyond_edge(trials(lr3e_5=10.0, lr1e_4=11.0, lr3e_4=12.0)) == 9e-6  # 3e-5² / 1e-4
    assert _beyond_edge(trials(lr3e_5=12.0, lr1e_4=11.0, lr3e_4=10.0)) == 9e-4
    assert _beyond_edge(trials(lr3e_5=12.0, lr1e_4=10.0, lr3e_4=11.0)) is None  # interior: done
    assert _beyond_edge(trials(lr1e_4=10.0)) is None  # one rate: nothing to extend along


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="order: before"):
        RecoverConfig(order="before", method="ste")
    with pytest.raises(ValueError, match="belong to the recover stage"):
        CompareConfig(method="lora")
    with pytest.raises(ValueError, match="without repeats"):
        CompareConfig(methods=["gift_sw", "gift_sw"])


# ---------------------------------------------------------------- through the real pipeline


E2E = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - calibrate: {dataset: TRAIN, num_samples: 8, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - quantize: {method: gptq, bits: 3}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - compare: {methods: [gift_sw, none], dataset: TRAIN, eval_dataset: EVAL, max_steps: 2, seq_len: 32,
              learning_rate: 0.01, eval_seq_len: 64, eval_windows: 2, final_seq_len: 64, final_windows: 4}
  - recover: {method: gift_sw, dataset: TRAIN, eval_dataset: EVAL, max_steps: 2, seq_len: 32, learning_rate: 0.01}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
"""


def test_compare_and_recover_in_a_recipe(tiny_run) -> None:
    rc, out = tiny_run(E2E)
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    fp, ptq, recovered = [r["value"] for r in rows if r["stage"] == "evaluate"]
    summary = json.loads((out / "comparison.json").read_text())
    # The evaluate rows before and after quantize have the same settings: compare reuses them.
    assert summary["sources"] == {"fp": "results", "start": "results"}
    assert (summary["fp_ppl"], summary["ptq_ppl"]) == (fp, ptq)
    gift, none = summary["methods"]
    assert none["ppl_after"] == ptq and gift["tokens"] == 2 * 32
    # recover with the same settings as compare's gift_sw run trains the same model from the same start.
    assert recovered == pytest.approx(gift["ppl_after"], rel=1e-5)
    assert recovered != ptq


PRE = """
model: {name: tiny}
stages:
  - calibrate: {dataset: TRAIN, num_samples: 8, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - recover: {method: gift_sw, order: before, dataset: TRAIN, eval_dataset: EVAL, max_steps: 2, seq_len: 32,
              learning_rate: 0.01}
  - quantize: {method: gptq, bits: 3}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
"""


def test_pre_gift_sw_columns_survive_quantization(tiny_run, tmp_path: Path) -> None:
    import yaml

    from gift_quant.stages import parse_recipe
    from gift_quant.pipeline import run

    # tiny_run has written the text files and patched the model loader; the recipe runs in-process to see the state.
    text = PRE.replace("TRAIN", str(tmp_path / "train.jsonl")).replace("EVAL", str(tmp_path / "eval.txt"))
    state = run(parse_recipe(yaml.safe_load(text)), tmp_path / "pre")
    chosen = state.fixed_salient
    layers = mixed_linears(state.model)
    assert set(layers) == set(chosen) and len(layers) == 14
    for name, m in layers.items():
        assert torch.equal(m.salient_idx, chosen[name]) and m.num_salient == m.in_features // 8
    assert [r["metric"] for r in state.results if r["stage"] == "recover"][:2] == ["trainable_params", "train_loss"]


# ---------------------------------------------------------------- budgets


def test_token_budget_sets_the_steps(tmp_path: Path, texts) -> None:
    from gift_quant.budget import step_budget

    cfg = recover_cfg(texts, max_steps=None, max_tokens=100)  # 2 × 2 × 16 = 64 tokens per step
    assert step_budget(cfg) == 2 and step_budget(cfg.model_copy(update={"max_steps": 1})) == 1
    assert step_budget(cfg, world_size=2) == 1  # 2 processes: 128 tokens per step
    assert step_budget(recover_cfg(texts, max_steps=None, max_minutes=1.0)) is None
    assert RecoverConfig().max_steps == 100 and RecoverConfig(max_minutes=30).max_steps is None
    assert [RecoverConfig(loss=k).distils for k in ("lm", "kd", "lm+kd")] == [False, True, True]


def test_time_budget_stops_training_and_drives_the_schedule(tmp_path: Path, texts, monkeypatch) -> None:
    """A fake clock where every step takes 20 s: a 1-minute budget ends after 3 steps, evaluations happen at the
    marks the clock passes, and the cosine schedule reaches its end with the budget, not with a step count."""
    import gift_quant.training as training

    real = training.BudgetClock
    ticks = iter(range(0, 10**6, 10))  # start and stop each read the clock: 20 s a step
    monkeypatch.setattr(training, "BudgetClock",
                        lambda clock, offset, **kw: real(clock, offset, now=lambda: next(ticks), **kw))
    model = quantized(tiny_fp())
    cfg = recover_cfg(texts, max_steps=None, max_minutes=1.0, eval_minutes=[0.5], warmup_ratio=0.0,
                      batch_size=1, gradient_accumulation_steps=1)
    state = run_state(tmp_path, model, [Stage(name="recover", config=cfg)])
    lrs = []

    class LearningRates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            lrs.append(lr_scheduler.get_last_lr()[0])

    n = prepare(model, cfg)
    report = train(model, training_blocks(state, cfg), eval_windows(EVAL_TEXT, 2, 16), cfg, tmp_path / "t", CPU,
                   "time", n, [LearningRates()])
    assert report.steps == 3 and report.budget_minutes == pytest.approx(1.0)
    assert [p["minutes"] for p in report.curve] == pytest.approx([0.0, 2 / 3], abs=1e-3)  # the start, the mark
    # The scheduler reads the clock when it steps, 10 s into each step: at 1/6, 1/2 and 5/6 of the budget.
    expected = [cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * m)) for m in (1 / 6, 1 / 2, 5 / 6)]
    assert lrs == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------- seeds and learning-rate sweeps


SWEEP = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - calibrate: {dataset: TRAIN, num_samples: 8, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - quantize: {method: gptq, bits: 3}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - compare: {methods: [salient_ft, ste, none], dataset: TRAIN, eval_dataset: EVAL, max_steps: 4, seq_len: 32,
              seeds: [0, 1, 2], lr_sweep: [0.0001, 0.01], sweep_fraction: 0.5, heldout_windows: 3,
              eval_seq_len: 64, eval_windows: 2, final_seq_len: 64, final_windows: 4}
"""


def test_compare_over_seeds_with_a_learning_rate_sweep(tiny_run) -> None:
    rc, out = tiny_run(SWEEP)
    assert rc == 0
    summary = json.loads((out / "comparison.json").read_text())
    by = {m["method"]: m for m in summary["methods"]}
    for name in ("salient_ft", "ste"):
        m = by[name]
        assert [r["seed"] for r in m["runs"]] == [0, 1, 2] and m["tokens"] == 4 * 32
        afters = [r["ppl_after"] for r in m["runs"]]
        assert m["ppl_after"] == pytest.approx(sum(afters) / 3)
        assert m["ppl_after_std"] == pytest.approx(float(torch.tensor(afters, dtype=torch.float64).std()))  # n − 1
        assert len(set(afters)) > 1  # seeds really differ (data order, noise, initialisation)
        sweep = {t["learning_rate"]: t["heldout_ppl"] for t in m["lr_sweep"]}
        assert {1e-4, 1e-2} <= set(sweep) and m["learning_rate"] == min(sweep, key=sweep.get)
        # a pick at an edge extended the sweep past it (at most lr_sweep_extend = 2 log-steps of 100×)
        extra = sorted(set(sweep) - {1e-4, 1e-2})
        assert extra in ([], [1e-6], [1e-8, 1e-6], [1.0], [1.0, 100.0]) and list(sweep) == sorted(sweep)
        assert extra == [] or len(extra) == 2 or m["learning_rate"] not in (min(sweep), max(sweep))
        assert all(t["tokens"] == 2 * 32 for t in m["lr_sweep"])  # half the budget
    assert by["ste"]["codes_flipped"] is not None and by["ste"]["codes_total"] > 0
    assert by["none"]["ppl_after"] == by["none"]["ppl_before"] and by["none"]["ppl_after_std"] == 0
    table = (out / "comparison.md").read_text()
    assert "± " in table and "lr 0.0001" in table and "beyond the spread" in table
    assert table.count("**") == 2 * 2  # each swept method's chosen rate is marked


def test_compare_variants_are_methods_with_settings_of_their_own(texts) -> None:
    cfg = CompareConfig(methods=["gift_sw", "gift_scales"], dataset=texts.train,
                        variants={"gift_scales": {"method": "gift_sw", "train_scales": True,
                                                  "scales_learning_rate": 1e-5}})
    from gift_quant.compare import method_config

    run = method_config(cfg, "gift_scales", 1e-3, seed=4)
    assert (run.method, run.train_scales, run.scales_learning_rate, run.learning_rate, run.seed) == (
        "gift_sw", True, 1e-5, 1e-3, 4)
    assert method_config(cfg, "gift_sw", 1e-3, seed=4).train_scales is False
    with pytest.raises(ValueError, match="neither a recovery method"):
        CompareConfig(methods=["gift_sw", "mystery"])
    with pytest.raises(ValueError, match="may not change the shared"):
        CompareConfig(methods=["x"], variants={"x": {"method": "gift_sw", "max_steps": 9}})
    with pytest.raises(ValueError, match="train_scales"):
        CompareConfig(methods=["x"], variants={"x": {"method": "ste", "train_scales": True}})


def test_train_norms_adds_the_norm_weights(tmp_path: Path, texts) -> None:
    model = quantized(tiny_fp())
    cfg = recover_cfg(texts, method="salient_ft", train_norms=True)
    state = run_state(tmp_path, model, [Stage(name="recover", config=cfg)])
    state.teacher = None
    from gift_quant.recover import run_method

    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_method(state, model, cfg, tmp_path / "norms")
    norms = [k for k in before if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    assert len(norms) == 2 * 2 + 1 and report.trainable_params == expected_trainable(model, "salient_ft") + 5 * 64
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert set(norms) <= changed and all(k.endswith(("salient_weight", "norm.weight")) for k in changed)


def test_qat_fp_trains_from_the_fp_weights_and_finishes_quantized(tmp_path: Path, texts) -> None:
    """LLM-QAT-style QAT reads the teacher's weights: step 0 is the fp weights' RTN model (not the GPTQ/RTN record
    handed in, whose salient columns differ), it moves codes, and it ends as ordinary quantized linears."""
    fp = tiny_fp()
    model = quantized(fp)
    cfg = recover_cfg(texts, method="qat_fp", learning_rate=5e-2, max_steps=4)
    state = run_state(tmp_path, model, [Stage(name="recover", config=cfg)])
    state.teacher = fp
    from gift_quant.recover import run_method

    report = run_method(state, model, cfg, tmp_path / "qat")
    assert report.trainable_params == sum(m.out_features * m.in_features + m.scales.numel()
                                          for m in mixed_linears(quantized(fp)).values())
    assert 0 < report.codes_flipped < report.codes_total
    assert not any(isinstance(m, STELinear) for m in model.modules()) and len(mixed_linears(model)) == 14
