"""Perplexity against minutes of recovery, from one quantized model, for a set of recovery variants.

Every variant starts from the same post-GPTQ model: a copy of the base run's output folder (``--base``, made by the
recipe's stages up to quantize) resumes its saved layers without computing anything. A variant is the recipe stages
it runs after quantize (recover, reconstruct, or both), followed by the recipe's last evaluate stage (16 × 2048
WikiText-2 windows for the main recipe). Each run is its own process with ``OMP_NUM_THREADS=--threads``, up to
``--jobs`` at a time; budgets use the process CPU clock, so runs that share the machine still get the same work.

The table gives the final perplexity, the share of the quantization gap closed, the minutes of training on the
budget clock, and the process CPU seconds of the recovery (training plus, the first time, the teacher's logits);
with several seeds, mean ± std. The plot is perplexity (the evaluations at ``--eval-minutes``, same windows) against
minutes.

    python tools/bench_recovery.py --recipe recipes/smollm2_3bit.yaml --base OUT/base --work OUT/runs \\
        --variants paper kd kd_scales blockwise blockwise_kd --minutes 30 --seeds 0 --out OUT/table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gift_quant.comparison_report import mean_std  # noqa: E402
from gift_quant.method_specs import METHOD_SPECS, scales_train  # noqa: E402
from gift_quant.recipe import apply_override  # noqa: E402
from gift_quant.stages import stage_name  # noqa: E402

# name -> (label, stages after quantize); {M} is the budget in minutes ({H} half of it), {S} the seed, {T} the token
# cap, {E} the evaluation marks. Salient columns train at 3e-4 and scales at 3e-5 unless the row says otherwise (the
# paper's 1e-4 is its own row); noise is σ = ½·Δ of a 4-bit grid (the paper's post-quantization setting).
E2E = ("dataset: c4, seq_len: 512, batch_size: 1, budget_clock: process, max_tokens: {T}, eval_minutes: {E}, "
       "eval_windows: 16, eval_seq_len: 2048, seed: {S}")
SCALES = "train_scales: true, scales_learning_rate: 3.0e-5, train_norms: true"
BLOCK = ("epochs: 100, learning_rate: 3.0e-4, train_scales: true, scales_learning_rate: 3.0e-5, train_norms: true, "
         "budget_clock: process, seed: {S}")


def _e2e(method: str, loss: str, lr: str, extra: str = "", minutes: str = "{M}") -> str:
    noise = "noise_bits: 4, " if method == "gift_sw" else ""
    return (f"recover: {{method: {method}, loss: {loss}, learning_rate: {lr}, {noise}{extra + ', ' if extra else ''}"
            f"max_minutes: {minutes}, {E2E}}}")


# Block-AP: every weight's code through the quantizer, 2 epochs over the calibration windows per block (not timed);
# the early settings (codes' rate 0.03), kept so docs/results.md's block_ap rows resume from their saved blocks.
BLOCK_AP = ("reconstruct: {method: block_ap, epochs: 2, batch_size: 4, codes_learning_rate: 0.03, learning_rate: 3.0e-4, "
            "scales_learning_rate: 3.0e-5, train_norms: true, budget_clock: process, seed: {S}}")


# EfficientQAT's Block-AP as a baseline at equal CPU: the codes' rate that helped (0.01, a block put back when training
# raised its MSE: docs/results.md, "Why block_ap lost") within half the budget, which the stage's max_minutes counts
# with its targets and checks. Those cost a few block passes over every window: at 128 windows they alone would use a
# block's share on a 2-core AVX2 machine, at 32 they leave ~2/5 of it (2-4 steps of 4 windows there: docs/results.md,
# "The EfficientQAT-style row"). The clock alone ends the phase (epochs: null): a faster machine ran 2 epochs (16 steps
# a block) in 2/3 of the half, and the 2-bit row's cap of 16 epochs, which its clock ended, is the same schedule.
BLOCK_AP_TIMED = ("reconstruct: {method: block_ap, num_samples: 32, epochs: null, batch_size: 4, "
                  "codes_learning_rate: 0.01, learning_rate: 3.0e-4, scales_learning_rate: 3.0e-5, train_norms: true, "
                  "max_minutes: {H}, budget_clock: process, seed: {S}}")


def _block(method: str, minutes: str = "{M}") -> str:
    noise = "noise_bits: 4, " if method == "gift_sw" else ""
    return f"reconstruct: {{method: {method}, {noise}max_minutes: {minutes}, {BLOCK}}}"


VARIANTS: dict[str, tuple[str, list[str]]] = {
    "paper": ("gift_sw as in the paper (lm loss, lr 1e-4, noise)", [_e2e("gift_sw", "lm", "1.0e-4")]),
    "paper_nonoise": ("salient_ft (lm loss, lr 1e-4, no noise)", [_e2e("salient_ft", "lm", "1.0e-4")]),
    "lm": ("gift_sw, lr 3e-4 (lm loss, noise)", [_e2e("gift_sw", "lm", "3.0e-4")]),
    "kd": ("gift_sw + kd (noise)", [_e2e("gift_sw", "kd", "3.0e-4")]),
    "kd_scales": ("gift_sw + kd + scales + norms (noise)", [_e2e("gift_sw", "kd", "3.0e-4", SCALES)]),
    "kd_scales_nonoise": ("salient_ft + kd + scales + norms (no noise)", [_e2e("salient_ft", "kd", "3.0e-4", SCALES)]),
    "blockwise": ("block-wise: gift_sw + scales + norms (noise)", [_block("gift_sw")]),
    "blockwise_nonoise": ("block-wise: salient_ft + scales + norms (no noise)", [_block("salient_ft")]),
    "blockwise_kd": ("block-wise (½) + end-to-end kd (½), gift_sw + scales + norms (noise)",
                     [_block("gift_sw", "{H}"), _e2e("gift_sw", "kd", "3.0e-4", SCALES, "{H}")]),
    "blockwise_kd_nonoise": ("block-wise (½) + end-to-end kd (½), salient_ft + scales + norms (no noise)",
                             [_block("salient_ft", "{H}"), _e2e("salient_ft", "kd", "3.0e-4", SCALES, "{H}")]),
    "block_ap": ("block-wise all weights (block_ap, 2 epochs)", [BLOCK_AP]),
    "block_ap_kd_nonoise": ("block_ap, then end-to-end kd: salient_ft + scales + norms (no noise)",
                            [BLOCK_AP, _e2e("salient_ft", "kd", "3.0e-4", SCALES)]),
    "block_ap_kd": ("block_ap, then end-to-end kd: gift_sw + scales + norms (noise)",
                    [BLOCK_AP, _e2e("gift_sw", "kd", "3.0e-4", SCALES)]),
    # Issue #23's long table: STE and LoRA at their 40-step screens' interior picks (docs/results.md, "The long table";
    # LoRA's: docs/recovery_runs/lora_sweep_3bit_g64.yaml); efficientqat_kd at the block_ap runs' rates, its step sizes
    # at 3e-5 as its 3-bit rows ran, 30x below their later sweep's interior pick (docs/compare_3bit_g64_scales); the
    # 2-bit row passes its own screen's pick (2.7e-3, docs/compare_2bit_g64_scales) as stages.recover.learning_rate,
    # the 3-bit rerun 9e-4 the same way.
    "ste_kd": ("STE from the GPTQ codes' cell centres, kd (lr 1e-3)", [_e2e("ste", "kd", "1.0e-3")]),
    "lora_kd": ("LoRA on the quantized model, rank matched, kd (lr 3e-3)", [_e2e("lora", "kd", "3.0e-3")]),
    "efficientqat_kd": ("EfficientQAT-style: block_ap (½), then step sizes only end to end (½), kd (lr 3e-5)",
                        [BLOCK_AP_TIMED, _e2e("scales_only", "kd", "3.0e-5", minutes="{H}")]),
    # Its end-to-end half alone for the whole budget, at the 3-bit sweep's interior pick: what the Block-AP half adds.
    "e2e_qp_kd": ("E2E-QP alone: step sizes only end to end, kd (lr 9e-4)", [_e2e("scales_only", "kd", "9.0e-4")]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_3bit.yaml")
    p.add_argument("--base", type=Path, required=True, help="output folder of the recipe's stages up to quantize")
    p.add_argument("--work", type=Path, required=True, help="where each variant's output folder goes")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="passed to every run (e.g. stages.quantize.bits=2 when the base was made so); give it to "
                        "--collect too so the json records it")
    p.add_argument("--minutes", type=float, default=30.0, help="recovery budget, CPU minutes of the process")
    p.add_argument("--max-tokens", type=int, default=153_600, help="training text cap (and the teacher's cache)")
    p.add_argument("--eval-minutes", type=float, nargs="*", default=[10.0, 20.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json and OUT.png")
    p.add_argument("--fp", type=float, help="full-precision perplexity (default: the base run's evaluate after model)")
    p.add_argument("--ptq", type=float, help="post-quantization perplexity (default: its evaluate after quantize)")
    p.add_argument("--target", type=float, help="perplexity target to state and draw (default: half the gap closed)")
    p.add_argument("--collect", action="store_true", help="only read finished runs and write the outputs")
    return p.parse_args(argv)


def base_stages(recipe: dict) -> tuple[list, dict]:
    """The recipe's stages up to quantize (no evaluations) and its last evaluate stage."""
    stages, last_eval = [], None
    for item in recipe["stages"]:
        if stage_name(item) == "evaluate":
            last_eval = item
        elif not stages or stage_name(stages[-1]) != "quantize":
            stages.append(item)
    return stages, last_eval


