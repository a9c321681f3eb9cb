"""Stage `recover`: GIFT-SW fine-tuning of the salient columns and the baselines, through transformers' `Trainer`.

Methods, all starting from the quantized model (``MixedPrecisionLinear`` layers) with embeddings, norms and lm_head
frozen:
  gift_sw     only the salient columns train; fresh noise σ = noise_scale·Δ on the frozen part every forward
  salient_ft  the same columns, no noise
  ste         QAT: every weight of the quantized linears trains through the record's fixed grid (``STELinear``);
              afterwards the weights are re-quantized on that grid
  lora        peft LoRA on the quantized linears, rank matched to GIFT-SW's trainable parameter count; the adapters
              stay unmerged (a low-bit grid cannot absorb them without re-quantizing), so such a model evaluates but
              does not export
  none        nothing

``order: before`` is Pre-GIFT-SW: salient columns are chosen on the full-precision model (as the select stage would),
trained under noise of the next quantize stage's grid, written back into the plain linears, and handed to quantize
through ``state.fixed_salient``.

Checkpoints (``<output>/recover/<method>/checkpoint-N``) hold only the trainable tensors plus the optimizer, scheduler
and RNG states: the frozen quantized model is rebuilt by the earlier stages, so a rerun resumes where it stopped when
the run's fingerprint (recipe up to here and the training settings) still matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from .architectures import target_linears
from .config import EvaluateConfig, QuantizeConfig, RecoverConfig
from .data import check_not_eval_text, load_documents, packed_sequences, source_label
from .errors import UserError
from .evaluate import eval_ids
from .fingerprint import fingerprint
from .layers import MixedPrecisionLinear, NoiseSpec, STELinear
from .quantizer import QuantSpec, rtn
from .saliency import ChannelNorms
from .select import choose_salient
from .state import Recovery

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
# Settings that change what is logged, not what is trained: a checkpoint stays valid when they change.
NOT_TRAINING = {"eval_dataset", "eval_steps", "eval_windows", "eval_seq_len", "save_steps", "resume",
                "methods", "learning_rates", "final_seq_len", "final_windows"}


# ---------------------------------------------------------------- methods


def noise_spec(cfg: RecoverConfig) -> NoiseSpec:
    if cfg.method != "gift_sw":
        return NoiseSpec(kind="none")
    return NoiseSpec(kind=cfg.noise, scale=cfg.noise_scale, bits=cfg.noise_bits)


def mixed_linears(model: nn.Module) -> dict[str, MixedPrecisionLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace submodule ``name``; the new one keeps the old one's train/eval mode (noise is on only in training)."""
    parent, _, child = name.rpartition(".")
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _with_noise(m: MixedPrecisionLinear, noise: NoiseSpec) -> MixedPrecisionLinear:
    """The same layer with another noise spec (σ depends on it, so the layer is rebuilt from its record)."""
    new = MixedPrecisionLinear.from_quantized(m.to_quantized_weight(), m.bias, noise, m.weight_q.dtype)
    return new.to(m.weight_q.device)


def gift_params(model: nn.Module) -> int:
    """Trainable parameters of GIFT-SW on this model: out × k summed over the quantized linears."""
    return sum(m.salient_weight.numel() for m in mixed_linears(model).values())


def lora_rank(model: nn.Module) -> int:
    """The rank r whose LoRA (r·(in + out) per linear) has the parameter count closest to GIFT-SW's."""
    per_rank = sum(m.in_features + m.out_features for m in mixed_linears(model).values())
    return max(1, round(gift_params(model) / per_rank))


def _inject_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import set_seed

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(mixed_linears(model)))
    # peft's dense LoRA layer only needs its base layer's in/out_features and forward, which ours provides.
    config._register_custom_module({MixedPrecisionLinear: LoraLinear})
    set_seed(seed)  # LoRA's A matrices are random
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(config, model)


