"""Training a prepared model with transformers' ``Trainer``: the data, the loss (next-token, distillation or both),
budgets in steps, tokens and minutes, checkpoints that hold only the trainable tensors, and the report.

A checkpoint (``<out>/checkpoint-N``) holds the trainable tensors, the optimizer, scheduler and RNG states, the time
already spent and a checksum of every file; the frozen model is rebuilt by the stages before, so a rerun resumes
where it stopped when the run's fingerprint still matches, and a damaged checkpoint is set aside with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from .budget import BudgetClock, RunTime, budget_spent, cosine_by_progress, sequences_per_step, step_budget
from .config import RecoverConfig
from .distributed import rank, world_size
from .errors import UserError
from .evaluate import ppl_of
from .io_utils import file_sha256
from .memory import PeakMemory

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
BUDGET_FILE = "budget.json"  # training seconds spent up to the checkpoint, on the budget's clock
CHECKSUMS_FILE = "checksums.json"
UNBOUNDED_STEPS = 10**9  # the trainer's step limit when only a time budget ends the run
SCALE_SUFFIXES = (".scales", ".zeros")


class TokenBlocks(Dataset):
    """Fixed-length token windows as causal-LM examples (labels = inputs; the model shifts them), with the teacher's
    top-k log-probabilities for each when the loss distils from a cache, or the teacher's forward (``live_teacher``:
    input ids → logits) when it distils from the full vocabulary at every step."""

    def __init__(self, blocks: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                 live_teacher: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.blocks, self.teacher, self.live_teacher = blocks, teacher, live_teacher

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.blocks[i], "labels": self.blocks[i]}
        if self.teacher is not None:
            item["teacher_logp"], item["teacher_ids"] = self.teacher[0][i], self.teacher[1][i]
        return item


@dataclass
class TrainReport:
    method: str
    trainable_params: int
    steps: int = 0
    tokens: int = 0  # tokens seen, counted by the trainer (all processes, resumed part included)
    seconds: float = 0.0  # wall time of the training, evaluations included (a resumed run adds the saved part)
    cpu_seconds: float = 0.0  # process CPU time of the same
    budget_minutes: float = 0.0  # training time on the budget's clock, resumed part included (evaluations excluded)
    loss_first: float | None = None
    loss_last: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "tokens", "minutes", "cpu_minutes", "ppl"}
    peak_mb: float = 0.0
    extra_mb: float = 0.0
    resumed_from: str | None = None
    codes_flipped: int | None = None  # STE methods: codes that changed, of codes_total
    codes_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _budget_callback(clock: BudgetClock, cfg: RecoverConfig, evaluate: bool):
    from transformers import TrainerCallback

    marks = sorted(cfg.eval_minutes)

    class Budget(TrainerCallback):
        """Times the steps, stops at max_minutes, evaluates when the clock passes an eval_minutes mark."""

        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()
            passed = [m for m in marks if m <= clock.minutes]
            if evaluate and passed:
                control.should_evaluate = True
                del marks[: len(passed)]
            if cfg.max_minutes is not None and clock.minutes >= cfg.max_minutes:
                control.should_training_stop = True  # the stage measures the result; no evaluation forced here
                control.should_save = True
            return control

    return Budget()


def param_groups(model: nn.Module, lr: float, rates: dict[str | tuple[str, ...], float], decay: set[str] = frozenset(),
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimizer's groups of ``model``'s trainable tensors: a name ending in a suffix of ``rates`` trains at that
    rate (the grid's step sizes, block_ap's latent codes), without weight decay; the rest at ``lr``, with
    ``weight_decay`` on the names in ``decay``. Empty groups are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rest = [(n, p) for n, p in named if not any(n.endswith(sfx) for sfx in rates)]
    groups = [{"params": [p for n, p in rest if n in decay], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for n, p in rest if n not in decay], "lr": lr, "weight_decay": 0.0}]
    groups += [{"params": [p for n, p in named if n.endswith(sfx)], "lr": rate, "weight_decay": 0.0}
               for sfx, rate in rates.items()]
    return [g for g in groups if g["params"]]


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of micro-batch ``index`` (in the global batch: accumulation step × processes + rank) of
    optimizer step ``step``; accelerate deals batch i·N + r of the shuffled data to rank r, so data and seed agree."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------- the trainer


def _trainer_class():
    from transformers import Trainer

    from .teacher import kd_loss, kd_loss_full

    class RecoveryTrainer(Trainer):
        """Checkpoints hold the trainable tensors only (the frozen model is rebuilt by the stages before); the loss
        may distil from cached teacher log-probabilities; scales may have their own learning rate; a time budget
        drives the learning-rate schedule."""

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by GA steps

        def __init__(self, *args, recover: RecoverConfig, clock: BudgetClock, run_time: RunTime, steps: int | None,
                     live_teacher: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.recover, self.clock, self.run_time, self.step_limit = recover, clock, run_time, steps
            self.live_teacher = live_teacher
            self._micro = (-1, 0)  # (optimizer step, micro-batches of it done on this rank)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Random draws (GIFT-SW's noise) of a micro-batch come from its place in the global batch, the place its
            # data comes from too: N processes × k accumulation steps then train exactly as 1 × N·k.
            step, done = self._micro if self._micro[0] == self.state.global_step else (self.state.global_step, 0)
            self._micro = (step, done + 1)
            torch.manual_seed(micro_batch_seed(self.args.seed, step, done * world_size() + rank()))
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp, ids = inputs.pop("teacher_logp", None), inputs.pop("teacher_ids", None)
            live = self.live_teacher is not None and model.training
            # evaluation text has no teacher: next-token
            kind = self.recover.loss if logp is not None or live else "lm"
            outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"] if "lm" in kind else None,
                            use_cache=False)
            if kind == "lm":
                loss = outputs.loss
            elif live:
                with torch.no_grad():
                    teacher = self.live_teacher(inputs["input_ids"])
                loss = kd_loss_full(outputs.logits, teacher, self.recover.kd_temperature)
            else:
                loss = kd_loss(outputs.logits, logp, ids, self.recover.kd_temperature)
            if kind == "lm+kd":
                loss = loss + outputs.loss
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model or self.model
                groups = param_groups(model, self.args.learning_rate,
                                      {SCALE_SUFFIXES: self.recover.scales_learning_rate or self.args.learning_rate},
                                      set(self.get_decay_parameter_names(model)), self.args.weight_decay)
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None and self.recover.max_minutes is not None:
                spent = budget_spent(self.clock, self.recover.max_minutes, self.step_limit)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, cosine_by_progress(self.recover.warmup_ratio, spent))
            return super().create_scheduler(num_training_steps, optimizer)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if not self.args.should_save:
                return
            from safetensors.torch import save_file

            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            tensors = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(tensors, str(out / TRAINABLE_FILE))
            spent = {"seconds": self.clock.minutes * 60, "cpu_seconds": self.clock.cpu_minutes * 60,
                     "run_seconds": self.run_time.seconds, "run_cpu_seconds": self.run_time.cpu_seconds}
            (out / BUDGET_FILE).write_text(json.dumps(spent) + "\n")

        def evaluate(self, *args, **kwargs):
            # An evaluation draws from the CPU generator (the data loader's base seed); isolating it keeps the noise
            # and data of a run independent of how often it is evaluated.
            with torch.random.fork_rng(devices=[]):
                metrics = super().evaluate(*args, **kwargs)
            if self.state.log_history and "eval_loss" in self.state.log_history[-1]:
                self.state.log_history[-1].update(minutes=round(self.clock.minutes, 4),
                                                  cpu_minutes=round(self.clock.cpu_minutes, 4))
            return metrics

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

    return RecoveryTrainer


def _checksum_callback():
    from transformers import TrainerCallback

    class Checksums(TrainerCallback):
        """After a checkpoint is complete, record the sha256 of its files: a later resume can trust it."""

        def on_save(self, args, state, control, **kwargs):
            if args.should_save:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_checksums(folder)
            return control

    return Checksums()


def write_checksums(folder: Path) -> None:
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1) + "\n")


def intact(folder: Path) -> bool:
    """Whether every file a checkpoint's checksums name is there with that content."""
    try:
        sums = json.loads((folder / CHECKSUMS_FILE).read_text())
        return all(file_sha256(folder / name) == digest for name, digest in sums.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


# ---------------------------------------------------------------- checkpoints on disk


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((p for p in out_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                  key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(out_dir: Path) -> Path | None:
    """Newest intact checkpoint, or None; damaged ones (a kill while saving, a corrupted file) are skipped."""
    for ckpt in reversed(_checkpoints(out_dir)):
        if intact(ckpt):
            return ckpt
        log.warning("checkpoint %s is incomplete or damaged; not resuming from it", ckpt)
    return None


def prepare_output(out_dir: Path, fingerprint: str, resume: bool) -> Path | None:
    """The checkpoint to resume from; stale checkpoints (other fingerprint, or resume off) are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / FINGERPRINT_FILE
    try:
        old = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        old = None
    if not resume or old != fingerprint:
        stale = _checkpoints(out_dir)
        if stale:
            why = "resume is off" if not resume else "the model, data, quantized base or training settings changed"
            log.warning("removing %d checkpoint(s) under %s: %s", len(stale), out_dir, why)
        for p in stale:
            shutil.rmtree(p)
        stamp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        return None
    return last_checkpoint(out_dir)


# ---------------------------------------------------------------- one training run


def training_arguments(cfg: RecoverConfig, out_dir: Path, device: torch.device, evaluate: bool, steps: int | None):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps or UNBOUNDED_STEPS,
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
        eval_steps=(cfg.eval_steps or UNBOUNDED_STEPS) if evaluate else None,  # also the last step; eval_minutes too
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=cfg.save_steps or max(1, math.ceil((steps or 200) / 4)),
        save_total_limit=1,
        logging_steps=max(1, min(10, (steps or 100) // 10)),
        include_num_input_tokens_seen="all",
        remove_unused_columns=False,
        ddp_broadcast_buffers=False,  # the frozen quantized weights are buffers: identical on every rank
        report_to="none",
        disable_tqdm=False,
    )


def train(model: nn.Module, data: TokenBlocks, eval_data: torch.Tensor | None, cfg: RecoverConfig, out_dir: Path,
          device: torch.device, fingerprint: str, trainable_params: int, callbacks: Iterable[Any] = ()
          ) -> TrainReport:
    """Train the prepared ``model`` in place with the Trainer; resumes from ``out_dir`` when allowed."""
    from transformers import default_data_collator

    if trainable_params == 0:
        raise UserError(f"recover ({cfg.method}) has nothing to train: the quantized linears keep no salient columns "
                        f"(give the select stage a count or fraction)")
    evaluate = eval_data is not None and (cfg.eval_steps is not None or bool(cfg.eval_minutes))
    steps = step_budget(cfg, world_size())
    args = training_arguments(cfg, out_dir, device, evaluate, steps)
    with args.main_process_first(desc="checkpoint check"):  # rank 0 removes stale checkpoints before others look
        checkpoint = prepare_output(out_dir, fingerprint, cfg.resume)
    args.eval_on_start = evaluate and checkpoint is None  # a resumed run has its start in the saved log
    spent = json.loads((checkpoint / BUDGET_FILE).read_text()) if checkpoint else {}
    clock = BudgetClock(cfg.budget_clock, spent.get("seconds", 0.0), cpu_offset=spent.get("cpu_seconds", 0.0))
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=data, eval_dataset=TokenBlocks(eval_data) if evaluate else None,
        data_collator=default_data_collator, callbacks=[_budget_callback(clock, cfg, evaluate), _checksum_callback(),
                                                        *callbacks],
        recover=cfg, clock=clock, run_time=RunTime(spent), steps=steps, live_teacher=data.live_teacher)
    if checkpoint is not None:
        log.info("resuming %s from %s", cfg.method, checkpoint)
    with PeakMemory(args.device) as mem:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    report = TrainReport(method=cfg.method, trainable_params=trainable_params, steps=trainer.state.global_step,
                         tokens=int(trainer.state.num_input_tokens_seen), seconds=trainer.run_time.seconds,
                         cpu_seconds=trainer.run_time.cpu_seconds, budget_minutes=clock.minutes,
                         peak_mb=mem.peak_mb, extra_mb=mem.extra_mb,
                         resumed_from=str(checkpoint) if checkpoint else None)
    tokens_per_step = sequences_per_step(cfg, args.world_size) * cfg.seq_len
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    report.loss_first, report.loss_last = (losses[0], losses[-1]) if losses else (None, None)
    points = {e["step"]: e for e in trainer.state.log_history if "eval_loss" in e}
    report.curve = [{"step": s, "tokens": int(e.get("num_input_tokens_seen", s * tokens_per_step)),
                     "minutes": e.get("minutes", 0.0), "cpu_minutes": e.get("cpu_minutes", 0.0),
                     "ppl": ppl_of(e["eval_loss"])}
                    for s, e in sorted(points.items())]
    return report
