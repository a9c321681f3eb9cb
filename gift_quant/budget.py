"""A training budget, said once for the trainer, the block-wise stage and ``--dry-run``'s estimate (no torch here):
the step limit that max_steps and max_tokens give, the clocks that max_minutes reads (wall or process CPU; the
trainer's counts its training steps, the block-wise stage's all of its work), and the cosine schedule on the fraction
of the budget spent, whichever limit ends first."""

from __future__ import annotations

import math
import time
from typing import Any, Callable


def sequences_per_step(cfg: Any, world_size: int = 1) -> int:
    """Training sequences (of ``cfg.seq_len`` tokens) in one optimizer step, over all processes."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def step_budget(cfg: Any, world_size: int = 1) -> int | None:
    """The step limit from max_steps and max_tokens (the smaller), or None when only a time budget is given."""
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.max_tokens:
        limits.append(max(1, math.ceil(cfg.max_tokens / (sequences_per_step(cfg, world_size) * cfg.seq_len))))
    return min(limits) if limits else None


class BudgetClock:
    """Training time on the budget's clock (wall or process CPU), counting only the training steps; the same steps'
    process CPU time is kept as well, so that runs on a wall clock can still be compared at equal CPU seconds."""

    def __init__(self, clock: str, offset: float = 0.0, now=None, cpu_offset: float = 0.0) -> None:
        self._now = now or (time.perf_counter if clock == "wall" else time.process_time)
        self.spent, self._since = offset, None
        self.cpu_spent, self._cpu_since = cpu_offset, None

    def start(self) -> None:
        self._since, self._cpu_since = self._now(), time.process_time()

    def stop(self) -> None:
        if self._since is not None:
            self.spent += self._now() - self._since
            self.cpu_spent += time.process_time() - self._cpu_since
            self._since = self._cpu_since = None

    @property
    def minutes(self) -> float:
        running = self._now() - self._since if self._since is not None else 0.0
        return (self.spent + running) / 60

    @property
    def cpu_minutes(self) -> float:
        running = time.process_time() - self._cpu_since if self._cpu_since is not None else 0.0
        return (self.cpu_spent + running) / 60


class StageBudget:
    """The block-wise stage's ``max_minutes`` on its clock, each block's targets, MSE checks and pass to the next block
    included (at a small budget they cost about as much as the training). A block may spend an even share of what is
    left when it starts, and trains for that share less its own opening work (targets, MSE before) and its closing
    work (MSE after, the pass on), the latter as measured on the block before it (on the first, as long as its
    opening). A block whose share is gone keeps its start; one resumed from a saved result counts as its share."""

    def __init__(self, minutes: float | None, clock: str, blocks: int, now=None) -> None:
        self.seconds = None if minutes is None else 60 * minutes
        self.clock, self.blocks_left, self.credited = BudgetClock(clock, now=now), blocks, 0.0
        self.closing: float | None = None
        self._block_start = self._trained_at = 0.0
        self.clock.start()

    def _now(self) -> float:
        return self.clock.minutes * 60

    def _allotment(self) -> float:
        return (self.seconds - self.credited - self._block_start) / self.blocks_left

    def start_block(self) -> None:
        self._block_start = self._now()

    def training_seconds(self) -> float | None:
        """How long the current block may train, from now (None: no time budget)."""
        if self.seconds is None:
            return None
        opening = self._now() - self._block_start
        closing = opening if self.closing is None else self.closing
        return max(0.0, self._allotment() - opening - closing)

    def trained(self) -> None:
        self._trained_at = self._now()

    def end_block(self, resumed: bool = False) -> None:
        if resumed and self.seconds is not None:  # its share, less what loading it took (already on the clock)
            self.credited += self._allotment() - (self._now() - self._block_start)
        elif not resumed:
            self.closing = self._now() - self._trained_at
        self.blocks_left = max(1, self.blocks_left - 1)


class RunTime:
    """Wall and process CPU time of a run, evaluations included, carried across resumes by the checkpoint (a
    checkpoint from before these were saved carries its steps' times instead)."""

    def __init__(self, saved: dict[str, float]) -> None:
        self.saved_wall = saved.get("run_seconds", saved.get("seconds", 0.0))
        self.saved_cpu = saved.get("run_cpu_seconds", saved.get("cpu_seconds", 0.0))
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return self.saved_wall + time.perf_counter() - self._wall

    @property
    def cpu_seconds(self) -> float:
        return self.saved_cpu + time.process_time() - self._cpu


def cosine_by_progress(warmup: float, progress) -> Any:
    """HF's cosine-with-warmup shape on a progress in [0, 1] instead of a step count."""

    def factor(step: int) -> float:
        p = min(1.0, progress(step))
        if p < warmup:
            return p / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / max(1e-12, 1.0 - warmup)))

    return factor


def budget_spent(clock: BudgetClock, minutes: float | None, steps: int | None) -> Callable[[int], float]:
    """The fraction of a training budget spent after ``step`` steps: time and steps, whichever ends first."""

    def fraction(step: int) -> float:
        return max(clock.minutes / minutes if minutes else 0.0, step / steps if steps else 0.0)

    return fraction
