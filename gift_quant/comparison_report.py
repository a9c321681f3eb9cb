"""The comparison's report, without torch: statistics over seeds, the equal-CPU view, ``comparison.md``,
``comparison.json`` and ``recovery.png`` from the summary the `compare` stage builds (``tools/render_comparison.py``
merges and renders summaries of several runs with this module alone)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .io_utils import write_json, write_text


def gap_recovered(fp: float | None, start: float, after: float) -> float | None:
    """Percent of the quantization gap closed: (PTQ − method)/(PTQ − fp) · 100."""
    if fp is None or not start > fp:
        return None
    return 100.0 * (start - after) / (start - fp)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per step, the mean and std over seeds of the training curve (steps every run reached)."""
    by_step: dict[int, list[dict]] = {}
    for run in runs:
        for p in run["curve"]:
            by_step.setdefault(p["step"], []).append(p)
    curve = []
    for step, points in sorted(by_step.items()):
        if len(points) == len(runs):
            mean, std = mean_std([p["ppl"] for p in points])
            curve.append({"step": step, "tokens": points[0]["tokens"], "ppl": mean, "ppl_std": std,
                          "minutes": statistics.fmean(p.get("minutes", 0.0) for p in points),
                          "cpu_minutes": statistics.fmean(p.get("cpu_minutes", 0.0) for p in points)})
    return curve


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    summary["equal_cpu"] = equal_cpu_view(summary["methods"])
    write_json(out_dir / "comparison.json", summary)
    write_text(out_dir / "comparison.md", render_markdown(summary))
    plot_recovery(summary, out_dir / "recovery.png")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _pm(mean: float | None, std: float | None, spec: str = ".2f", unit: str = "") -> str:
    if mean is None:
        return "–"
    return f"{mean:{spec}}{unit}" + ("" if std is None else f" ± {std:{spec}}{unit}")


def _budget(t: dict[str, Any]) -> str:
    parts = [f"{t['max_steps']} steps" if t.get("max_steps") else None,
             f"{t['max_tokens']:,} tokens" if t.get("max_tokens") else None,
             f"{t['max_minutes']:g} minutes ({t['budget_clock']} clock)" if t.get("max_minutes") else None]
    return " or ".join(p for p in parts if p) + ", whichever ends first"


