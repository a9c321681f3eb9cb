"""Stage `recover`: train the quantized model with one recovery method (``methods.METHODS``) through the Trainer
(``training.py``), learning from next-token labels, from the full-precision teacher (``teacher.py``), or both.

``order: before`` is Pre-GIFT-SW: salient columns are chosen on the full-precision model (as the select stage would),
trained under noise of the next quantize stage's grid (``noise.noise_step``, the same grid definition as after
quantization), written back into the plain linears, and handed to quantize through ``state.fixed_salient``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .architectures import target_linears
from .config import KEEPS_FROZEN_PART, EvaluateConfig, QuantizeConfig, RecoverConfig
from .data import check_not_eval_text, load_documents, packed_sequences, source_label
from .errors import UserError
from .evaluate import eval_ids
from .fingerprint import fingerprint
from .layers import MixedPrecisionLinear, mixed_linears, pack_frozen, swap_module
from .methods import METHODS, make_trainable, setup_of
from .models import check_finite
from .noise import NO_NOISE
from .quantizer import QuantSpec, rtn
from .saliency import ChannelNorms
from .select import choose_salient
from .state import Recovery
from .teacher import fp_weights, live_teacher, placement, teacher_model, teacher_topk
from .distributed import world_size
from .budget import sequences_per_step, step_budget
from .training import TokenBlocks, TrainReport, train

log = logging.getLogger(__name__)

# Settings that change what is logged or evaluated, or where the frozen part lives, not what is trained: a checkpoint
# stays valid when they change.
NOT_TRAINING = {"frozen", "eval_dataset", "eval_steps", "eval_minutes", "eval_windows", "eval_seq_len", "save_steps",
                "resume", "methods", "learning_rates", "seeds", "lr_sweep", "sweep_fraction", "heldout_windows",
                "final_seq_len", "final_windows", "teacher", "teacher_windows"}


# ---------------------------------------------------------------- data


def training_blocks(state, cfg: RecoverConfig) -> torch.Tensor:
    """The packed training sequences of ``cfg.seq_len`` the budget needs (all of the text for a time-only budget;
    fewer when the text is short, and the trainer then repeats them), cached in the state."""
    check_not_eval_text(cfg, "recovery training")
    steps = step_budget(cfg, world_size())
    count = None if steps is None else steps * sequences_per_step(cfg, world_size())
    key = ("train_blocks", cfg.dataset, cfg.split, cfg.text_field, cfg.seq_len, count)
    if key not in state.tokens:
        docs = load_documents(cfg, state.recipe.data.dir)
        blocks = packed_sequences(state.tokenizer, docs, cfg.seq_len, max_sequences=count)
        if count is not None and blocks.shape[0] < count:
            log.warning("training text gives %d sequences of %d tokens for %d needed; the trainer repeats them",
                        blocks.shape[0], cfg.seq_len, count)
        state.tokens[key] = blocks
    return state.tokens[key]


def training_data(state, cfg: RecoverConfig, student: nn.Module | None = None) -> TokenBlocks:
    """The training blocks, with the teacher's cached top-k log-probabilities when the loss distils (the time it
    takes to compute them, when they are not cached yet, is a results row of its own)."""
    blocks = training_blocks(state, cfg)
    if not cfg.distils:
        return TokenBlocks(blocks)
    if cfg.kd_top_k is None:  # the full vocabulary: the teacher runs beside the student, nothing is cached
        teacher = teacher_model(state)
        where = placement(cfg.teacher, teacher, student, state.device, live=True)
        log.info("full-vocabulary teacher: %s on %s", where, state.device)
        return TokenBlocks(blocks, live_teacher=live_teacher(teacher, state.device, where))
    start, cpu_start = time.perf_counter(), time.process_time()
    teacher, where = teacher_topk(state, blocks, cfg.kd_top_k, cfg.kd_temperature, cfg.teacher, cfg.teacher_windows,
                                  student)
    if where is not None:
        state.record(state.stage.name if state.stage else "recover", "teacher_tokens", int(blocks.numel()),
                     tokens=int(blocks.numel()), seconds=round(time.perf_counter() - start, 1),
                     cpu_seconds=round(time.process_time() - cpu_start, 1), teacher=where,
                     note=f"teacher top-{cfg.kd_top_k} log-probabilities computed once ({where}) and cached")
    return TokenBlocks(blocks, teacher)


def eval_blocks(state, cfg: RecoverConfig) -> torch.Tensor:
    """The first ``eval_windows`` windows of ``eval_seq_len`` tokens of the evaluation text (GPTQ protocol)."""
    ids = eval_ids(state, EvaluateConfig(dataset=cfg.eval_dataset)).view(-1)
    n = min(ids.numel() // cfg.eval_seq_len, cfg.eval_windows)
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {cfg.eval_seq_len}")
    return ids[: n * cfg.eval_seq_len].view(n, cfg.eval_seq_len)


def training_fingerprint(state, cfg: RecoverConfig, train_data: torch.Tensor) -> str:
    """What the trained weights depend on: the model and stages before (``fingerprint``), the quantized base they
    train on, the training text actually used and the training settings of ``cfg``."""
    base = state.quantization.fingerprint if state.quantization is not None else None
    return fingerprint(state, {"base": base, "train": cfg.model_dump(mode="json", exclude=NOT_TRAINING)},
                       [train_data])


# ---------------------------------------------------------------- one method


def run_method(state, model: nn.Module, cfg: RecoverConfig, out_dir: Path,
               callbacks: Iterable[Any] = ()) -> TrainReport:
    """Prepare, train and finish ``cfg.method`` on the quantized ``model`` (in place)."""
    method = METHODS[cfg.method]
    if method.trains_nothing:
        return TrainReport(method=cfg.method, trainable_params=0)
    layers = mixed_linears(model)
    dtype = next(iter(layers.values())).dtype if layers else torch.float32
    device = state.device
    if cfg.frozen == "packed" and cfg.method in KEEPS_FROZEN_PART:
        pack_frozen(model)  # before prepare: the optimizer must see the packed layers' parameters
    trainable = make_trainable(model, model, cfg, device, dtype, fp_weights(state) if method.needs_fp_weights else None)
    data = training_data(state, cfg, model)
    evaluating = cfg.eval_steps is not None or bool(cfg.eval_minutes)
    report = train(model, data, eval_blocks(state, cfg) if evaluating else None, cfg, out_dir, device,
                   training_fingerprint(state, cfg, data.blocks), trainable, callbacks)
    for key, value in method.finish(model, dtype).items():
        setattr(report, key, value)
    check_finite(model, f"after {cfg.method} training, the model's")
    return report


def record_report(state, stage: str, report: TrainReport, cfg: RecoverConfig) -> None:
    """Results rows of one training run: trainable parameters, training loss, codes flipped, and the curve."""
    common = {"method": report.method, "tokens": report.tokens, "seconds": round(report.seconds, 1),
              "cpu_seconds": round(report.cpu_seconds, 1), "budget_minutes": round(report.budget_minutes, 2)}
    state.record(stage, "trainable_params", report.trainable_params, **common)
    if report.loss_last is not None:
        state.record(stage, "train_loss", report.loss_last, first=report.loss_first, steps=report.steps,
                     peak_mb=round(report.peak_mb), extra_mb=round(report.extra_mb), resumed_from=report.resumed_from,
                     note=f"{report.method}: {report.steps} steps of {cfg.batch_size}×"
                          f"{cfg.gradient_accumulation_steps}×{cfg.seq_len} tokens on {cfg.dataset}, "
                          f"{cfg.loss} loss, lr {cfg.learning_rate:g} cosine", **common)
    if report.codes_flipped is not None:
        state.record(stage, "codes_flipped", report.codes_flipped, total=report.codes_total, **common)
    metric = f"{source_label(cfg.eval_dataset)}_ppl_training"
    for p in report.curve:
        state.record(stage, metric, p["ppl"], method=report.method, step=p["step"], tokens=p["tokens"],
                     minutes=p["minutes"], seq_len=cfg.eval_seq_len, windows=cfg.eval_windows)


# ---------------------------------------------------------------- Pre-GIFT-SW (order: before)


def _following_quantize(state) -> QuantizeConfig:
    return next(s.config for s in state.stages_after if s.name == "quantize")  # one follows (stages.py)


@torch.no_grad()
def input_norms(model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor,
                device: torch.device) -> dict[str, ChannelNorms]:
    """Per-input-channel norms of every linear's input over the calibration windows (one forward pass each)."""
    norms = {n: ChannelNorms(lin.in_features) for n, lin in linears.items()}
    hooks = [lin.register_forward_pre_hook(lambda _m, args, s=norms[n]: s.add_batch(args[0]))
             for n, lin in linears.items()]
    body = getattr(model, "model", model)  # the decoder without lm_head: its logits are not needed
    was_training = model.training
    model.eval()
    try:
        for window in windows:
            body(input_ids=window[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return norms


def _fp_layer(lin: nn.Linear, salient: torch.Tensor, grid: QuantSpec) -> MixedPrecisionLinear:
    """A full-precision linear as GIFT-SW trains it: frozen fp non-salient part, trainable salient columns; its record
    (an RTN grid at the target bits) only fixes the shapes and the salient columns."""
    w = lin.weight.detach()
    return MixedPrecisionLinear(rtn(w, grid, salient), lin.bias, NO_NOISE, w.dtype, frozen=w).to(w.device)


def pre_gift_sw(state, cfg: RecoverConfig) -> TrainReport:
    """``order: before``: GIFT-SW on the full-precision model at the next quantize stage's bit-width."""
    qcfg = _following_quantize(state)
    select = state.selection  # calibrate and select ran before it (stages.py)
    model, device = state.model, state.device
    model.to(device)
    linears = target_linears(model, qcfg.targets)
    norms = input_norms(model, linears, state.calibration.windows, device)
    salient = {name: choose_salient(name, lin.weight, qcfg.bits, select, x_linf=norms[name].linf,
                                    x_l2=norms[name].l2) for name, lin in linears.items()}
    grid = QuantSpec(bits=qcfg.bits, group_size=qcfg.group_size)
    for name, lin in linears.items():
        swap_module(model, name, _fp_layer(lin, salient[name], grid))
    dtype = next(model.parameters()).dtype
    method = METHODS[cfg.method]
    trainable = method.prepare(model, setup_of(cfg, device, dtype, noise_bits=qcfg.bits))
    data = training_data(state, cfg, model)
    report = train(model, data, eval_blocks(state, cfg) if cfg.eval_steps else None, cfg,
                   state.output_dir / "recover" / f"pre_{cfg.method}", device,
                   training_fingerprint(state, cfg, data.blocks), trainable)
    method.finish(model, dtype)
    for name, m in mixed_linears(model).items():
        swap_module(model, name, m.to_linear())
    state.fixed_salient = {n: idx.clone() for n, idx in salient.items()}
    return report


# ---------------------------------------------------------------- stage


SUMMARY_KEYS = {"method", "order", "loss", "kd_temperature", "kd_top_k", "train_scales", "train_norms", "dataset",
                "learning_rate", "scales_learning_rate", "max_steps", "max_tokens", "max_minutes", "seq_len", "noise",
                "noise_scale", "noise_bits", "seed"}


def recover_stage(state, cfg: RecoverConfig) -> None:
    """Stage `recover`: train the current model in place with ``cfg.method`` (see the module docstring)."""
    method = METHODS[cfg.method]
    if method.trains_nothing:
        state.record("recover", "trainable_params", 0, method=cfg.method, note="recover: method none, model unchanged")
        return
    if cfg.order == "before":
        report = pre_gift_sw(state, cfg)
    else:
        report = run_method(state, state.model, cfg, state.output_dir / "recover" / cfg.method)
    record_report(state, "recover", report, cfg)
    summary = {**cfg.model_dump(mode="json", include=SUMMARY_KEYS), "tokens": report.tokens}
    state.recovery = Recovery(summary, method.exportable, report)
    if not method.exportable:
        state.record("recover", "exportable", 0, method=cfg.method,
                     note=f"{cfg.method}: the result keeps modules the low-bit format cannot hold; it evaluates but "
                          f"does not export")
