"""Stage `compare`: every recovery method from the same quantized model at equal budget, side by side.

Each method trains a deep copy of the current (quantized) model with the same text, steps, batch and sequence length;
the stage writes ``comparison.json``, ``comparison.md`` and ``recovery.png`` (perplexity against tokens seen) to the
output folder and leaves ``state.model`` as it found it. The full-precision and post-quantization perplexities come
from earlier `evaluate` rows measured with the same text, window length and window count, when there are such rows;
otherwise they are measured here (the fp model is reloaded for that).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .config import CompareConfig, EvaluateConfig, RecoverConfig
from .data import source_label
from .errors import UserError
from .evaluate import eval_ids, perplexity
from .io_utils import write_json, write_text
from .recover import TrainReport, mixed_linears, run_method

log = logging.getLogger(__name__)

# Stages after which the model still computes the full-precision function (rotation is exact in fp).
FP_STAGES = {"model", "calibrate", "select", "rotate"}


def method_config(cfg: CompareConfig, method: str) -> RecoverConfig:
    """The recover settings of one method: the shared ones, its learning rate, and evaluation at least 4 times."""
    shared = cfg.model_dump(include=set(RecoverConfig.model_fields) - {"method", "order"})
    shared.update(method=method, learning_rate=cfg.learning_rates.get(method, cfg.learning_rate),
                  eval_steps=cfg.eval_steps or max(1, cfg.max_steps // 4))
    return RecoverConfig.model_validate(shared)


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

    entries = []
    for method in cfg.methods:
        mcfg = method_config(cfg, method)
        if method == "none":
            report, after = TrainReport(method="none", trainable_params=0), start
        else:
            model = copy.deepcopy(base)
            report = run_method(state, model, mcfg, state.output_dir / "compare" / method)
            after = perplexity(model, ids, cfg.final_seq_len, cfg.final_windows, device=state.device).value
            del model
            gc.collect()
            if state.device.type == "cuda":
                torch.cuda.empty_cache()
        entry = {"method": method, "learning_rate": mcfg.learning_rate, "ppl_before": start, "ppl_after": after,
                 "gap_recovered_pct": gap_recovered(fp, start, after), **report.to_dict()}
        entries.append(entry)
        state.record("compare", metric, after, method=method, label=f"compare:{method}", before=start,
                     gap_recovered_pct=entry["gap_recovered_pct"], tokens=report.tokens,
                     seconds=round(report.seconds, 1), trainable_params=report.trainable_params,
                     peak_mb=round(report.peak_mb), seq_len=cfg.final_seq_len, windows=n_windows)

    summary = {
        "model": state.recipe.model.name,
        "eval": {"dataset": cfg.eval_dataset, "seq_len": cfg.final_seq_len, "windows": n_windows,
                 "curve_seq_len": cfg.eval_seq_len, "curve_windows": cfg.eval_windows},
        "training": cfg.model_dump(mode="json", exclude={"method", "order", "methods", "final_seq_len", "final_windows",
                                                         "resume"}),
        "fp_ppl": fp, "ptq_ppl": start, "sources": sources, "device": str(state.device),
        "methods": entries,
    }
    write_outputs(state.output_dir, summary)
    return summary


# ---------------------------------------------------------------- outputs


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    write_json(out_dir / "comparison.json", summary)
    write_text(out_dir / "comparison.md", render_markdown(summary))
    plot_recovery(summary, out_dir / "recovery.png")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(summary: dict[str, Any]) -> str:
    t, e = summary["training"], summary["eval"]
    tokens = t["max_steps"] * t["batch_size"] * t["gradient_accumulation_steps"] * t["seq_len"]
    grid = "each layer's own grid" if t["noise_bits"] is None else f"a {t['noise_bits']}-bit grid"
    lines = [
        f"# Recovery after quantization: {summary['model']}",
        "",
        f"Every method starts from the same quantized model and trains on `{t['dataset']}` for {t['max_steps']} steps "
        f"of {t['batch_size']}×{t['gradient_accumulation_steps']} sequences of {t['seq_len']} tokens "
        f"({tokens:,} tokens per process), AdamW, cosine schedule, {t['warmup_ratio']:.0%} warmup, seed {t['seed']}, "
        f"on {summary['device']}. GIFT-SW noise: {t['noise']}, σ = {t['noise_scale']}·Δ of {grid}.",
        "",
        f"Perplexity: `{e['dataset']}`, {e['windows']} windows of {e['seq_len']} tokens. "
        f"Full precision {_fmt(summary['fp_ppl'])} ({summary['sources']['fp']}), "
        f"after quantization {_fmt(summary['ptq_ppl'])} ({summary['sources']['start']}).",
        "",
        "| method | lr | trainable params | tokens | ppl before | ppl after | gap recovered | seconds "
        "| peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in summary["methods"]:
        gap, trained = m["gap_recovered_pct"], m["method"] != "none"
        lr = format(m["learning_rate"], "g") if trained else "–"
        peak = format(m["peak_mb"], ".0f") if trained else "–"
        lines.append(
            f"| {m['method']} | {lr} | {m['trainable_params']:,} | {m['tokens']:,} | {m['ppl_before']:.2f} | "
            f"{m['ppl_after']:.2f} | {'–' if gap is None else f'{gap:.1f} %'} | {m['seconds']:.0f} | {peak} |")
    lines += [
        "",
        "- Gap recovered = (PTQ − method) / (PTQ − fp). Embeddings, norms and lm_head stay frozen for every method.",
        "- `gift_sw` and `salient_ft` train only the fp salient columns (out × k per linear); `ste` trains every "
        "weight of the quantized linears through the fixed quantization grid (straight-through estimator) and is "
        "re-quantized on that grid afterwards; `lora` trains adapters on the quantized linears with a rank matched "
        "to GIFT-SW's parameter count, and they stay unmerged (exporting such a model would need re-quantization).",
        "- Peak memory: CUDA max allocated, or on CPU the process's peak RSS (which includes the starting model and "
        "its copy).",
        f"- The curve in `recovery.png` is perplexity on {e['curve_windows']} windows of {e['curve_seq_len']} tokens "
        "during training.",
    ]
    resumed = [m["method"] for m in summary["methods"] if m.get("resumed_from")]
    if resumed:
        lines.append(f"- Resumed from a checkpoint (seconds and memory cover only the resumed part): "
                     f"{', '.join(resumed)}.")
    return "\n".join(lines) + "\n"


def plot_recovery(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = zip("osD^v<>", ["-", "--", "-.", ":"] * 2)  # curves can coincide (e.g. ste and salient_ft early on)
    for m, (marker, line) in zip(summary["methods"], styles):
        if m["curve"]:
            ax.plot([p["tokens"] for p in m["curve"]], [p["ppl"] for p in m["curve"]], marker=marker, linestyle=line,
                    alpha=0.85, label=m["method"])
    e = summary["eval"]
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel(f"{e['dataset']} perplexity ({e['curve_windows']}×{e['curve_seq_len']} tokens)")
    ax.set_title(f"Recovery after quantization: {summary['model']}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
