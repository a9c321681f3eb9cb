"""Whole recipes on a tiny Llama: the stages hand each other what they promise."""

from __future__ import annotations

import csv
import json
import math

import pytest


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


@pytest.mark.parametrize("static_groups", [True, False])
def test_grouped_act_order_format_of_the_llama_recipes_exports_and_reloads(tiny_run, static_groups):
    # The Llama-2 recipes' format: groups with zero points, columns in act order; static groups keep each group
    # contiguous (the packed layer's fast path), dynamic ones store a permuted g_idx. Both reload to the same model.
    quantize = ("{method: gptq, bits: 2, group_size: 16, sym: false, mse: true, act_order: true, "
                f"static_groups: {str(static_groups).lower()}}}")
    rc, out = tiny_run(RECIPE.replace("{method: gptq, bits: 3, mse: true}", quantize))
    assert rc == 0
    r = rows(out)
    fp, quant = [x["value"] for x in r if x["metric"] == "eval_ppl"]
    (reloaded,) = [x for x in r if x["metric"].endswith("_ppl_reloaded")]
    assert math.isfinite(quant) and quant != fp
    assert math.isclose(reloaded["value"], quant, rel_tol=1e-3)
    config = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    assert (config["group_size"], config["sym"], config["desc_act"]) == (16, False, not static_groups)


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


def test_a_damaged_saved_layer_is_recomputed_with_a_warning(tiny_run, caplog):
    recipe = RECIPE.replace("  - export: {verify: float32}\n", "")
    quantize_row = lambda out: next(x for x in rows(out) if x["stage"] == "quantize")  # noqa: E731
    assert tiny_run(recipe)[0] == 0
    first = rows(tiny_run.last_out)
    layer0 = tiny_run.last_out / "quantize" / "layer_0000.safetensors"
    data = bytearray(layer0.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data: safetensors itself would not notice
    layer0.write_bytes(bytes(data))
    rc, out = tiny_run(recipe)
    assert rc == 0 and quantize_row(out)["resumed_layers"] == 1  # layer 0 recomputed, layer 1 taken from disk
    assert "fails its checksum" in caplog.text
    assert [x["value"] for x in rows(out)] == [x["value"] for x in first]  # the same result


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


# ---------------------------------------------------------------- the export never deletes what it did not create

QUICK = """
model: {name: tiny}
stages:
  - calibrate: {dataset: TRAIN, num_samples: 4, seq_len: 32}
  - quantize: {method: rtn, bits: 4}
  - export: {path: TARGET}
"""


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "recipe.yaml")


def test_export_into_the_output_folder_or_working_directory_is_refused(tiny_run, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me too")
    for target, why in ((out, "contains the output folder"), (".", "contains the working directory"),
                        (tmp_path, "contains the working directory")):
        before = _tree(tmp_path)
        rc, _ = tiny_run(QUICK.replace("TARGET", str(target)))
        err = capsys.readouterr().err
        assert rc == 2 and why in err and err.count("\n") == 1, err
        assert _tree(tmp_path) == before  # nothing deleted, nothing written: refused before any work
    assert (work / "notes.txt").read_text() == "keep me" and (out / "mine.txt").read_text() == "keep me too"


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tiny_run, tmp_path, capsys):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    rc, _ = tiny_run(QUICK.replace("TARGET", str(target)))
    assert rc == 2 and "is not a previous gift_quant export" in capsys.readouterr().err
    assert _tree(target) == ["thesis.tex"]
    target.joinpath("thesis.tex").unlink()  # an empty folder may be filled
    assert tiny_run(QUICK.replace("TARGET", str(target)))[0] == 0
    first = (target / "model.safetensors").stat().st_mtime_ns
    assert tiny_run(QUICK.replace("TARGET", str(target)))[0] == 0  # an earlier export is replaced
    assert (target / "model.safetensors").stat().st_mtime_ns != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious")]  # no temporary siblings left


def test_partial_folders_of_a_killed_export_are_cleaned_on_the_next_run(tiny_run, tmp_path):
    from gift_quant.io_utils import PARTIAL_MARK

    target = tmp_path / "packed"
    dead = tmp_path / ".packed.abc123.tmp"  # what a kill -9 during an export leaves
    dead.mkdir()
    (dead / PARTIAL_MARK).write_text("999999999\n")  # a pid that does not exist
    (dead / "model.safetensors").write_bytes(b"half")
    foreign = tmp_path / ".packed.user.tmp"  # same name pattern, not ours: untouched
    foreign.mkdir()
    assert tiny_run(QUICK.replace("TARGET", str(target)))[0] == 0
    assert not dead.exists() and foreign.is_dir() and (target / "gift_quant_manifest.json").is_file()