def variant_recipe(args, base: dict, name: str, seed: int) -> dict:
    stages, last_eval = base_stages(base)
    fill = {"{M}": f"{args.minutes:g}", "{H}": f"{args.minutes / 2:g}", "{S}": str(seed),
            "{T}": str(args.max_tokens), "{E}": "[" + ", ".join(f"{m:g}" for m in args.eval_minutes) + "]"}
    extra = []
    for text in VARIANTS[name][1]:
        for key, value in fill.items():
            text = text.replace(key, value)
        extra.append(yaml.safe_load(text))
    return {**{k: v for k, v in base.items() if k not in ("stages", "output_dir")},
            "stages": stages + extra + [last_eval]}


def finished(out: Path) -> dict | None:
    """The results of a run that completed, else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("status") == "complete" else None


def run_one(args, base: dict, name: str, seed: int) -> Path:
    out = args.work / f"{name}-s{seed}"
    if finished(out):
        return out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.base, out)
    for stale in ("results.json", "report.md"):
        (out / stale).unlink(missing_ok=True)
    recipe = out.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump(variant_recipe(args, base, name, seed), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gift_quant.recipe", str(recipe), "--output-dir", str(out)]
    cmd += [x for o in args.overrides for x in ("--set", o)]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return out


def summarize(out: Path) -> dict | None:
    """Final perplexity, curve, minutes and CPU seconds of one finished run."""
    doc = finished(out)
    if doc is None:
        return None
    rows = doc["results"]
    final = [r for r in rows if r["stage"] == "evaluate"][-1]["value"]
    blockwise = [r for r in rows if r["stage"] == "reconstruct" and r["metric"] == "block_mse_ratio"]
    trained = [r for r in rows if r["stage"] == "recover" and r["metric"] == "train_loss"]
    teacher = [r for r in rows if r["metric"] == "teacher_tokens"]
    offset = blockwise[0]["cpu_seconds"] / 60 if blockwise else 0.0
    curve = [{"minutes": offset + r["minutes"], "ppl": r["value"]} for r in rows
             if r["metric"].endswith("_ppl_training") and r.get("windows", 0) >= 16]
    minutes = offset + (trained[0]["budget_minutes"] if trained else 0.0)
    cpu = sum(r["cpu_seconds"] for r in blockwise + trained + teacher)
    return {"ppl": final, "curve": curve + [{"minutes": minutes, "ppl": final}], "minutes": minutes,
            "cpu_seconds": cpu, "teacher_cpu_seconds": sum(r["cpu_seconds"] for r in teacher)}


def _pm(values: list[float], fmt: str = ".2f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def mean_curve(runs: list[dict]) -> list[dict[str, float]]:
    """Per evaluation mark, the mean minutes and the mean ± std perplexity (one seed: std 0). The last mark is the
    final evaluation, over every run; the marks before it only over the runs evaluated along the way (a seed run with
    bare ``--eval-minutes`` has no marks, and its final point must not stand in for another seed's first mark)."""
    def mean(points: list[dict]) -> dict[str, float]:
        ppl, std = mean_std([p["ppl"] for p in points])
        return {"minutes": statistics.fmean(p["minutes"] for p in points), "ppl": ppl, "ppl_std": std or 0.0}

    marked = [r["curve"][:-1] for r in runs if len(r["curve"]) > 1]
    shared = min(map(len, marked), default=0)
    return [mean([c[i] for c in marked]) for i in range(shared)] + [mean([r["curve"][-1] for r in runs])]


def target_line(args, fp: float, ptq: float) -> tuple[float, str]:
    """The perplexity target and its label: --target, else half the quantization gap closed."""
    if args.target is not None:
        return args.target, "target"
    return ptq - 0.5 * (ptq - fp), "target of ≥ 50 % of the gap"


def _last_recover(recipe: dict) -> dict:
    """The settings of the recipe's last recover stage ({} where it has none)."""
    bodies = [body for item in recipe["stages"] if stage_name(item) == "recover" for body in item.values()]
    return bodies[-1] if bodies else {}


def _recover_setting(recipe: dict, key: str) -> float | None:
    """``key`` of the recipe's last recover stage, as a number (None where that stage leaves it unset)."""
    value = _last_recover(recipe).get(key)
    return None if value is None else float(value)


def _written(rate: float) -> str:
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 3e-3, as the variants write their rates


def variant_label(args, base: dict, name: str) -> str:
    """The variant's description; where --set changes its recover stage's rate or, where they train, its scales'
    rate (applied as the recipe CLI applies it), the rate as run."""
    recipe = variant_recipe(args, base, name, seed=0)
    own = {key: _recover_setting(recipe, key) for key in ("learning_rate", "scales_learning_rate")}
    for item in args.overrides:
        apply_override(recipe, item)
    text = VARIANTS[name][0]
    rate = _recover_setting(recipe, "learning_rate")
    if rate is not None and rate != own["learning_rate"]:
        named = re.sub(r"\blr [0-9.e+-]+", f"lr {_written(rate)}", text)
        text = named if named != text else f"{text} (lr {_written(rate)})"
    scales = _recover_setting(recipe, "scales_learning_rate")
    if _scales_train(recipe) and scales is not None and scales != own["scales_learning_rate"]:
        text = f"{text} (scales lr {_written(scales)})"
    return text


def _scales_train(recipe: dict) -> bool:
    """Whether the recipe's last recover stage trains the step sizes (by ``train_scales`` or by its method)."""
    settings = _last_recover(recipe)
    method = settings.get("method", "")
    return method in METHOD_SPECS and scales_train(method, bool(settings.get("train_scales")))


def report(args, fp: float, ptq: float, results: dict[str, list[dict]], labels: dict[str, str]) -> str:
    gap = lambda p: 100 * (ptq - p) / (ptq - fp)  # noqa: E731
    target, label = target_line(args, fp, ptq)
    lines = [f"Perplexity: full precision {fp:.2f}, after quantization {ptq:.2f}; {label}: ≤ {target:.2f}.", "",
             "| variant | seeds | curve (minutes: ppl, mean) | ppl | gap closed | training minutes (CPU clock) | "
             "recovery CPU s | of which teacher |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        if not runs:
            continue
        curve = ", ".join(f"{p['minutes']:.0f}: {p['ppl']:.2f}" for p in mean_curve(runs)[:-1])  # [-1]: the final
        lines.append(f"| {labels[name]} | {len(runs)} | {curve} | {_pm([r['ppl'] for r in runs])} | "
                     f"{_pm([gap(r['ppl']) for r in runs], '.1f')} % | {_pm([r['minutes'] for r in runs], '.1f')} | "
                     f"{_pm([r['cpu_seconds'] for r in runs], '.0f')} | "
                     f"{_pm([r['teacher_cpu_seconds'] for r in runs], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(args, path: Path, fp: float, ptq: float, results: dict[str, list[dict]], labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, runs), marker in zip(results.items(), "osD^v<>ph*"):
        if not runs:
            continue
        curve = mean_curve(runs)
        x, y = [0.0] + [p["minutes"] for p in curve], [ptq] + [p["ppl"] for p in curve]
        err = [0.0] + [p["ppl_std"] for p in curve]
        text = labels[name] + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=text, alpha=0.85)
    target, label = target_line(args, fp, ptq)
    ax.axhline(target, color="grey", linestyle=":", label=f"{label}: ≤ {target:.2f}")
    ax.set_xlabel("minutes of recovery (process CPU clock, 1 thread)")
    ax.set_ylabel("WikiText-2 perplexity (16 × 2048)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_points(args) -> tuple[float, float]:
    """Full-precision and post-quantization perplexity: --fp/--ptq, else the base run's evaluations of the model
    as loaded (``after: model``) and right after quantize."""
    path = args.base / "results.json"
    found: dict[str, float] = {}
    if path.is_file() and None in (args.fp, args.ptq):
        for r in json.loads(path.read_text())["results"]:
            if r["stage"] == "evaluate" and r.get("after") in ("model", "quantize"):
                found.setdefault(r["after"], r["value"])
    fp = args.fp if args.fp is not None else found.get("model")
    ptq = args.ptq if args.ptq is not None else found.get("quantize")
    if fp is None or ptq is None:
        missing = " and ".join(f"--{k}" for k, v in (("fp", fp), ("ptq", ptq)) if v is None)
        print(f"error: {path} has no evaluation to take {missing} from: pass {missing}", file=sys.stderr)
        sys.exit(2)
    return fp, ptq


def main(argv=None) -> None:
    args = parse_args(argv)
    base = yaml.safe_load(args.recipe.read_text())
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    if not args.collect:
        args.work.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, base, *job), jobs))
    fp, ptq = reference_points(args)
    results = {name: [s for seed in args.seeds if (s := summarize(args.work / f"{name}-s{seed}"))]
               for name in args.variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"fp": fp, "ptq": ptq, "target": target_line(args, fp, ptq)[0], "minutes": args.minutes,
               "overrides": args.overrides, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    labels = {name: variant_label(args, base, name) for name in args.variants}
    args.out.with_suffix(".md").write_text(report(args, fp, ptq, results, labels))
    plot(args, args.out.with_suffix(".png"), fp, ptq, results, labels)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