def exceeds_spread(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two methods' mean perplexities differ by more than twice the standard error of the difference
    (Welch); None without at least two seeds each. Rows hold ``ppl_after``, ``ppl_after_std`` and ``seeds``."""
    if a["ppl_after_std"] is None or b["ppl_after_std"] is None:
        return None
    se = math.sqrt(a["ppl_after_std"] ** 2 / len(a["seeds"]) + b["ppl_after_std"] ** 2 / len(b["seeds"]))
    return abs(a["ppl_after"] - b["ppl_after"]) > 2 * se


def _verdict(row: dict[str, Any], best: dict[str, Any] | None) -> str:
    if best is None or row is best:
        return "–"
    return {True: "yes", False: "no", None: "n/a"}[exceeds_spread(row, best)]


# ---------------------------------------------------------------- the equal-CPU view


def _interpolate(curve: list[dict[str, float]], cpu_minutes: float, key: str) -> float | None:
    """``key`` of a run's curve at ``cpu_minutes`` of training CPU time, linear between evaluations; None when the
    run has no CPU times or ended before then."""
    points = [(p["cpu_minutes"], p[key]) for p in curve if p.get("cpu_minutes") is not None]
    for (t0, y0), (t1, y1) in zip(points, points[1:]):
        if t0 <= cpu_minutes <= t1:
            return y0 if t1 == t0 else y0 + (y1 - y0) * (cpu_minutes - t0) / (t1 - t0)
    return None


def equal_cpu_view(methods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Every trained method at the same training CPU time: the shortest whole run of any method (every run of every
    method reaches it), each run's curve perplexity interpolated there, mean ± std over seeds. None when fewer than
    two methods have curves with CPU times (runs from before those were recorded)."""
    trained = [m for m in methods if m["tokens"] and all(len(r["curve"]) > 1 and r["curve"][-1].get("cpu_minutes")
                                                        for r in m["runs"])]
    if len(trained) < 2:
        return None
    ends = {m["method"]: min(r["curve"][-1]["cpu_minutes"] for r in m["runs"]) for m in trained}
    cheapest = min(ends, key=ends.get)
    budget = ends[cheapest]
    rows = []
    for m in trained:
        ppl = [_interpolate(r["curve"], budget, "ppl") for r in m["runs"]]
        steps = [_interpolate(r["curve"], budget, "step") for r in m["runs"]]
        mean, std = mean_std(ppl)
        full, full_std = mean_std([r["curve"][-1]["ppl"] for r in m["runs"]])
        rows.append({"method": m["method"], "seeds": m["seeds"], "ppl_after": mean, "ppl_after_std": std,
                     "steps": statistics.fmean(steps), "budget_steps": m["steps"], "full_ppl": full,
                     "full_ppl_std": full_std})
    return {"cpu_minutes": budget, "cheapest": cheapest, "methods": rows}


def render_markdown(summary: dict[str, Any]) -> str:
    t, e = summary["training"], summary["eval"]
    grid = "each layer's own grid" if t["noise_bits"] is None else f"a {t['noise_bits']}-bit grid"
    methods = summary["methods"]
    trained = [m for m in methods if m["tokens"]]
    best = min(trained, key=lambda m: m["ppl_after"]) if trained else None
    lr_note = (f"learning rate per method picked from {t['lr_sweep'] or 'its own candidates'} (extended past an edge "
               f"pick up to {t.get('lr_sweep_extend', 0)} log-steps; table below) by held-out `{t['dataset']}` "
               f"perplexity after {t['sweep_fraction']:.0%} of the budget"
               if t["lr_sweep"] or t.get("lr_sweeps") else "learning rates as configured")
    lines = [
        f"# Recovery after quantization: {summary['model']}",
        "",
        f"Every method starts from the same quantized model and trains on `{t['dataset']}` with the `{t['loss']}` loss "
        f"for {_budget(t)}, batches of {t['batch_size']}×{t['gradient_accumulation_steps']} sequences of "
        f"{t['seq_len']} tokens, AdamW, cosine schedule, {t['warmup_ratio']:.0%} warmup, seeds {t['seeds']}, "
        f"{lr_note}, on {summary['device']}. GIFT-SW noise: {t['noise']}, σ = {t['noise_scale']}·Δ of {grid}.",
        "",
        f"Perplexity: `{e['dataset']}`, {e['windows']} windows of {e['seq_len']} tokens, mean ± std over seeds. "
        f"Full precision {_fmt(summary['fp_ppl'])} ({summary['sources']['fp']}), "
        f"after quantization {_fmt(summary['ptq_ppl'])} ({summary['sources']['start']}).",
        "",
        "| method | lr | trainable params | tokens | ppl after | gap recovered | codes flipped | CPU s | seconds "
        f"| peak memory (MB) | differs from {best['method'] if best else 'best'} beyond the spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in methods:
        trained_row = bool(m["tokens"])
        lr = format(m["learning_rate"], "g") if trained_row else "–"
        flipped = (f"{m['codes_flipped']:,} of {m['codes_total']:,}" if m.get("codes_flipped") is not None else "–")
        verdict = _verdict(m, best) if trained_row else "–"
        lines.append(
            f"| {m['method']} | {lr} | {m['trainable_params']:,} | {m['tokens']:,} | "
            f"{_pm(m['ppl_after'], m['ppl_after_std'])} | {_pm(m['gap_recovered_pct'], m['gap_recovered_std'], '.1f', ' %')} | "
            f"{flipped} | {m['cpu_seconds']:.0f} | {m['seconds']:.0f} | {_fmt(m['peak_mb'] if trained_row else None, '.0f')} | "
            f"{verdict} |")
    sweeps = [m for m in methods if m["lr_sweep"]]
    if sweeps:
        rates = sorted({x["learning_rate"] for m in sweeps for x in m["lr_sweep"]})
        lines += ["", "Learning-rate sweep (held-out perplexity, first seed, shortened run; bold: the pick):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---:|" * len(rates)]
        for m in sweeps:
            ppl = {x["learning_rate"]: x["heldout_ppl"] for x in m["lr_sweep"]}
            cells = ["–" if lr not in ppl else f"**{ppl[lr]:.2f}**" if lr == m["learning_rate"] else f"{ppl[lr]:.2f}"
                     for lr in rates]
            lines.append(f"| {m['method']} | " + " | ".join(cells) + " |")
        edge = [m["method"] for m in sweeps if _at_sweep_edge(m)]
        if edge:
            lines += ["", f"Picked at the edge of the sweep (a better rate may lie outside it): {', '.join(edge)}."]
    lines += _equal_cpu_lines(summary)
    lines += [
        "",
        "- Gap recovered = (PTQ − method) / (PTQ − fp). Embeddings, norms and lm_head stay frozen for every method.",
        "- " + "; ".join(f"`{m['method']}`: {m['trains']}" for m in methods),
        "- Beyond the spread: |Δ mean| > 2·√(s₁²/n₁ + s₂²/n₂) against the best method (needs ≥ 2 seeds each).",
        "- Peak memory: CUDA max allocated, or on CPU the process's peak RSS (which includes the starting model and "
        "its copy). CPU s: process CPU time of the training (all threads).",
        f"- The curve in `recovery.png` is perplexity on {e['curve_windows']} windows of {e['curve_seq_len']} tokens "
        "during training (mean ± std over seeds).",
    ]
    resumed = [m["method"] for m in methods if m.get("resumed_from")]
    if resumed:
        lines.append(f"- Resumed from a checkpoint (seconds include the saved part; memory covers the resumed part): "
                     f"{', '.join(resumed)}.")
    return "\n".join(lines) + "\n"


def _at_sweep_edge(m: dict[str, Any]) -> bool:
    rates = [x["learning_rate"] for x in m["lr_sweep"]]
    return len(rates) > 1 and m["learning_rate"] in (min(rates), max(rates))


def _equal_cpu_lines(summary: dict[str, Any]) -> list[str]:
    view, e = summary.get("equal_cpu"), summary["eval"]
    if not view:
        return []
    best = min(view["methods"], key=lambda m: m["ppl_after"])
    lines = ["", f"At equal CPU time: each method after {view['cpu_minutes']:.1f} CPU minutes of training steps, the "
             f"shortest whole run (`{view['cheapest']}`). Perplexity on the curve's {e['curve_windows']} windows of "
             f"{e['curve_seq_len']} tokens, interpolated between evaluations, mean ± std over seeds; a method still "
             "mid-schedule there has not decayed its learning rate. Evaluations and the teacher's cached logits are "
             "not counted.", "",
             f"| method | steps by then (of its budget) | ppl at equal CPU | ppl at its full budget | differs from "
             f"{best['method']} beyond the spread |", "|---|---:|---:|---:|---|"]
    lines += [f"| {m['method']} | {m['steps']:.0f} of {m['budget_steps']} | "
              f"{_pm(m['ppl_after'], m['ppl_after_std'])} | {_pm(m['full_ppl'], m['full_ppl_std'])} | "
              f"{_verdict(m, best)} |" for m in view["methods"]]
    return lines


def plot_recovery(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view, e = summary.get("equal_cpu"), summary["eval"]
    fig, axes = plt.subplots(1, 2 if view else 1, figsize=(12 if view else 7, 4.5), squeeze=False)
    xs = [("tokens", "training tokens seen")] + ([("cpu_minutes", "training CPU minutes")] if view else [])
    for ax, (key, label) in zip(axes[0], xs):
        styles = zip("osD^v<>ph", ["-", "--", "-.", ":"] * 3)  # curves can coincide (e.g. ste and salient_ft early)
        for m, (marker, line) in zip(summary["methods"], styles):
            if m["curve"]:
                err = [p.get("ppl_std") or 0.0 for p in m["curve"]]
                ax.errorbar([p.get(key, 0.0) for p in m["curve"]], [p["ppl"] for p in m["curve"]], yerr=err,
                            marker=marker, linestyle=line, alpha=0.85, capsize=3, label=m["method"])
        ax.set_xlabel(label)
        ax.set_ylabel(f"{e['dataset']} perplexity ({e['curve_windows']}×{e['curve_seq_len']} tokens)")
        ax.grid(alpha=0.3)
    if view:
        axes[0][1].axvline(view["cpu_minutes"], color="grey", linewidth=1, label="equal CPU time")
    fig.suptitle(f"Recovery after quantization: {summary['model']}")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][-1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
