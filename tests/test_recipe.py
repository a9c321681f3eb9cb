"""Recipe validation and the command line: every user error is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gift_quant.config import QuantizeConfig
from gift_quant.stages import parse_recipe, parse_stage
from gift_quant.recipe import load_recipe, main

REPO = Path(__file__).resolve().parents[1]
# The main recipes and the ones docs/ quotes beside its measured numbers: both are commands users copy.
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "docs" / "recovery_runs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipes_validate(recipe):
    r = load_recipe(recipe)
    assert r.stages, recipe


def test_stage_settings_are_typed_and_defaults_filled():
    r = parse_recipe({"stages": [{"evaluate": {"max_windows": 16}}, "calibrate", {"quantize": {"bits": 3}}]})
    assert [s.name for s in r.stages] == ["evaluate", "calibrate", "quantize"]
    q = r.stages[2].config
    assert isinstance(q, QuantizeConfig) and q.bits == 3 and q.method == "gptq" and q.group_size == -1
    assert r.stages[0].config.seq_len == 2048
    # the resolved recipe reads back to the same thing
    assert parse_recipe(r.to_dict()) == r


def test_python_api_equals_yaml():
    from gift_quant.config import EvaluateConfig

    r = parse_recipe(yaml.safe_load("stages:\n  - evaluate: {max_windows: 4, seq_len: 128}\n"))
    assert r.stages[0].config == EvaluateConfig(max_windows=4, seq_len=128)


BAD = {
    "missing": None,
    "bad_yaml": "stages: [evaluate: {max_windows: 3}\n",
    "unknown_key": "stages:\n  - evaluate: {max_windowz: 3}\n",
    "unknown_stage": "stages:\n  - quantise: {}\n",
    "wrong_type": "stages:\n  - evaluate: {max_windows: many}\n",
    "out_of_range": "stages:\n  - quantize: {bits: 5}\n",
    "negative": "stages:\n  - evaluate: {seq_len: -1}\n",
    "top_level_typo": "modle: {name: x}\nstages: [evaluate]\n",
    "no_stages": "model: {name: x}\n",
    "both_counts": "stages:\n  - select: {count: 4, fraction: 0.1}\n",
}
EXPECT = {"missing": "recipe not found", "bad_yaml": "invalid YAML", "unknown_key": "max_windowz: unknown key",
          "unknown_stage": "unknown stage 'quantise'", "wrong_type": "max_windows", "out_of_range": "bits",
          "negative": "seq_len", "top_level_typo": "modle: unknown key", "no_stages": "stages",
          "both_counts": "either count or fraction"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_exit_2_with_one_line(case, tmp_path, capsys):
    path = tmp_path / "absent.yaml" if BAD[case] is None else write(tmp_path, BAD[case])
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert EXPECT[case] in err, err


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    path = write(tmp_path, BAD["unknown_key"])
    proc = subprocess.run([sys.executable, "-m", "gift_quant.recipe", str(path)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_unknown_model_and_missing_data_are_user_errors(tmp_path, capsys):
    path = write(tmp_path, "model: {name: ./no/such/folder}\nstages: [evaluate]\n")
    assert main([str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    path = write(tmp_path, f"data: {{dir: {tmp_path / 'nodata'}}}\nmodel: {{name: ./x}}\nstages: [evaluate]\n")
    (tmp_path / "x").mkdir()
    assert main([str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_hub_model_without_network_is_a_user_error(tmp_path, capsys, offline):
    path = write(tmp_path, "model: {name: nobody/no-such-model-xyz}\nstages: [evaluate]\n")
    assert main([str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'nobody/no-such-model-xyz'" in err and err.count("\n") == 1


def test_set_overrides_and_dry_run_prints_plan(tmp_path, capsys):
    recipe = REPO / "recipes" / "llama2_3bit.yaml"
    assert main([str(recipe), "--dry-run", "--set", "stages.quantize.bits=2", "--set", "model.dtype=bfloat16",
                 "--output-dir", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "meta-llama/Llama-2-7b-hf" in out and "bits=2" in out and "bfloat16" in out
    assert not (tmp_path / "plan").exists()  # a dry run writes nothing


def test_set_on_ambiguous_stage_name_asks_for_position(tmp_path, capsys):
    recipe = REPO / "recipes" / "llama2_3bit.yaml"
    assert main([str(recipe), "--dry-run", "--set", "stages.evaluate.max_windows=2"]) == 2
    assert "stages.N.key" in capsys.readouterr().err
    assert main([str(recipe), "--dry-run", "--set", "stages.0.max_windows=2"]) == 0


def test_run_writes_results_report_and_resolved_recipe(tmp_path, tiny_model, monkeypatch):
    """End to end on a tiny model: the runner, the evaluate stage and the output files."""
    import gift_quant.models as models
    from conftest import CharTokenizer

    text = tmp_path / "eval.txt"
    text.write_text("abcdefgh " * 200)
    monkeypatch.setattr(models, "load_model", lambda cfg: (tiny_model, CharTokenizer()))
    tiny_model.config.vocab_size = 128
    # CharTokenizer ids are bytes; keep them inside the tiny vocabulary (ASCII text only)
    path = write(tmp_path, f"model: {{name: tiny}}\nstages:\n  - evaluate: {{dataset: {text}, seq_len: 64, max_windows: 3}}\n")
    out = tmp_path / "out"
    assert main([str(path), "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    (row,) = results["results"]
    assert row["stage"] == "evaluate" and row["tokens"] == 3 * 63 and row["value"] > 1
    assert (out / "report.md").read_text().startswith("# gift_quant run")
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["stages"][0]["evaluate"]["max_windows"] == 3
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


# ---------------------------------------------------------------- rules between stages, checked at parse time

ORDER = {
    "rotate_after_quantize": ("[calibrate, quantize, rotate]", "must come before the quantize stage"),
    "gptq_without_calibrate": ("[quantize]", "gptq needs calibration data"),
    "select_after_quantize": ("[calibrate, quantize, select]", "must come before a quantize stage"),
    "select_without_quantize": ("[calibrate, select]", "must come before a quantize stage"),
    "rtn_select_without_data": ("[select, {quantize: {method: rtn}}]", "salient selection needs calibration"),
    "two_quantize": ("[calibrate, quantize, quantize]", "at most one quantize stage"),
    "two_select": ("[calibrate, select, select, quantize]", "at most one select stage"),
    "recover_first": ("[recover, calibrate, quantize]", "needs the quantized model"),
    "compare_without_quantize": ("[compare]", "needs the quantized model"),
    "export_without_quantize": ("[calibrate, export]", "needs the quantized model"),
    "export_after_lora": ("[calibrate, quantize, {recover: {method: lora}}, export]", "LoRA recovery keeps unmerged"),
    "pre_gift_without_quantize": ("[calibrate, select, {recover: {order: before}}]", "must come before a quantize"),
    "pre_gift_without_select": ("[calibrate, {recover: {order: before}}, quantize]", "calibrate and select stages"),
    "bad_target_regex": ("[calibrate, {quantize: {targets: ['proj(']}}]", "not a valid regular expression"),
    "bad_override_regex": ("[calibrate, {select: {count: 1, overrides: {'*x': 2}}}, quantize]",
                           "not a valid regular expression"),
    "no_targets": ("[calibrate, {quantize: {targets: []}}]", "targets"),
}


@pytest.mark.parametrize("case", sorted(ORDER))
def test_stage_rules_are_checked_by_dry_run(case, tmp_path, capsys):
    stages, expected = ORDER[case]
    assert main([str(write(tmp_path, f"stages: {stages}\n")), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("case", ["compare_without_quantize", "export_after_lora", "pre_gift_without_select"])
def test_stage_rules_hold_for_a_recipe_built_in_python(case, tmp_path):
    """The stages trust the stage table's order: a recipe that was never parsed is checked by preflight, before
    the model loads (no folder is written either)."""
    from gift_quant.config import Recipe
    from gift_quant.errors import UserError
    from gift_quant.pipeline import run

    stages, expected = ORDER[case]
    recipe = Recipe(stages=[parse_stage(i, s) for i, s in enumerate(yaml.safe_load(stages))])  # order unchecked
    with pytest.raises(UserError, match=expected.split(":")[0]):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stages", [
    "[calibrate, select, quantize, recover, evaluate, export]",
    "[rotate, calibrate, select, quantize, compare, export]",
    "[calibrate, select, {recover: {order: before}}, quantize, export]",
    "[{quantize: {method: rtn}}, export]",
    "[evaluate, rotate, evaluate]",
])
def test_legitimate_stage_orders_pass(stages, tmp_path):
    assert main([str(write(tmp_path, f"stages: {stages}\n")), "--dry-run"]) == 0


@pytest.mark.parametrize("text, expected", [
    ("stages:\n  - evaluate: {seq_len: 64, seq_len: 128}\n", "duplicate key 'seq_len'"),
    ("model: {name: a}\nmodel: {name: b}\nstages: [evaluate]\n", "duplicate key 'model'"),
    ("output_dir: ''\nstages: [evaluate]\n", "output_dir: must name a folder of its own"),
    ("stages: " + "[" * 200 + "]" * 200 + "\n", "nested"),
])
def test_yaml_surprises_are_refused(text, expected, tmp_path, capsys):
    assert main([str(write(tmp_path, text)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_recipe_that_is_not_utf8_is_one_line(encoding, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes("# café\nstages: [evaluate]\n".encode(encoding))
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err, err


def test_set_with_bad_yaml_is_one_line(tmp_path, capsys):
    path = write(tmp_path, "stages: [evaluate]\n")
    assert main([str(path), "--dry-run", "--set", "stages.evaluate.seq_len=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set stages.evaluate.seq_len: invalid YAML" in err, err


@pytest.mark.parametrize("recipe", ["smollm2_3bit.yaml", "smollm2_3bit_compare.yaml", "llama2_3bit.yaml"])
def test_dry_run_imports_no_torch(recipe: str) -> None:
    # Planning a run must stay cheap: validation, preflight's recipe checks and the estimate are torch-free.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\nfrom gift_quant.recipe import main\n"
            f"rc = main([{str(root / 'recipes' / recipe)!r}, '--dry-run'])\n"
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stdout[-2000:] + out.stderr[-2000:]


def test_the_comparison_report_and_the_budget_import_no_torch() -> None:
    # tools/render_comparison.py renders summaries with the report module alone; the estimate reads the budget module.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nimport gift_quant.comparison_report, gift_quant.budget, gift_quant.estimate\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
