"""Runs a recipe: the runner and the run's report.

A stage is a function ``stage(state: RunState, config) -> None`` living in the module named after it; the stage table
(``stages.STAGES``) maps recipe names to them, their settings classes and their torchrun policy, so a new stage adds
one line there and one config class in ``config.py``. The order of the stages and the rules between them are checked
when the recipe is parsed (``stages.check_stage_order``; ``preflight`` again for a recipe built in Python, so no
stage checks what ran before it), what needs the model or the data right after it loads (``preflight``), and the
run's status is in ``results.json`` at every moment.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import yaml

from . import distributed
from .config import Recipe, Strict
from .io_utils import write_text
from .lock import output_lock, record_holder
from .preflight import preflight
from .stages import STAGES
from .state import RunState

log = logging.getLogger(__name__)

def stage_function(name: str) -> Callable[[RunState, Strict], None]:
    module, func = STAGES[name].run.split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(state: RunState, name: str, config: Strict) -> None:
    """One stage on this process; with several processes, as ``distributed.py`` lays out."""
    func, ranks = stage_function(name), STAGES[name].ranks
    if not distributed.active() or ranks == "all":
        func(state, config)
        return
    if ranks == "rank0_first":
        with distributed.rank0_first():  # the others resume from what rank 0 saved, whatever `resume` says
            func(state, config if distributed.is_main() else config.model_copy(update={"resume": True}))
    else:
        if distributed.is_main():
            with distributed.alone():
                func(state, config)
        distributed.barrier()
    state.results = distributed.from_main(state.results)


def plan(recipe: Recipe, output_dir: Path) -> str:
    """Human-readable resolved plan (what --dry-run prints)."""
    lines = [f"model:      {recipe.model.name} (dtype {recipe.model.dtype}, device {recipe.model.device})",
             f"data dir:   {recipe.data.dir or os.environ.get('GIFT_QUANT_DATA') or 'none: the Hugging Face Hub'}",
             f"output dir: {output_dir}", "stages:"]
    for i, s in enumerate(recipe.stages):
        settings = ", ".join(f"{k}={v}" for k, v in s.config.model_dump(mode="json").items())
        lines.append(f"  {i + 1}. {s.name}: {settings}")
    return "\n".join(lines)


def clear_stale_exports(state: RunState) -> None:
    """Remove earlier exports inside the output folder that this run will write again: a run that fails before its
    export must not leave an old checkpoint beside its new results."""
    from .ownership import is_export, remove_export

    for stage in state.recipe.stages:
        if stage.name == "export":
            path = Path(stage.config.path or state.output_dir / stage.config.format)
            inside = path.resolve().is_relative_to(state.output_dir.resolve())
            if inside and path.is_dir() and not path.is_symlink() and is_export(path):
                log.info("removing the earlier export %s (this run writes it again)", path)
                remove_export(path)  # its own files only: the user's files beside it stay


def run(recipe: Recipe, output_dir: Path) -> RunState:
    """Execute the stages in order; results.json and report.md are rewritten after every stage and say whether the
    run is running, complete, interrupted or failed (with the one-line error). One run at a time per output folder."""
    state = RunState(recipe=recipe, output_dir=output_dir)
    distributed.setup(recipe.model.device)
    try:
        with ExitStack() as held:
            locked = distributed.is_main() and output_dir.is_dir()
            if locked:  # an existing folder is claimed before the model loads, so a second run is refused at once
                held.enter_context(output_lock(output_dir))
            preflight(state)
            output_dir.mkdir(parents=True, exist_ok=True)
            if distributed.is_main() and not locked:
                held.enter_context(output_lock(output_dir))
            if distributed.is_main():
                record_holder(output_dir)
                clear_stale_exports(state)
                write_text(output_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            state.save()
            _run_stages(state)
    finally:
        distributed.teardown()
    return state


def _run_stages(state: RunState) -> None:
    try:
        for position, stage in enumerate(state.recipe.stages):
            state.position = position
            start = time.perf_counter()
            log.info("stage %s", stage.name)
            run_stage(state, stage.name, stage.config)
            log.info("stage %s done in %.1f s", stage.name, time.perf_counter() - start)
            state.save()
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM from a scheduler (recipe.py turns it into Interrupted)
        with _signals_held():  # a second Ctrl-C must not cut the status write short
            _save_quietly(state, "interrupted", f"stopped by {getattr(err, 'name', 'SIGINT')} during "
                                                f"{state.stage.name if state.stage else 'setup'}; rerun to resume")
        raise
    except BaseException as err:
        _save_quietly(state, "failed", " ".join(str(err).split()) or type(err).__name__)
        raise
    state.position = len(state.recipe.stages)
    state.save("complete")


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait (they are delivered afterwards) while the block runs."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _save_quietly(state: RunState, status: str, error: str) -> None:
    """Record how the run ended; when that write fails too (a full disk), the original error is the one to report."""
    try:
        state.save(status, error)
    except OSError as err:
        log.warning("could not record status '%s' in %s: %s", status, state.output_dir, err)
