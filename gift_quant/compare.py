"""Stage `compare`: every recovery method from the same quantized model at equal budget, side by side.

Each method trains a deep copy of the current (quantized) model with the same text, tokens, loss, batch and sequence
length, once per seed; with ``lr_sweep`` each method first picks its learning rate by the perplexity on held-out
training-text documents (never WikiText) after a shortened run. The stage writes ``comparison.json``,
``comparison.md`` (mean ± std over seeds, codes flipped, trainable parameters, CPU seconds, and every method at the
same training CPU time) and ``recovery.png`` (perplexity against tokens seen and against CPU minutes, error bars),
all three by the torch-free ``comparison_report``, and leaves ``state.model`` as it found it. The full-precision and post-quantization perplexities come from earlier
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
from .comparison_report import gap_recovered, mean_curve, mean_std, write_outputs
from .data import encode, load_documents, packed_sequences, source_label
from .distributed import is_main
from .errors import UserError
from .evaluate import eval_ids, perplexity
from .methods import METHODS, RecoveryMethod
from .recover import run_method, training_blocks
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


def heldout_blocks(state, cfg: CompareConfig) -> torch.Tensor:
    """``heldout_windows`` windows of ``seq_len`` from the last documents of the training text, refused when they
    would overlap the documents training reads (the learning-rate sweep must not score on training data)."""
    docs = load_documents(cfg, state.recipe.data.dir)
    needed = cfg.heldout_windows * cfg.seq_len
    start, have = len(docs), 0
    while start > 0 and have <= needed:
        start -= 1
        have += len(encode(state.tokenizer, docs[start]).input_ids) + 1
    used = training_blocks(state, cfg).numel()  # every entry of a comparison reads the same text
    consumed, read = 0, 0
    while read < used and consumed < len(docs):
        read += len(encode(state.tokenizer, docs[consumed]).input_ids) + 1
        consumed += 1
    if have <= needed or consumed > start:
        raise UserError(f"the training text cannot hold out {cfg.heldout_windows} windows of {cfg.seq_len} tokens "
                        f"beside the {used} tokens training reads; lower heldout_windows or the budget")
    return packed_sequences(state.tokenizer, docs[start:], cfg.seq_len, max_sequences=cfg.heldout_windows)


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
    mean, std = mean_std([r["ppl_after"] for r in runs])
    gaps = [r["gap_recovered_pct"] for r in runs if r["gap_recovered_pct"] is not None]
    gap_mean, gap_std = mean_std(gaps) if gaps else (None, None)
    first = runs[0]
    return {**{k: first[k] for k in ("method", "trainable_params", "steps", "tokens", "resumed_from")},
            "trains": _trains(cfg, method), "learning_rate": lr, "lr_sweep": sweep, "seeds": list(cfg.seeds),
            "ppl_before": start,
            "ppl_after": mean, "ppl_after_std": std, "gap_recovered_pct": gap_mean, "gap_recovered_std": gap_std,
            "seconds": statistics.fmean(r["seconds"] for r in runs),
            "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
            "peak_mb": max(r["peak_mb"] for r in runs), "codes_flipped": first["codes_flipped"],
            "codes_total": first["codes_total"], "curve": mean_curve(runs), "runs": runs}


def compare_stage(state, cfg: CompareConfig) -> dict[str, Any]:
    """Stage `compare` (see the module docstring); returns the summary written to comparison.json."""
    base = state.model  # quantized: a quantize stage ran before it (stages.py)
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
