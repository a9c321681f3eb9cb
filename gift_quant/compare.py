"""Stage `compare`: every recovery method from the same quantized model at equal budget, side by side.

Each method trains a deep copy of the current (quantized) model with the same text, tokens, loss, batch and sequence
length, once per seed; with ``lr_sweep`` each method first picks its learning rate by the perplexity on held-out
training-text documents (never WikiText) after a shortened run. The stage writes ``comparison.json``,
``comparison.md`` (mean ± std over seeds, codes flipped, trainable parameters, CPU seconds, and every method at the
same training CPU time) and ``recovery.png`` (perplexity against tokens seen and against CPU minutes, error bars)
and leaves ``state.model`` as it found it. The full-precision and post-quantization perplexities come from earlier
`evaluate` rows with the same text, window length and window count when there are such rows; otherwise they are
measured here (the fp model is reloaded for that).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from .config import CompareConfig, EvaluateConfig, RecoverConfig, entry_method, method_config
from .data import load_documents, packed_sequences, source_label
from .distributed import is_main
from .errors import UserError
from .evaluate import eval_ids, perplexity
from .io_utils import write_json, write_text
from .layers import mixed_linears
from .methods import METHODS, RecoveryMethod
from .recover import heldout_blocks, run_method
from .training import TrainReport

log = logging.getLogger(__name__)

# Stages after which the model still computes the full-precision function (rotation is exact in fp).
FP_STAGES = {"model", "calibrate", "select", "rotate"}


def _model_states(results: list[dict[str, Any]], last_stage: str) -> tuple[list[tuple[str, dict]], str]:
    """Each evaluate row with the stage whose model it measured, and the stage whose model is current.

    A row's ``after`` names the stage run just before it; rows of any other stage show that stage has run.
    """
    current, rows = "model", []
    for row in results:
        if row.get("stage") == "evaluate":
            if row.get("after") not in (None, "evaluate"):
                current = row["after"]
            rows.append((current, row))
        else:
            current = row.get("stage", current)
    if last_stage != "evaluate":
        current = last_stage
    return rows, current


def _same_settings(row: dict[str, Any], metric: str, seq_len: int, windows: int) -> bool:
    if row.get("metric") != metric:
        return False
    return row.get("seq_len") == seq_len and row.get("windows") == windows


def earlier_perplexities(results: list[dict[str, Any]], last_stage: str, metric: str, seq_len: int,
                         windows: int) -> tuple[float | None, float | None]:
    """(full-precision, current model) perplexities from earlier evaluate rows with these settings, None if absent."""
    rows, current = _model_states(results, last_stage)
    matching = [(s, r) for s, r in rows if _same_settings(r, metric, seq_len, windows)]
    fp = [r["value"] for s, r in matching if s in FP_STAGES]
    now = [r["value"] for s, r in matching if s == current] if rows and rows[-1][0] == current else []
    return (fp[-1] if fp else None), (now[-1] if now else None)


def _measure_fp(state, ids: torch.Tensor, cfg: CompareConfig) -> float:
    from .models import load_model

    log.info("no full-precision evaluation with these settings in this run: reloading the model to measure it")
    model, _ = load_model(state.recipe.model)
    value = perplexity(model.to(state.device), ids, cfg.final_seq_len, cfg.final_windows, device=state.device).value
    del model
    gc.collect()
    return value


def gap_recovered(fp: float | None, start: float, after: float) -> float | None:
    """Percent of the quantization gap closed: (PTQ − method)/(PTQ − fp) · 100."""
    if fp is None or not start > fp:
        return None
    return 100.0 * (start - after) / (start - fp)


def _train_copy(state, base, mcfg: RecoverConfig, out_dir: Path, ids: torch.Tensor, cfg: CompareConfig,
                heldout: torch.Tensor | None = None) -> tuple[TrainReport, float]:
    """Train a copy of ``base``; (report, perplexity after) on the final windows, or on ``heldout`` when given."""
    model = copy.deepcopy(base)
    report = run_method(state, model, mcfg, out_dir)
    if heldout is not None:
        after = perplexity(model, heldout.reshape(1, -1), cfg.seq_len, None, device=state.device).value
    else:
        after = perplexity(model, ids, cfg.final_seq_len, cfg.final_windows, device=state.device).value
    del model
    gc.collect()
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
    return report, after


def pick_learning_rate(state, base, cfg: CompareConfig, method: str, ids, heldout) -> tuple[float, list[dict]]:
    """The candidate with the lowest held-out perplexity after a shortened run (first seed). A pick at an edge of the
    candidates extends the sweep past that edge, one log-step at a time (the edge's ratio to its neighbour), up to
    ``lr_sweep_extend`` extra runs, so the rate reported is an interior minimum or is flagged as an edge."""
    trials: dict[float, dict] = {}

    def trial(lr: float) -> None:
        mcfg = method_config(cfg, method, lr, cfg.seeds[0], cfg.sweep_fraction)
        report, ppl = _train_copy(state, base, mcfg, state.output_dir / "compare" / method / f"sweep-lr{lr:g}", ids,
                                  cfg, heldout)
        trials[lr] = {"learning_rate": lr, "heldout_ppl": ppl, "tokens": report.tokens}
        log.info("compare: %s lr %g -> held-out ppl %.3f", method, lr, ppl)

    for lr in cfg.sweep_for(method):
        trial(lr)
    for _ in range(cfg.lr_sweep_extend):
        beyond = _beyond_edge(trials)
        if beyond is None:
            break
        trial(beyond)
    ordered = [trials[lr] for lr in sorted(trials)]
    return min(ordered, key=lambda t: t["heldout_ppl"])["learning_rate"], ordered


def _beyond_edge(trials: dict[float, dict]) -> float | None:
    """The next log-spaced candidate past the best rate when it is the lowest or highest tried; None when interior."""
    rates = sorted(trials)
    if len(rates) < 2:
        return None
    best = min(rates, key=lambda lr: trials[lr]["heldout_ppl"])
    if best == rates[0]:
        return float(f"{rates[0] ** 2 / rates[1]:.2g}")
    if best == rates[-1]:
        return float(f"{rates[-1] ** 2 / rates[-2]:.2g}")
    return None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per step, the mean and std over seeds of the training curve (steps every run reached)."""
    by_step: dict[int, list[dict]] = {}
    for run in runs:
        for p in run["curve"]:
            by_step.setdefault(p["step"], []).append(p)
    curve = []
    for step, points in sorted(by_step.items()):
        if len(points) == len(runs):
            mean, std = _mean_std([p["ppl"] for p in points])
            curve.append({"step": step, "tokens": points[0]["tokens"], "ppl": mean, "ppl_std": std,
                          "minutes": statistics.fmean(p.get("minutes", 0.0) for p in points),
                          "cpu_minutes": statistics.fmean(p.get("cpu_minutes", 0.0) for p in points)})
    return curve


def registered_method(cfg: CompareConfig, name: str) -> RecoveryMethod:
    """The registered recovery method behind an entry of ``methods``: the method itself or the one a variant names."""
    return METHODS[entry_method(cfg, name)]


def _trains(cfg: CompareConfig, name: str) -> str:
    """What an entry trains, in words: its method's description and its variant's own settings."""
    variant = dict(cfg.variants.get(name, {"method": name}))
    text = METHODS[variant.pop("method")].trains
    return text + (f" ({', '.join(f'{k}: {v}' for k, v in variant.items())})" if variant else "")


def run_entry(state, base, cfg: CompareConfig, method: str, ids, heldout, start: float, fp: float | None
              ) -> dict[str, Any]:
    """One method: its learning rate (given or swept), a run per seed, and the statistics over seeds."""
    sweep: list[dict] = []
    registered = registered_method(cfg, method)
    if cfg.sweep_for(method) and not registered.trains_nothing:
        lr, sweep = pick_learning_rate(state, base, cfg, method, ids, heldout)
    else:
        lr = cfg.learning_rates.get(method, cfg.learning_rate)
    runs = []
    for seed in cfg.seeds:
        if registered.trains_nothing:
            report, after = TrainReport(method=method, trainable_params=0), start
        else:
            folder = state.output_dir / "compare" / method / (f"seed{seed}" if len(cfg.seeds) > 1 else "")
            report, after = _train_copy(state, base, method_config(cfg, method, lr, seed), folder, ids, cfg)
        runs.append({**report.to_dict(), "method": method, "seed": seed, "ppl_after": after,
                     "gap_recovered_pct": gap_recovered(fp, start, after)})
    mean, std = _mean_std([r["ppl_after"] for r in runs])
    gaps = [r["gap_recovered_pct"] for r in runs if r["gap_recovered_pct"] is not None]
    gap_mean, gap_std = _mean_std(gaps) if gaps else (None, None)
    first = runs[0]
    return {**{k: first[k] for k in ("method", "trainable_params", "steps", "tokens", "resumed_from")},
            "trains": _trains(cfg, method), "learning_rate": lr, "lr_sweep": sweep, "seeds": list(cfg.seeds),
            "ppl_before": start,
            "ppl_after": mean, "ppl_after_std": std, "gap_recovered_pct": gap_mean, "gap_recovered_std": gap_std,
            "seconds": statistics.fmean(r["seconds"] for r in runs),
            "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
            "peak_mb": max(r["peak_mb"] for r in runs), "codes_flipped": first["codes_flipped"],
            "codes_total": first["codes_total"], "curve": _mean_curve(runs), "runs": runs}


def compare_stage(state, cfg: CompareConfig) -> dict[str, Any]:
    """Stage `compare` (see the module docstring); returns the summary written to comparison.json."""
    base = state.model
    if not mixed_linears(base):
        raise UserError("compare needs the quantized model: put a quantize stage before it")
    if state.device.type == "cuda":
        base.to("cpu")  # the copies train on the GPU; the starting point waits in host memory
    ids = eval_ids(state, EvaluateConfig(dataset=cfg.eval_dataset))
    n_windows = min(ids.numel() // cfg.final_seq_len, cfg.final_windows or math.inf)
    if n_windows == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {cfg.final_seq_len}")
    metric = f"{source_label(cfg.eval_dataset)}_ppl"  # the evaluate stage's name for it
    fp, start = earlier_perplexities(state.results, state.last_stage, metric, cfg.final_seq_len, n_windows)
    sources = {name: "results" if value is not None else "measured" for name, value in (("fp", fp), ("start", start))}
    if start is None:
        start = perplexity(base.to(state.device), ids, cfg.final_seq_len, cfg.final_windows, device=state.device).value
        if state.device.type == "cuda":
            base.to("cpu")
    if fp is None:
        fp = _measure_fp(state, ids, cfg)
    heldout = heldout_blocks(state, cfg) if cfg.sweeping else None

    entries = []
    for method in cfg.methods:
        entry = run_entry(state, base, cfg, method, ids, heldout, start, fp)
        entries.append(entry)
        state.record("compare", metric, entry["ppl_after"], method=method, label=f"compare:{method}", before=start,
                     std=entry["ppl_after_std"], seeds=len(cfg.seeds), learning_rate=entry["learning_rate"],
                     gap_recovered_pct=entry["gap_recovered_pct"], tokens=entry["tokens"],
                     seconds=round(entry["seconds"], 1), cpu_seconds=round(entry["cpu_seconds"], 1),
                     trainable_params=entry["trainable_params"], codes_flipped=entry["codes_flipped"],
                     peak_mb=round(entry["peak_mb"]), seq_len=cfg.final_seq_len, windows=n_windows)

    summary = {
        "model": state.recipe.model.name,
        "eval": {"dataset": cfg.eval_dataset, "seq_len": cfg.final_seq_len, "windows": n_windows,
                 "curve_seq_len": cfg.eval_seq_len, "curve_windows": cfg.eval_windows},
        "training": cfg.model_dump(mode="json", exclude={"method", "order", "methods", "final_seq_len", "final_windows",
                                                         "resume"}),
        "fp_ppl": fp, "ptq_ppl": start, "sources": sources, "device": str(state.device),
        "methods": entries,
    }
    if is_main():
        write_outputs(state.output_dir, summary)
    return summary


# ---------------------------------------------------------------- outputs


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
        mean, std = _mean_std(ppl)
        full, full_std = _mean_std([r["curve"][-1]["ppl"] for r in m["runs"]])
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
    lr_note = (f"learning rate per method picked from {t['lr_sweep']} by held-out `{t['dataset']}` perplexity after "
               f"{t['sweep_fraction']:.0%} of the budget" if t["lr_sweep"] else "learning rates as configured")
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
