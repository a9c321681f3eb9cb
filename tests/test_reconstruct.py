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
  - quantize: {method: gptq, bits: 2}
  - reconstruct: {method: METHOD, epochs: 4, batch_size: 2, learning_rate: 0.001, train_scales: SCALES,
                  train_norms: NORMS, noise_bits: 8}   # a 2-bit grid's own Δ/2 would drown this tiny signal
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
"""


def run(tiny_run, tmp_path, folder: str, **settings):
    from gift_quant.config import parse_recipe
    from gift_quant.pipeline import run as run_recipe

    text = RECIPE
    for key, value in {"METHOD": "gift_sw", "SCALES": "true", "NORMS": "false", **settings}.items():
        text = text.replace(key, str(value))
    text = text.replace("TRAIN", str(tmp_path / "train.jsonl")).replace("EVAL", str(tmp_path / "eval.txt"))
    return run_recipe(parse_recipe(yaml.safe_load(text)), tmp_path / folder)


def quantized_only(tiny_run, tmp_path):
    from gift_quant.config import parse_recipe
    from gift_quant.pipeline import run as run_recipe

    text = RECIPE.split("  - reconstruct")[0].replace("TRAIN", str(tmp_path / "train.jsonl"))
    return run_recipe(parse_recipe(yaml.safe_load(text)), tmp_path / "plain").model


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


def test_a_time_budget_anneals_the_learning_rate_to_zero_by_its_end(monkeypatch):
    # A budget in seconds that ends long before the epochs do must still end the cosine schedule. The fake clock reads
    # one second further at every look, so 20 seconds end training after about 10 of the 400 scheduled steps.
    import gift_quant.reconstruct as reconstruct
    from gift_quant.calibrate import Chunk
    from gift_quant.config import ReconstructConfig
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
    cfg = ReconstructConfig(epochs=100, learning_rate=1e-2)
    steps = reconstruct.train_block(block, inputs, targets, cfg, seconds=20.0, seed=0, progress=tqdm(disable=True))
    assert 5 <= steps <= 20 < cfg.epochs * len(inputs)
    assert optimizers[0].param_groups[0]["lr"] < 0.02 * cfg.learning_rate  # the epochs alone left it at 99 %
