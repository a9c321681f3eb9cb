"""tools/bench_recovery.py: reference perplexities, the stated target and the gap-closed column (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import import_tool

bench_recovery = import_tool("bench_recovery")


def _args(tmp_path: Path, *extra: str):
    return bench_recovery.parse_args(["--base", str(tmp_path), "--work", str(tmp_path / "runs"),
                                      "--out", str(tmp_path / "out"), *extra])


def _run(ppl: float) -> dict:
    return {"ppl": ppl, "curve": [{"minutes": 10.0, "ppl": ppl + 1}, {"minutes": 30.0, "ppl": ppl}],
            "minutes": 30.0, "cpu_seconds": 1800.0, "teacher_cpu_seconds": 0.0}


def test_given_reference_perplexities_need_no_base_results(tmp_path: Path) -> None:
    assert bench_recovery.reference_points(_args(tmp_path, "--fp", "20", "--ptq", "40")) == (20.0, 40.0)
    with pytest.raises(SystemExit) as exit_:
        bench_recovery.reference_points(_args(tmp_path, "--fp", "20"))  # no base results.json to read the PTQ from
    assert exit_.value.code == 2
    rows = [{"stage": "evaluate", "after": a, "value": v} for a, v in (("model", 20.0), ("quantize", 40.0),
                                                                      ("recover", 30.0))]
    (tmp_path / "results.json").write_text(json.dumps({"results": rows}))
    assert bench_recovery.reference_points(_args(tmp_path)) == (20.0, 40.0)
    assert bench_recovery.reference_points(_args(tmp_path, "--fp", "21")) == (21.0, 40.0)
    (tmp_path / "results.json").write_text(json.dumps({"results": rows[1:]}))  # no fp evaluation in the base run
    with pytest.raises(SystemExit):
        bench_recovery.reference_points(_args(tmp_path, "--ptq", "40"))


def test_report_states_the_target_and_the_gap_closed(tmp_path: Path) -> None:
    results = {"kd_scales_nonoise": [_run(29.0), _run(31.0)]}
    labels = {"kd_scales_nonoise": bench_recovery.VARIANTS["kd_scales_nonoise"][0]}
    half = bench_recovery.report(_args(tmp_path), 20.0, 40.0, results, labels)
    assert "target of ≥ 50 % of the gap: ≤ 30.00" in half
    assert "| 30.00 ± 1.41 | 50.0 ± 7.1 % |" in half  # (40 − 29)/20 = 55 %, (40 − 31)/20 = 45 %
    assert "target: ≤ 60.00" in bench_recovery.report(_args(tmp_path, "--target", "60"), 20.0, 200.0, results, labels)


@pytest.mark.parametrize("name", sorted(bench_recovery.VARIANTS))
def test_every_variant_is_a_valid_recipe(tmp_path: Path, name: str) -> None:
    from gift_quant.stages import parse_recipe

    base = {"model": {"name": "tiny"}, "stages": [
        {"calibrate": {"dataset": "c4", "num_samples": 8, "seq_len": 64}},
        {"select": {"metric": "gift", "fraction": 0.1}},
        {"quantize": {"method": "gptq", "bits": 3}}, {"evaluate": {"dataset": "wikitext2", "seq_len": 64}}]}
    recipe = parse_recipe(bench_recovery.variant_recipe(_args(tmp_path, "--seeds", "2"), base, name, 2))
    assert [type(s.config).__name__ for s in recipe.stages][:3] == ["CalibrateConfig", "SelectConfig", "QuantizeConfig"]


def test_mean_curve_keeps_marks_apart_from_finals_of_unmarked_seeds() -> None:
    marked = [{"curve": [{"minutes": 10.0, "ppl": 30.0}, {"minutes": 30.0, "ppl": 28.0}]},
              {"curve": [{"minutes": 10.0, "ppl": 32.0}, {"minutes": 30.0, "ppl": 29.0}]}]
    bare = {"curve": [{"minutes": 30.0, "ppl": 27.0}]}
    curve = bench_recovery.mean_curve(marked + [bare])
    assert [p["minutes"] for p in curve] == [10.0, 30.0]
    assert curve[0]["ppl"] == pytest.approx(31.0) and curve[0]["ppl_std"] == pytest.approx(2 ** 0.5)
    assert curve[1]["ppl"] == pytest.approx(28.0) and curve[1]["ppl_std"] == pytest.approx(1.0)
    assert bench_recovery.mean_curve([bare]) == [{"minutes": 30.0, "ppl": 27.0, "ppl_std": 0.0}]


def test_a_rate_override_is_named_in_the_rows_label(tmp_path: Path) -> None:
    plain = _args(tmp_path)
    base = yaml.safe_load(plain.recipe.read_text())
    assert bench_recovery.variant_label(plain, base, "ste_kd") == bench_recovery.VARIANTS["ste_kd"][0]
    faster = _args(tmp_path, "--set", "stages.recover.learning_rate=3.0e-3")
    assert "lr 3e-3" in bench_recovery.variant_label(faster, base, "ste_kd")
    assert "lr 1e-3" not in bench_recovery.variant_label(faster, base, "ste_kd")
    assert bench_recovery.variant_label(faster, base, "kd_scales_nonoise").endswith("(lr 3e-3)")  # no rate in its text
    labels = {"ste_kd": bench_recovery.variant_label(faster, base, "ste_kd")}
    assert "lr 3e-3" in bench_recovery.report(faster, 20.0, 40.0, {"ste_kd": [_run(30.0)]}, labels)
    scales = _args(tmp_path, "--set", "stages.recover.scales_learning_rate=3.0e-4")
    label = bench_recovery.variant_label(scales, base, "kd_scales")
    assert label == bench_recovery.VARIANTS["kd_scales"][0] + " (scales lr 3e-4)"
    assert bench_recovery.variant_label(scales, base, "ste_kd") == bench_recovery.VARIANTS["ste_kd"][0]  # scales fixed
    assert bench_recovery.variant_label(scales, base, "efficientqat_kd").endswith("(scales lr 3e-4)")  # by its method
