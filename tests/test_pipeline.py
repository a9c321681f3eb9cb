"""Whole recipes on a tiny Llama: the stages hand each other what they promise."""

from __future__ import annotations

import csv
import json
import math


RECIPE = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 8}
  - calibrate: {dataset: TRAIN, num_samples: 16, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - quantize: {method: gptq, bits: 3, mse: true}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 8}
  - export: {verify: float32}
"""


def rows(out):
    return json.loads((out / "results.json").read_text())["results"]


def test_quantize_and_export_recipe_end_to_end(tiny_run):
    rc, out = tiny_run(RECIPE)
    assert rc == 0
    r = rows(out)
    fp, quant = [x["value"] for x in r if x["metric"] == "eval_ppl"]
    assert math.isfinite(quant) and quant != fp
    (bpw,) = [x for x in r if x["metric"] == "bits_per_weight"]
    assert 3 < bpw["value"] < 16
    (reloaded,) = [x for x in r if x["metric"].endswith("_ppl_reloaded")]
    # Scales are fp16-exact by construction; salient columns are stored in fp16, so the reload matches closely.
    assert math.isclose(reloaded["value"], quant, rel_tol=1e-3)
    log = list(csv.DictReader((out / "quantize_log.csv").open()))
    assert len(log) == 14 and {row["salient"] for row in log} == {"8", "16"}
    assert all(float(row["gptq_loss"]) >= 0 for row in log)


def test_rerun_resumes_quantization_and_a_changed_setting_starts_over(tiny_run):
    recipe = RECIPE.replace("  - export: {verify: float32}\n", "")
    quantize_row = lambda out: next(x for x in rows(out) if x["stage"] == "quantize")  # noqa: E731
    assert tiny_run(recipe)[0] == 0
    first = rows(tiny_run.last_out)
    rc, out = tiny_run(recipe)
    assert rc == 0 and quantize_row(out)["resumed_layers"] == 2
    assert [x["value"] for x in rows(out)] == [x["value"] for x in first]  # same numbers from the saved layers
    rc, out = tiny_run(recipe, "--set", "stages.quantize.bits=4")
    assert rc == 0 and quantize_row(out)["resumed_layers"] == 0


def test_quantize_without_calibration_is_a_user_error(tiny_run, capsys):
    rc, _ = tiny_run("model: {name: tiny}\nstages:\n  - quantize: {method: gptq}\n")
    assert rc == 2
    assert "add a 'calibrate' stage" in capsys.readouterr().err


def test_rotate_then_quantize(tiny_run):
    rc, out = tiny_run(RECIPE.replace("  - calibrate:", "  - rotate: {mode: hadamard}\n  - calibrate:"))
    assert rc == 0
    r = rows(out)
    assert any(x["stage"] == "rotate" for x in r)
    (reloaded,) = [x for x in r if x["metric"].endswith("_ppl_reloaded")]
    quant = [x["value"] for x in r if x["stage"] == "evaluate"][1]
    assert math.isclose(reloaded["value"], quant, rel_tol=1e-3)
