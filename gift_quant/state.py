"""The run state: what the stages of one recipe hand to each other, typed.

Each field is written by one stage and read by the later ones; a stage never looks anything up by name in a shared
dict, and it knows its own place in the recipe from ``position`` (the runner sets it), not by scanning the stages.
The model and tokenizer load on first use, so planning (``--dry-run``) costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CalibrateConfig, QuantizeConfig, Recipe, SelectConfig, Stage
from .distributed import is_main, rank0_first

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Written by `calibrate`: the windows the layer-by-layer pass (and block-wise training) run on."""

    config: CalibrateConfig
    windows: "torch.Tensor"  # (num_samples, seq_len) token ids


@dataclass
class Quantization:
    """Written by `quantize`: what the quantized linears were made with."""

    config: QuantizeConfig
    fingerprint: str  # of the saved layers; anything trained on top of them is valid only on this base
    salient: dict[str, "torch.Tensor"]  # module name -> salient input columns (sorted int64)


@dataclass
class Recovery:
    """Written by `recover`: a JSON-safe summary (stored with the export) and whether the result can be exported."""

    summary: dict[str, Any]
    exportable: bool
    report: Any = None  # recover.TrainReport of the run


@dataclass
class RunState:
    recipe: Recipe
    output_dir: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    position: int = -1  # index of the running stage in recipe.stages (-1 before the first)
    calibration: Calibration | None = None
    selection: SelectConfig | None = None
    rotation: dict[str, Any] | None = None  # rotate_model's record
    fixed_salient: dict[str, "torch.Tensor"] | None = None  # chosen before quantization (recover order: before)
    quantization: Quantization | None = None
    recovery: Recovery | None = None
    tokens: dict[tuple, "torch.Tensor"] = field(default_factory=dict)  # tokenized texts, by source and shape
    teacher: Any = None  # the full-precision model, loaded again when recovery learns from it (teacher.py)
    _model: Any = None
    _tokenizer: Any = None
    _weights_digest: str | None = None

    # ------------------------------------------------------------ the model

    def _load(self) -> None:
        from .models import load_model, weights_digest

        with rank0_first():  # a download or a first GGUF conversion happens once, on rank 0
            self._model, self._tokenizer = load_model(self.recipe.model)
        self._weights_digest = weights_digest(self._model)  # of the weights as loaded, before any stage changes them

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

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def weights_digest(self) -> str:
        """sha256 of the model's tensors as loaded: resumable results are tied to the weights, not to a path."""
        if self._weights_digest is None:
            from .models import weights_digest

            self._weights_digest = weights_digest(self.model)
        return self._weights_digest

    @property
    def device(self):
        from .models import resolve_device

        return resolve_device(self.recipe.model.device)

    # ------------------------------------------------------------ the recipe around the running stage

    @property
    def stage(self) -> Stage | None:
        return self.recipe.stages[self.position] if 0 <= self.position < len(self.recipe.stages) else None

    @property
    def stages_before(self) -> list[Stage]:
        return self.recipe.stages[: max(self.position, 0)]

    @property
    def stages_after(self) -> list[Stage]:
        return self.recipe.stages[self.position + 1:]

    @property
    def last_stage(self) -> str:
        """Name of the stage before the running one ("model" at the start): what a measurement was taken after."""
        return self.recipe.stages[self.position - 1].name if self.position > 0 else "model"

    # ------------------------------------------------------------ results

    def record(self, stage: str, metric: str, value: Any, **extra: Any) -> None:
        row = {"stage": stage, "after": self.last_stage, "metric": metric, "value": value, **extra}
        self.results.append(row)
        log.info("%s: %s = %s", stage, metric, value)
        self.save()

    def save(self, status: str = "running", error: str | None = None) -> None:
        if not is_main():  # under torchrun every rank runs the pipeline; rank 0 writes
            return
        from .io_utils import write_json, write_text

        doc = {"status": status, **({"error": error} if error else {}), "recipe": self.recipe.to_dict(),
               "results": self.results}
        write_json(self.output_dir / "results.json", doc)
        write_text(self.output_dir / "report.md", render_report(self, status, error))


def render_report(state: RunState, status: str = "running", error: str | None = None) -> str:
    lines = [f"# gift_quant run: {state.recipe.model.name}", "", f"Status: **{status}**" +
             (f" — {error}" if error else ""), "", "| stage | after | metric | value | tokens | seconds |",
             "|---|---|---|---|---|---|"]
    for r in state.results:
        value = f"{r['value']:.4f}" if isinstance(r["value"], float) else r["value"]
        lines.append(f"| {r['stage']} | {r['after']} | {r['metric']} | {value} | {r.get('tokens', '')} | "
                     f"{r.get('seconds', 0):.1f} |")
    notes = [r["note"] for r in state.results if r.get("note")]
    return "\n".join(lines + [""] + [f"- {n}" for n in dict.fromkeys(notes)]) + "\n"
