"""What a stage is, said once and without torch: its typed settings, the function that runs it (imported only when
it runs, so parsing and ``--dry-run`` stay torch-free), whether a recipe may hold it once only, where it must stand
with respect to the quantize stage and which stages must come before it, and what each process does under torchrun.
A recipe is parsed here (:func:`parse_recipe`: each stage's settings, then :func:`check_stage_order`); the runner
(``pipeline``) and ``preflight`` read the same table (preflight checks the order again for a recipe built in Python),
so the stages themselves never check what must run before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from .config import (CalibrateConfig, CompareConfig, EvaluateConfig, ExportConfig, QuantizeConfig, ReconstructConfig,
                     Recipe, RecoverConfig, RotateConfig, SelectConfig, Stage, Strict, ZeroShotConfig, describe)
from .method_specs import METHOD_SPECS

Ranks = Literal["all", "rank0_first", "rank0_only"]


@dataclass(frozen=True)
class StageSpec:
    config: type[Strict]
    run: str  # "module:function"
    once: bool = False
    quantize: Literal["before", "after"] | None = None  # must stand before the quantize stage / needs its model
    needs: tuple[tuple[str, str], ...] = ()  # (stage that must come before it, what for)
    trains_on_text: bool = False  # trains with the Trainer on a text joined with EOS (its texts, kd_top_k checked)
    # torchrun: "rank0_first" = rank 0 runs and saves, the others load what it saved; "rank0_only" = writes a result
    # no other rank needs; "all" = every rank runs it
    ranks: Ranks = "all"


STAGES: dict[str, StageSpec] = {
    "evaluate": StageSpec(EvaluateConfig, "gift_quant.evaluate:evaluate_stage"),
    "calibrate": StageSpec(CalibrateConfig, "gift_quant.calibrate:calibrate_stage", once=True),
    "select": StageSpec(SelectConfig, "gift_quant.select:select_stage", once=True, quantize="before"),
    "rotate": StageSpec(RotateConfig, "gift_quant.rotate:rotate_stage", once=True, quantize="before"),
    "quantize": StageSpec(QuantizeConfig, "gift_quant.quantize:quantize_stage", once=True, ranks="rank0_first"),
    "recover": StageSpec(RecoverConfig, "gift_quant.recover:recover_stage", quantize="after", trains_on_text=True),
    "compare": StageSpec(CompareConfig, "gift_quant.compare:compare_stage", quantize="after", trains_on_text=True),
    "reconstruct": StageSpec(ReconstructConfig, "gift_quant.reconstruct:reconstruct_stage", quantize="after",
                             needs=(("calibrate", "trains on the calibration windows"),), ranks="rank0_first"),
    "export": StageSpec(ExportConfig, "gift_quant.export:export_stage", quantize="after", ranks="rank0_only"),
    "zero_shot": StageSpec(ZeroShotConfig, "gift_quant.zero_shot:zero_shot_stage"),
}

_BEFORE_QUANTIZE = {"select": "a quantize stage (it chooses the columns quantize keeps)",
                    "rotate": "the quantize stage (the quantized grid is not rotated)"}


def check_stage_order(stages: list[Stage]) -> None:
    """The rules between stages, so that ``--dry-run`` catches a recipe that could only fail or mislead later: the
    table's (once only, before or after quantize, stages needed before), then the few that depend on settings."""
    names = [s.name for s in stages]
    for once in (n for n, spec in STAGES.items() if spec.once):
        if names.count(once) > 1:
            second = [i for i, n in enumerate(names) if n == once][1]
            raise ValueError(f"stages.{second}.{once}: a recipe has at most one {once} stage")
    q = names.index("quantize") if "quantize" in names else None
    for i, stage in enumerate(stages):
        where, spec = f"stages.{i}.{stage.name}", STAGES[stage.name]
        pre_gift = stage.name == "recover" and stage.config.order == "before"
        if spec.quantize == "before" and (q is None or i > q) and not (stage.name == "rotate" and q is None):
            raise ValueError(f"{where}: must come before {_BEFORE_QUANTIZE[stage.name]}")
        if spec.quantize == "after" and not pre_gift and (q is None or i < q):
            raise ValueError(f"{where}: needs the quantized model: put a quantize stage before it")
        for needed, why in spec.needs:
            if needed not in names[:i]:
                raise ValueError(f"{where}: {why}: add a '{needed}' stage before it")
        _settings_rules(stages, i, where, q)


def _settings_rules(stages: list[Stage], i: int, where: str, q: int | None) -> None:
    """Rules that depend on a stage's settings, not only on its name."""
    stage, names = stages[i], [s.name for s in stages[:i]]
    cfg = stage.config
    if stage.name == "quantize":
        fixed = any(s.name == "recover" and s.config.order == "before" for s in stages[:i])
        if cfg.method == "gptq" and "calibrate" not in names:
            raise ValueError(f"{where}: gptq needs calibration data: add a 'calibrate' stage before it")
        if "select" in names and not fixed and "calibrate" not in names:
            raise ValueError(f"{where}: salient selection needs calibration data: add a 'calibrate' stage before it")
    if stage.name == "recover" and cfg.order == "before":
        if q is None or i > q:
            raise ValueError(f"{where}: order: before needs a quantize stage after it")
        if not ("calibrate" in names and "select" in names):
            raise ValueError(f"{where}: order: before needs calibrate and select stages before it")
    if stage.name == "zero_shot" and cfg.model == "export" and "export" not in names:
        raise ValueError(f"{where}: model: export needs an export stage before it")
    if stage.name == "export" and any(s.name == "recover" and not METHOD_SPECS[s.config.method].exportable
                                      for s in stages[:i]):
        raise ValueError(f"{where}: LoRA recovery keeps unmerged adapters that the low-bit format cannot hold; "
                         f"export after another method, or drop the export stage")


def stage_name(item: Any) -> str:
    """The stage name of one raw recipe entry (`- name: {...}` or a bare `- name`), before validation."""
    return next(iter(item)) if isinstance(item, dict) else item


def parse_stage(index: int, item: Any) -> Stage:
    """One `- name: {settings}` entry; a bare `- name` means default settings."""
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"stages.{index}: must be a one-key mapping such as '- evaluate: {{}}'")
    ((name, body),) = item.items()
    if name not in STAGES:
        raise ValueError(f"stages.{index}: unknown stage '{name}' (known: {', '.join(STAGES)})")
    if body is not None and not isinstance(body, dict):
        raise ValueError(f"stages.{index}.{name}: settings must be a mapping")
    try:
        config = STAGES[name].config.model_validate(body or {})
    except ValidationError as err:
        raise ValueError(describe(err, f"stages.{index}.{name}")) from None
    return Stage(name=name, config=config)


def parse_recipe(data: Any) -> Recipe:
    """Validate a loaded YAML document; raises ValueError with a one-line, located message."""
    if not isinstance(data, dict):
        raise ValueError("the recipe must be a YAML mapping with at least a 'stages' list")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError("'stages' must be a non-empty list such as '- evaluate: {}'")
    parsed = [parse_stage(i, item) for i, item in enumerate(stages)]
    try:
        recipe = Recipe.model_validate({**data, "stages": parsed})
    except ValidationError as err:
        raise ValueError(describe(err)) from None
    check_stage_order(recipe.stages)
    return recipe