def prepare(model: nn.Module, cfg: RecoverConfig, master_fp32: bool = False) -> int:
    """Put the quantized ``model`` in ``cfg.method``'s trainable form, in place; returns the trainable count.

    ``master_fp32`` keeps the trainable tensors in float32 when the model is half precision (bf16 autocast trains
    them; AdamW on bf16 weights would lose small updates).
    """
    layers = mixed_linears(model)
    if not layers:
        raise UserError("recover needs the quantized model: put a quantize stage before it (or use order: before)")
    model.requires_grad_(False)
    method = cfg.method
    if method in ("gift_sw", "salient_ft", "lora"):
        noise = noise_spec(cfg)
        for name, m in layers.items():
            _swap(model, name, _with_noise(m, noise))
        if method == "lora":
            rank = cfg.lora_rank or lora_rank(model)
            _inject_lora(model, rank, cfg.lora_alpha or 2.0 * rank, cfg.seed)
        else:
            for m in mixed_linears(model).values():
                m.salient_weight.requires_grad_(True)
    elif method == "ste":
        for name, m in layers.items():
            ste = STELinear.from_quantized(m.to_quantized_weight(), m.bias, m.weight_q.dtype)
            _swap(model, name, ste.to(m.weight_q.device))
    elif method != "none":
        raise ValueError(f"unknown recover method {method!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if master_fp32:
        for p in trainable:
            p.data = p.data.float()
    return sum(p.numel() for p in trainable)


def finish(model: nn.Module, method: str, dtype: torch.dtype) -> None:
    """Back to evaluation form: STE weights re-quantized into ``MixedPrecisionLinear``, trainable tensors in the model's
    dtype, everything frozen, eval mode. LoRA adapters stay in place (unmerged)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, STELinear):
            new = MixedPrecisionLinear.from_quantized(m.to_quantized_weight(), m.bias, NoiseSpec(kind="none"), dtype)
            _swap(model, name, new.to(m.weight.device))
        elif isinstance(m, MixedPrecisionLinear):
            m.salient_weight.data = m.salient_weight.data.to(dtype)
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    model.requires_grad_(False)
    model.eval()


# ---------------------------------------------------------------- data


class TokenBlocks(Dataset):
    """Fixed-length token windows as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def training_blocks(state, cfg: RecoverConfig, count: int) -> torch.Tensor:
    """``count`` packed training sequences of ``cfg.seq_len`` (fewer when the text is short), cached in the state."""
    check_not_eval_text(cfg, "recovery training")
    key = ("train_blocks", cfg.dataset, cfg.split, cfg.text_field, cfg.seq_len, count)
    if key not in state.tokens:
        docs = load_documents(cfg, state.recipe.data.dir)
        blocks = packed_sequences(state.tokenizer, docs, cfg.seq_len, max_sequences=count)
        if blocks.shape[0] < count:
            log.warning("training text gives %d sequences of %d tokens for %d needed; the trainer repeats them",
                        blocks.shape[0], cfg.seq_len, count)
        state.tokens[key] = blocks
    return state.tokens[key]


def eval_blocks(state, cfg: RecoverConfig) -> torch.Tensor:
    """The first ``eval_windows`` windows of ``eval_seq_len`` tokens of the evaluation text (GPTQ protocol)."""
    ids = eval_ids(state, EvaluateConfig(dataset=cfg.eval_dataset)).view(-1)
    n = min(ids.numel() // cfg.eval_seq_len, cfg.eval_windows)
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {cfg.eval_seq_len}")
    return ids[: n * cfg.eval_seq_len].view(n, cfg.eval_seq_len)


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated, else the process RSS sampled in a thread.

    ``extra_mb`` is the peak above the level at entry (what the block itself needed). On CPU the allocator may keep
    memory freed by earlier work, so a later block's ``extra_mb`` can read low.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device, self.interval_s = torch.device(device), interval_s
        self.peak_mb = self.extra_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb, self.extra_mb = peak / 2**20, (peak - self._start) / 2**20


# ---------------------------------------------------------------- training


@dataclass
class TrainReport:
    method: str
    trainable_params: int
    steps: int = 0
    tokens: int = 0  # tokens seen, counted by the trainer (all processes, resumed part included)
    seconds: float = 0.0  # wall time of this call's training (a resumed run counts only its own part)
    loss_first: float | None = None
    loss_last: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "tokens", "ppl"} on the eval windows
    peak_mb: float = 0.0
    extra_mb: float = 0.0
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _trainer_class():
    from transformers import Trainer

    class CheckpointTrainer(Trainer):
        """Checkpoints hold the trainable tensors only: the frozen model is rebuilt by the stages before."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if not self.args.should_save:
                return
            from safetensors.torch import save_file

            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            tensors = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(tensors, str(out / TRAINABLE_FILE))

        def evaluate(self, *args, **kwargs):
            # An evaluation draws from the CPU generator (the data loader's base seed); isolating it keeps the noise
            # and data of a run independent of how often it is evaluated.
            with torch.random.fork_rng(devices=[]):
                return super().evaluate(*args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            from safetensors.torch import load_file

            model = model if model is not None else self.model
            saved = load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE))
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            if saved.keys() != params.keys():
                raise UserError(f"checkpoint {resume_from_checkpoint} holds other trainable tensors than this "
                                f"run; delete it or set resume: false")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    return CheckpointTrainer


def last_checkpoint(out_dir: Path) -> Path | None:
    """Newest complete checkpoint (trainer state written last), or None."""
    done = [p for p in out_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
            and (p / "trainer_state.json").is_file() and (p / TRAINABLE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def prepare_output(out_dir: Path, fingerprint: str, resume: bool) -> Path | None:
    """The checkpoint to resume from; stale checkpoints (other fingerprint, or resume off) are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / FINGERPRINT_FILE
    old = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else None
    if not resume or old != fingerprint:
        stale = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
        if stale:
            why = "resume is off" if not resume else "the recipe or training settings changed"
            log.warning("removing %d checkpoint(s) under %s: %s", len(stale), out_dir, why)
        for p in stale:
            shutil.rmtree(p)
        stamp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        return None
    return last_checkpoint(out_dir)


def training_arguments(cfg: RecoverConfig, out_dir: Path, device: torch.device, evaluate: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=1,  # the mean of per-window losses is then the pooled NLL (equal windows)
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of max_steps
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),  # autocast; the trainable tensors stay fp32
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,  # transformers also evaluates the last step
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=cfg.save_steps or max(1, math.ceil(cfg.max_steps / 4)),
        save_total_limit=1,
        logging_steps=max(1, min(10, cfg.max_steps // 10)),
        include_num_input_tokens_seen="all",
        remove_unused_columns=False,
        ddp_broadcast_buffers=False,  # the frozen quantized weights are buffers: identical on every rank
        report_to="none",
        disable_tqdm=False,
    )


def train(model: nn.Module, train_data: torch.Tensor, eval_data: torch.Tensor | None, cfg: RecoverConfig,
          out_dir: Path, device: torch.device, fingerprint: str, trainable_params: int,
          callbacks: Iterable[Any] = ()) -> TrainReport:
    """Train the prepared ``model`` in place with the Trainer; resumes from ``out_dir`` when allowed."""
    from transformers import default_data_collator

    if trainable_params == 0:
        raise UserError(f"recover ({cfg.method}) has nothing to train: the quantized linears keep no salient columns "
                        f"(give the select stage a count or fraction)")
    evaluate = eval_data is not None and cfg.eval_steps is not None
    args = training_arguments(cfg, out_dir, device, evaluate)
    with args.main_process_first(desc="checkpoint check"):  # rank 0 removes stale checkpoints before others look
        checkpoint = prepare_output(out_dir, fingerprint, cfg.resume)
    args.eval_on_start = evaluate and checkpoint is None  # a resumed run has its start in the saved log
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=TokenBlocks(train_data),
        eval_dataset=TokenBlocks(eval_data) if evaluate else None, data_collator=default_data_collator,
        callbacks=list(callbacks))
    if checkpoint is not None:
        log.info("resuming %s from %s", cfg.method, checkpoint)
    start = time.perf_counter()
    with PeakMemory(args.device) as mem:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    report = TrainReport(method=cfg.method, trainable_params=trainable_params, steps=trainer.state.global_step,
                         tokens=int(trainer.state.num_input_tokens_seen), seconds=time.perf_counter() - start,
                         peak_mb=mem.peak_mb, extra_mb=mem.extra_mb,
                         resumed_from=str(checkpoint) if checkpoint else None)
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.seq_len * args.world_size
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    report.loss_first, report.loss_last = (losses[0], losses[-1]) if losses else (None, None)
    points = {e["step"]: e for e in trainer.state.log_history if "eval_loss" in e}
    report.curve = [{"step": s, "tokens": int(e.get("num_input_tokens_seen", s * tokens_per_step)),
                     "ppl": math.exp(e["eval_loss"])} for s, e in sorted(points.items())]
    return report


def training_fingerprint(state, cfg: RecoverConfig, train_data: torch.Tensor) -> str:
    """What the trained weights depend on: the model and stages before (``fingerprint``), the quantized base they
    train on, the training text actually used and the training settings of ``cfg``."""
    base = state.quantization.fingerprint if state.quantization is not None else None
    return fingerprint(state, {"base": base, "train": cfg.model_dump(mode="json", exclude=NOT_TRAINING)},
                       [train_data])


def run_method(state, model: nn.Module, cfg: RecoverConfig, out_dir: Path,
               callbacks: Iterable[Any] = ()) -> TrainReport:
    """Prepare, train and finish one method on the quantized ``model`` (in place)."""
    if cfg.method == "none":
        return TrainReport(method="none", trainable_params=0)
    device = state.device
    dtype = next(iter(mixed_linears(model).values())).weight_q.dtype if mixed_linears(model) else torch.float32
    trainable = prepare(model, cfg, master_fp32=device.type == "cuda" and dtype != torch.float32)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    count = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * world
    train_data = training_blocks(state, cfg, count)
    eval_data = eval_blocks(state, cfg) if cfg.eval_steps else None
    stamp = training_fingerprint(state, cfg, train_data)
    report = train(model, train_data, eval_data, cfg, out_dir, device, stamp, trainable, callbacks)
    finish(model, cfg.method, dtype)
    return report


def record_report(state, stage: str, report: TrainReport, cfg: RecoverConfig) -> None:
    """Results rows of one training run: trainable parameters, training loss, and the perplexity curve."""
    common = {"method": report.method, "tokens": report.tokens, "seconds": round(report.seconds, 1)}
    state.record(stage, "trainable_params", report.trainable_params, **common)
    if report.loss_last is not None:
        state.record(stage, "train_loss", report.loss_last, first=report.loss_first, steps=report.steps,
                     peak_mb=round(report.peak_mb), extra_mb=round(report.extra_mb), resumed_from=report.resumed_from,
                     note=f"{report.method}: {report.steps} steps of {cfg.batch_size}×"
                          f"{cfg.gradient_accumulation_steps}×{cfg.seq_len} tokens on {cfg.dataset}, "
                          f"lr {cfg.learning_rate:g} cosine", **common)
    metric = f"{source_label(cfg.eval_dataset)}_ppl_training"
    for p in report.curve:
        state.record(stage, metric, p["ppl"], method=report.method, step=p["step"], tokens=p["tokens"],
                     seq_len=cfg.eval_seq_len, windows=cfg.eval_windows)


# ---------------------------------------------------------------- Pre-GIFT-SW (order: before)


def _following_quantize(state) -> QuantizeConfig:
    after = [s.config for s in state.stages_after if s.name == "quantize"]
    if not after:
        raise UserError("recover with order: before needs a quantize stage after it")
    return after[0]


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


def _noisy_fp_linear(lin: nn.Linear, salient: torch.Tensor, grid: QuantSpec, noise: NoiseSpec) -> MixedPrecisionLinear:
    """A full-precision linear as GIFT-SW trains it: frozen fp non-salient part with noise of the target grid's Δ,
    trainable salient columns. (The layer's record is the RTN grid only for Δ; its codes are never used.)"""
    w = lin.weight.detach()
    qw = rtn(w, grid, salient)
    m = MixedPrecisionLinear.from_quantized(qw, lin.bias, noise, w.dtype).to(w.device)
    with torch.no_grad():
        m.weight_q.copy_(w).index_fill_(1, m.salient_idx, 0.0)
        m.salient_weight.copy_(w[:, m.salient_idx])
    return m


def _to_linear(m: MixedPrecisionLinear) -> nn.Linear:
    weight = m.weight_q.clone()
    weight[:, m.salient_idx] = m.salient_weight.detach().to(weight.dtype)
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def pre_gift_sw(state, cfg: RecoverConfig) -> TrainReport:
    """``order: before``: GIFT-SW on the full-precision model at the next quantize stage's bit-width."""
    qcfg = _following_quantize(state)
    select = state.selection
    if select is None or state.calibration is None:
        raise UserError("recover with order: before needs calibrate and select stages before it")
    windows = state.calibration.windows
    model, device = state.model, state.device
    model.to(device)
    linears = target_linears(model, qcfg.targets)
    norms = input_norms(model, linears, windows, device)
    salient = {name: choose_salient(name, lin.weight, qcfg.bits, select, x_linf=norms[name].linf,
                                    x_l2=norms[name].l2) for name, lin in linears.items()}
    grid = QuantSpec(bits=cfg.noise_bits or qcfg.bits, group_size=qcfg.group_size, sym=qcfg.sym, mse=qcfg.mse,
                     grid=qcfg.grid, max_shrink=qcfg.max_shrink, norm=qcfg.norm)
    noise = NoiseSpec(kind=cfg.noise, scale=cfg.noise_scale) if cfg.method == "gift_sw" else NoiseSpec(kind="none")
    for name, lin in linears.items():
        _swap(model, name, _noisy_fp_linear(lin, salient[name], grid, noise))
    # The layers are already in GIFT-SW form; prepare() would rebuild them from their (RTN) records.
    model.requires_grad_(False)
    layers = mixed_linears(model)
    for m in layers.values():
        m.salient_weight.requires_grad_(True)
        if device.type == "cuda":  # float32 master copy under bf16 autocast; _to_linear casts back
            m.salient_weight.data = m.salient_weight.data.float()
    trainable = sum(m.salient_weight.numel() for m in layers.values())
    count = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1"))
    train_data = training_blocks(state, cfg, count)
    report = train(model, train_data, eval_blocks(state, cfg) if cfg.eval_steps else None,
                   cfg, state.output_dir / "recover" / f"pre_{cfg.method}", device,
                   training_fingerprint(state, cfg, train_data), trainable)
    for name, m in layers.items():
        _swap(model, name, _to_linear(m))
    model.requires_grad_(False)
    model.eval()
    state.fixed_salient = {n: idx.clone() for n, idx in salient.items()}
    return report


# ---------------------------------------------------------------- stage


def recover_stage(state, cfg: RecoverConfig) -> None:
    """Stage `recover`: train the current model in place with ``cfg.method`` (see the module docstring)."""
    if cfg.method == "none":
        state.record("recover", "trainable_params", 0, method="none", note="recover: method none, model unchanged")
        return
    if cfg.order == "before":
        report = pre_gift_sw(state, cfg)
    else:
        report = run_method(state, state.model, cfg, state.output_dir / "recover" / cfg.method)
    record_report(state, "recover", report, cfg)
    exportable = cfg.method != "lora"
    # JSON-safe summary (export stores it with the checkpoint); the full report, curve included, beside it.
    summary = {**cfg.model_dump(mode="json", include={"method", "order", "dataset", "learning_rate", "max_steps",
                                                      "seq_len", "noise", "noise_scale", "noise_bits", "seed"}),
               "tokens": report.tokens}
    state.recovery = Recovery(summary, exportable, report)
    if not exportable:
        state.record("recover", "exportable", 0, method="lora",
                     note="LoRA adapters stay unmerged over the low-bit layers: the model evaluates, but exporting "
                          "it would need re-quantizing W_q + BA")
