"""Runs a recipe: the stage registry, the shared run state, and the run's output files.

A stage is a function ``stage(state: RunState, config) -> None`` living in the module named after it; the table below
maps recipe names to them, so a new stage adds one line here and one config class in ``config.py``.
"""

from __future__ import annotations

import importlib
import os
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import Recipe, Strict
from .io_utils import write_json, write_text

log = logging.getLogger(__name__)

STAGE_FUNCTIONS: dict[str, str] = {
    "evaluate": "gift_quant.evaluate:evaluate_stage",
    "calibrate": "gift_quant.calibrate:calibrate_stage",
    "select": "gift_quant.select:select_stage",
    "rotate": "gift_quant.rotate:rotate_stage",
    "quantize": "gift_quant.quantize:quantize_stage",
    "recover": "gift_quant.recover:recover_stage",
    "compare": "gift_quant.compare:compare_stage",
    "export": "gift_quant.export:export_stage",
}


def stage_function(name: str) -> Callable[["RunState", Strict], None]:
    module, func = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module), func)


@dataclass
class RunState:
    """Everything stages hand to each other. The model loads on first use, so planning costs nothing."""

    recipe: Recipe
    output_dir: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # stage outputs: calibration, selection, records, ...
    last_stage: str = "model"
    _model: Any = None
    _tokenizer: Any = None

    def _load(self) -> None:
        from .models import load_model

        self._model, self._tokenizer = load_model(self.recipe.model)

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @property
    def device(self):
        from .models import resolve_device

        return resolve_device(self.recipe.model.device)

    def record(self, stage: str, metric: str, value: float, **extra: Any) -> None:
        row = {"stage": stage, "after": self.last_stage, "metric": metric, "value": value, **extra}
        self.results.append(row)
        log.info("%s: %s = %s", stage, metric, value)
        self.save()

    def save(self) -> None:
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank runs the pipeline; one writes
            return
        write_json(self.output_dir / "results.json", {"recipe": self.recipe.to_dict(), "results": self.results})
        write_text(self.output_dir / "report.md", render_report(self))


def render_report(state: RunState) -> str:
    lines = [f"# gift_quant run: {state.recipe.model.name}", "", "| stage | after | metric | value | tokens | seconds |",
             "|---|---|---|---|---|---|"]
    for r in state.results:
        value = f"{r['value']:.4f}" if isinstance(r["value"], float) else r["value"]
        lines.append(f"| {r['stage']} | {r['after']} | {r['metric']} | {value} | {r.get('tokens', '')} | "
                     f"{r.get('seconds', 0):.1f} |")
    notes = [r["note"] for r in state.results if r.get("note")]
    return "\n".join(lines + [""] + [f"- {n}" for n in dict.fromkeys(notes)]) + "\n"


def plan(recipe: Recipe, output_dir: Path) -> str:
    """Human-readable resolved plan (what --dry-run prints)."""
    lines = [f"model:      {recipe.model.name} (dtype {recipe.model.dtype}, device {recipe.model.device})",
             f"data dir:   {recipe.data.dir or os.environ.get('GIFT_QUANT_DATA') or 'none: the Hugging Face Hub'}",
             f"output dir: {output_dir}", "stages:"]
    for i, s in enumerate(recipe.stages):
        settings = ", ".join(f"{k}={v}" for k, v in s.config.model_dump(mode="json").items())
        lines.append(f"  {i + 1}. {s.name}: {settings}")
    return "\n".join(lines)


def preflight(state: RunState) -> None:
    """Catch missing inputs before minutes of work: local data files first, then the model itself."""
    from .config import TextSource
    from .data import local_path

    from .export import check_export_target

    for stage in state.recipe.stages:
        if isinstance(stage.config, TextSource):
            local_path(stage.config, state.recipe.data.dir)
        if stage.name == "export":
            check_export_target(stage.config.path or state.output_dir / stage.config.format, state.output_dir)
    state.model  # noqa: B018 (loads it)


def run(recipe: Recipe, output_dir: Path) -> RunState:
    """Execute the stages in order; results.json and report.md are rewritten after every stage."""
    state = RunState(recipe=recipe, output_dir=output_dir)
    preflight(state)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    for stage in recipe.stages:
        fn = stage_function(stage.name)
        start = time.perf_counter()
        log.info("stage %s", stage.name)
        fn(state, stage.config)
        state.last_stage = stage.name
        log.info("stage %s done in %.1f s", stage.name, time.perf_counter() - start)
        state.save()
    return state
