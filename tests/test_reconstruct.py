"""Block-wise reconstruction (gift_quant/reconstruct.py) through the real pipeline on a tiny Llama."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

RECIPE = """
model: {name: tiny}
stages:
  - calibrate: {dataset: TRAIN, num_samples: 8, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - quantize: {method: QUANTIZER, bits: 2}
  - reconstruct: {method: METHOD, batch_size: 2, learning_rate: LR, epochs: EPOCHS, train_scales: SCALES,
                  train_norms: NORMS, noise_bits: 8}   # a 2-bit grid's own Δ/2 would drown this tiny signal
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
"""


def run(tiny_run, tmp_path, folder: str, **settings):
    from gift_quant.stages import parse_recipe
    from gift_quant.pipeline import run as run_recipe

    text = RECIPE
    for key, value in {"QUANTIZER": "gptq", "METHOD": "gift_sw", "SCALES": "true", "NORMS": "false", "LR": "0.001", "EPOCHS": "4",
                       **settings}.items():
        text = text.replace(key, str(value))
    text = text.replace("TRAIN", str(tmp_path / "train.jsonl")).replace("EVAL", str(tmp_path / "eval.txt"))
    return run_recipe(parse_recipe(yaml.safe_load(text)), tmp_path / folder)


def quantized_only(tiny_run, tmp_path, quantizer: str = "gptq"):
    from gift_quant.stages import parse_recipe
    from gift_quant.pipeline import run as run_recipe

    text = RECIPE.split("  - reconstruct")[0].replace("TRAIN", str(tmp_path / "train.jsonl"))
    text = text.replace("QUANTIZER", quantizer)
    return run_recipe(parse_recipe(yaml.safe_load(text)), tmp_path / f"plain_{quantizer}").model


@pytest.mark.parametrize("method, scales, norms, trained", [
    ("gift_sw", "true", "false", ("salient_weight", "scales")),
    ("salient_ft", "false", "true", ("salient_weight", "layernorm.weight")),
    ("scales_only", "false", "false", ("scales",)),
])
def test_each_block_gets_closer_to_the_fp_block_and_only_declared_tensors_change(
        tiny_run, tmp_path, method, scales, norms, trained):
    # (tiny_run has written the text files and patched the model loader)
    state = run(tiny_run, tmp_path, "out", METHOD=method, SCALES=scales, NORMS=norms)
    rows = list(csv.DictReader((tmp_path / "out" / "reconstruct_log.csv").open()))
    assert [int(r["layer"]) for r in rows] == [0, 1]
    for r in rows:
        assert float(r["mse_end"]) < 0.9 * float(r["mse_start"]), r  # training lowered every block's MSE
    before = quantized_only(tiny_run, tmp_path).state_dict()
    after = state.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(trained) for k in changed), sorted(changed)
    assert all(any(k.endswith(t) for k in changed) for t in trained)
    assert not any(p.requires_grad for p in state.model.parameters())


def test_reconstruction_resumes_after_the_last_finished_block(tiny_run, tmp_path, monkeypatch):
    import gift_quant.reconstruct as reconstruct

    first = run(tiny_run, tmp_path, "out")
    trained = []
    monkeypatch.setattr(reconstruct, "train_block", lambda *a, **k: trained.append(1) or 0)
    again = run(tiny_run, tmp_path, "out")  # same recipe and folder: every block comes from disk
    assert not trained
    for (k, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    saved = sorted((tmp_path / "out" / "reconstruct").glob("block_*.safetensors"))
    saved[1].write_bytes(saved[1].read_bytes()[:-7] + b"garbage")  # a damaged block is trained again
    run(tiny_run, tmp_path, "out")
    assert len(trained) == 1


def test_packed_frozen_part_reconstructs_as_the_dense_one(tiny_run, tmp_path):
    from gift_quant.layers import PackedMixedPrecisionLinear, quantized_modules

    dense = quantized_modules(run(tiny_run, tmp_path, "dense").model)
    packed = quantized_modules(run(tiny_run, tmp_path, "packed", NORMS="false, frozen: packed").model)
    assert all(isinstance(m, PackedMixedPrecisionLinear) for m in packed.values()) and packed.keys() == dense.keys()
    for name, m in dense.items():
        a, b = m.to_quantized_weight(), packed[name].to_quantized_weight()
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(b.salient_weight, a.salient_weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.scales, a.scales, rtol=0, atol=1e-7)


def _train_on_a_fake_clock(monkeypatch, cfg, seconds: float | None):
    """train_block on a 4 → 4 linear and 4 chunks, its clock one second further at every look; (steps, final lr)."""
    import gift_quant.reconstruct as reconstruct
    from gift_quant.calibrate import Chunk
    from tqdm.auto import tqdm

    class Clock:
        def __init__(self, _kind):
            self.looks = 0

        def start(self):
            pass

        @property
        def minutes(self):
            self.looks += 1
            return self.looks / 60

    make, optimizers = reconstruct._optimizer, []
    monkeypatch.setattr(reconstruct, "BudgetClock", Clock)
    monkeypatch.setattr(reconstruct, "_optimizer", lambda *a: optimizers.append(make(*a)) or optimizers[-1])
    block = torch.nn.Linear(4, 4)
    inputs = [Chunk(torch.randn(2, 4), [{}]) for _ in range(4)]
    targets = [Chunk(torch.randn(2, 4), [{}]) for _ in range(4)]
    steps = reconstruct.train_block(block, inputs, targets, cfg, seconds=seconds, seed=0, progress=tqdm(disable=True))
    return steps, optimizers[0].param_groups[0]["lr"]


def test_a_time_budget_anneals_the_learning_rate_to_zero_by_its_end(monkeypatch):
    # A budget in seconds that ends long before the epochs do must still end the cosine schedule: 20 seconds end
    # training after about 10 of the 400 scheduled steps.
    from gift_quant.config import ReconstructConfig

    cfg = ReconstructConfig(epochs=100, learning_rate=1e-2)
    steps, lr = _train_on_a_fake_clock(monkeypatch, cfg, seconds=20.0)
    assert 5 <= steps <= 20 < cfg.epochs * 4
    assert lr < 0.02 * cfg.learning_rate  # the epochs alone left it at 99 %


def test_without_epochs_only_the_clock_ends_a_block_and_its_schedule(monkeypatch):
    # epochs: null with a budget: the block trains past any fixed number of passes (here 25 over 4 chunks) until its
    # seconds are spent, and the cosine reaches its end with them.
    from gift_quant.config import ReconstructConfig

    cfg = ReconstructConfig(method="block_ap", epochs=None, max_minutes=1.0, learning_rate=1e-2)
    steps, lr = _train_on_a_fake_clock(monkeypatch, cfg, seconds=200.0)
    assert 4 * 20 <= steps <= 200
    assert lr < 0.02 * cfg.learning_rate


def test_epochs_null_needs_a_time_budget():
    from gift_quant.config import ReconstructConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_minutes"):
        ReconstructConfig(method="block_ap", epochs=None)


def test_a_block_without_epochs_or_seconds_refuses_to_train(monkeypatch):
    # A caller that gives no seconds (tools/probe_reconstruct.py) must not loop forever on epochs: null.
    from gift_quant.config import ReconstructConfig

    cfg = ReconstructConfig(method="block_ap", epochs=None, max_minutes=1.0)
    with pytest.raises(ValueError, match="time budget"):
        _train_on_a_fake_clock(monkeypatch, cfg, seconds=None)


def test_the_stage_budget_counts_every_blocks_own_work_and_spreads_what_is_left():
    # A fake clock the test moves by hand: seconds on the budget's clock.
    from gift_quant.budget import StageBudget

    t = [0.0]
    budget = StageBudget(minutes=1.0, clock="process", blocks=3, now=lambda: t[0])  # 60 s for 3 blocks
    t[0] += 6  # loading the teacher and the first inputs counts too
    budget.start_block()
    t[0] += 2  # block 0's targets and MSE before
    assert budget.training_seconds() == pytest.approx(54 / 3 - 2 - 2)  # its share, less its opening, twice
    t[0] += 14
    budget.trained()
    t[0] += 5  # closing: MSE after, the pass on (measured: 5 s)
    budget.end_block()
    budget.start_block()  # at 27 s: 33 s left for 2 blocks
    t[0] += 2
    assert budget.training_seconds() == pytest.approx(33 / 2 - 2 - 5)
    t[0] += 40  # it overran
    budget.trained()
    t[0] += 5
    budget.end_block()
    budget.start_block()
    t[0] += 2
    assert budget.training_seconds() == 0  # the budget is spent: the last block keeps its start


def test_a_resumed_block_counts_as_its_share_and_no_budget_means_no_limit():
    from gift_quant.budget import StageBudget

    t = [0.0]
    budget = StageBudget(minutes=1.0, clock="wall", blocks=2, now=lambda: t[0])
    budget.start_block()
    t[0] += 1  # loading a saved block
    budget.end_block(resumed=True)
    budget.start_block()
    assert budget.training_seconds() == pytest.approx(30 - 0 - 0)  # 30 s were its share; no closing measured yet
    assert StageBudget(None, "wall", 2).training_seconds() is None


def test_a_spent_time_budget_leaves_every_block_as_quantized(tiny_run, tmp_path):
    # max_minutes covers the whole stage: a budget the first block's targets already exceed trains no block.
    state = run(tiny_run, tmp_path, "out", METHOD="block_ap, max_minutes: 1.0e-7, budget_clock: process")
    rows = list(csv.DictReader((tmp_path / "out" / "reconstruct_log.csv").open()))
    assert [int(r["steps"]) for r in rows] == [0, 0] and all(float(r["codes_changed"]) == 0 for r in rows)
    before = quantized_only(tiny_run, tmp_path).state_dict()
    for k, v in state.model.state_dict().items():
        assert torch.equal(before[k], v), k


# ------------------------------------------------------------------ block_ap: every weight through the quantizer


def test_block_ap_starts_exactly_at_the_quantized_block(tiny_run, tmp_path):
    # Latents at the centres of their codes' cells: step 0 is the PTQ model (float64, so only summation order differs).
    from gift_quant.methods import METHODS, Training

    model = quantized_only(tiny_run, tmp_path).double()
    block = model.model.layers[1]
    x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos)}
    before = block(x, **kwargs)
    before = before[0] if isinstance(before, tuple) else before
    trainable = METHODS["block_ap"].prepare(block, Training())
    assert trainable >= sum(m.latent.numel() for m in block.modules() if hasattr(m, "latent"))
    after = block(x, **kwargs)
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    codes_at_start = [m.flipped_codes() for m in block.modules() if hasattr(m, "flipped_codes")]
    assert codes_at_start and not any(codes_at_start)


def test_block_ap_lowers_each_blocks_mse_more_than_salient_training(tiny_run, tmp_path):
    # Round-to-nearest codes are not the ones that best reproduce a block's output: moving them (block_ap) must lower
    # every block's output MSE further than training the salient columns and scales with the codes fixed, at the same
    # steps, rates and data.
    def ratios(folder, method):
        run(tiny_run, tmp_path, folder, QUANTIZER="rtn", METHOD=f"{method}, codes_learning_rate: 0.03", EPOCHS="25")
        rows = list(csv.DictReader((tmp_path / folder / "reconstruct_log.csv").open()))
        return [float(r["mse_end"]) / float(r["mse_start"]) for r in rows], [float(r["codes_changed"]) for r in rows]

    every, changed = ratios("all", "block_ap")
    salient, unchanged = ratios("salient", "salient_ft")
    assert all(a < 0.9 * s for a, s in zip(every, salient)), (every, salient)
    assert all(c > 0 for c in changed) and not any(unchanged)  # block_ap moved codes; salient training never does


def test_block_ap_codes_are_the_latents_rounded_and_the_block_keeps_its_function(tiny_run, tmp_path):
    # After training, finish() writes round(latent) into an ordinary quantized linear: the codes of an independent
    # float64 rounding of the latents, and the same outputs as the trained latent layer.
    from gift_quant.layers import CodeLatentLinear, MixedPrecisionLinear
    from gift_quant.methods import METHODS, Training

    model = quantized_only(tiny_run, tmp_path)
    block = model.model.layers[0]
    METHODS["block_ap"].prepare(block, Training())
    latent = {n: m for n, m in block.named_modules() if isinstance(m, CodeLatentLinear)}
    opt = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=0.2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.zero_grad()
        sum(m(torch.randn(3, m.in_features, generator=g)).sin().sum() for m in latent.values()).backward()
        opt.step()
    expected = {}
    for name, m in latent.items():
        codes = torch.clamp(torch.round(m.latent.detach().double()), 0, m.maxq)
        codes[:, m.salient_idx] = m.codes[:, m.salient_idx].double()
        inputs = torch.randn(5, m.in_features, generator=g)
        expected[name] = (codes.to(torch.uint8), inputs, m(inputs).detach())
    ended = METHODS["block_ap"].finish(block, torch.float32)
    assert ended["codes_flipped"] > 0
    for name, (codes, inputs, out) in expected.items():
        m = block.get_submodule(name)
        assert isinstance(m, MixedPrecisionLinear)
        assert torch.equal(m.codes, codes), name
        torch.testing.assert_close(m(inputs), out, rtol=1e-5, atol=1e-6)


def test_block_ap_exports_and_reloads_to_the_in_memory_logits(tiny_run, tmp_path):
    from gift_quant.hf_quantizer import load_quantized

    from gift_quant.export import export_packed

    state = run(tiny_run, tmp_path, "out", METHOD="block_ap")
    export = tmp_path / "out" / "packed"
    export_packed(state.model, state.tokenizer, export, quant_info={}, dtype=torch.float32)
    ids = torch.randint(0, state.model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    reloaded = load_quantized(export, dtype=torch.float32, kernel="reference")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, state.model(ids).logits, rtol=1e-3, atol=1e-3)


def test_block_ap_resumes_after_a_kill_mid_block_with_the_same_codes(tiny_run, tmp_path, monkeypatch):
    import gift_quant.reconstruct as reconstruct
    from gift_quant.layers import quantized_modules

    whole = quantized_modules(run(tiny_run, tmp_path, "whole", METHOD="block_ap").model)
    train, calls = reconstruct.train_block, []

    def killed_in_block_1(block, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while block 1 trains: block 0 is saved, block 1 is not
        return train(block, *args, **kwargs)

    monkeypatch.setattr(reconstruct, "train_block", killed_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, tmp_path, "killed", METHOD="block_ap")
    assert len(list((tmp_path / "killed" / "reconstruct").glob("block_*.safetensors"))) == 1
    monkeypatch.setattr(reconstruct, "train_block", train)
    resumed = quantized_modules(run(tiny_run, tmp_path, "killed", METHOD="block_ap").model)
    for name, m in whole.items():
        assert torch.equal(m.to_quantized_weight().codes, resumed[name].to_quantized_weight().codes), name


def test_own_calibration_size_extends_the_calibrate_stages_windows_and_fp_inputs_run(tiny_run, tmp_path):
    import json

    import gift_quant.reconstruct as reconstruct
    from gift_quant.config import ReconstructConfig

    state = run(tiny_run, tmp_path, "out", METHOD="salient_ft, num_samples: 12, inputs: fp")
    windows, heldout = reconstruct._windows(state, ReconstructConfig(num_samples=12))
    assert windows.shape == (12, 64) and torch.equal(windows[:8], state.calibration.windows)
    assert heldout.shape == (8, 64)  # the sampler's next windows, beside the training ones
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    (row,) = [r for r in rows if r["stage"] == "reconstruct"]
    assert "12 calibration windows" in row["note"] and "(fp inputs)" in row["note"]
    assert row["metric"] == "block_mse_ratio" and row["value"] < 1


def test_heldout_windows_are_only_measured_never_trained_on(tiny_run, tmp_path):
    """The held-out windows' block MSE is logged before and after each block, and they change nothing trained: a
    run without them ends on the same tensors (and resumes the same saved blocks: they are not in the fingerprint)."""
    with_heldout = run(tiny_run, tmp_path, "held")
    rows = list(csv.DictReader((tmp_path / "held" / "reconstruct_log.csv").open()))
    for r in rows:
        assert 0 < float(r["heldout_mse_start"]) < float("inf") and 0 < float(r["heldout_mse_end"]) < float("inf")
    without = run(tiny_run, tmp_path, "plain_run", **{"noise_bits: 8}": "noise_bits: 8, heldout_windows: 0}"})
    rows0 = list(csv.DictReader((tmp_path / "plain_run" / "reconstruct_log.csv").open()))
    assert all(r["heldout_mse_start"] == "" for r in rows0)
    a, b = with_heldout.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ratio = [r for r in with_heldout.results if r["metric"] == "block_mse_ratio"][0]["heldout_mse_ratio"]
    assert ratio == pytest.approx(sum(float(r["heldout_mse_end"]) / float(r["heldout_mse_start"]) for r in rows)
                                  / len(rows), abs=1e-4)


def test_a_block_that_training_made_worse_is_put_back_as_it_was(tiny_run, tmp_path):
    """Far too high a rate for the codes raises the blocks' MSE on their own windows; with ``revert_worse`` (the
    default) such a block ends exactly as it started (the PTQ block: same codes, grid and columns), without it, worse."""
    from gift_quant.layers import quantized_modules

    settings = dict(QUANTIZER="rtn", METHOD="block_ap, codes_learning_rate: 30", EPOCHS="2", SCALES="false")
    guarded = run(tiny_run, tmp_path, "guarded", **settings)
    rows = list(csv.DictReader((tmp_path / "guarded" / "reconstruct_log.csv").open()))
    unguarded_settings = {**settings, "METHOD": "block_ap, codes_learning_rate: 30, revert_worse: false"}
    run(tiny_run, tmp_path, "unguarded", **unguarded_settings)
    loose = list(csv.DictReader((tmp_path / "unguarded" / "reconstruct_log.csv").open()))
    assert loose[0]["reverted"] == "0" and float(loose[0]["mse_end"]) > float(loose[0]["mse_start"])
    assert rows[0]["reverted"] == "1" and float(rows[0]["codes_changed"]) == 0
    assert all(float(r["mse_end"]) <= float(r["mse_start"]) for r in rows)
    ptq = quantized_modules(quantized_only(tiny_run, tmp_path, "rtn"))
    for name, m in quantized_modules(guarded.model).items():
        if name.startswith("model.layers.0."):
            a, b = m.to_quantized_weight(), ptq[name].to_quantized_weight()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name
            assert torch.equal(a.salient_weight, b.salient_weight), name
