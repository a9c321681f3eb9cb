"""Stage `zero_shot`: the paper's zero-shot accuracies through lm-eval-harness (the optional ``eval`` extra).

The model is the run's current one (``model: memory``) or the packed export reloaded with ``from_pretrained``
(``model: export``, the last export stage's folder), wrapped in lm-eval's ``HFLM`` with the run's tokenizer.
``task_dir`` adds a folder of task YAMLs (lm-eval's ``include_path``), e.g. a local multiple-choice file task.
Accuracies (``acc``, and ``acc_norm`` where the task has it) are recorded as ``<task>_acc`` rows. The stage
changes no weights. A task whose data cannot be reached, or that lm-eval does not know, is one UserError line.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)
METRICS = ("acc", "acc_norm")


def zero_shot_stage(state, cfg) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("the zero_shot stage needs lm-eval: pip install 'gift_quant[eval]'")
    model = state.model if cfg.model == "memory" else _reload_export(state)
    results = evaluate_tasks(model, state.tokenizer, cfg.tasks, cfg.limit, cfg.batch_size, cfg.task_dir, state.device)
    label = cfg.label or f"{cfg.model} model after {state.last_stage}"
    for task, metrics in results.items():
        for metric, value in metrics.items():
            state.record("zero_shot", f"{task}_{metric}", value, label=label, limit=cfg.limit)


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str], limit: int | None, batch_size: int,
                   task_dir: Path | None, device: Any) -> dict[str, dict[str, float]]:
    """{task: {"acc": …, "acc_norm": …}} from lm-eval, zero-shot, on ``model`` as it is (nothing is copied)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, tasks, task_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                              bootstrap_iters=0, log_samples=False)
    except (OSError, ConnectionError, ValueError) as err:  # datasets: offline, missing files, unknown configs
        if type(err).__name__ == "CheckpointError":
            raise
        raise UserError(f"zero_shot: task data for {', '.join(tasks)} could not be loaded: "
                        f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
    return {task: {m: float(r[f"{m},none"]) for m in METRICS if f"{m},none" in r}
            for task, r in out["results"].items()}


def _task_manager(manager_cls: Any, tasks: list[str], task_dir: Path | None) -> Any:
    """lm-eval's task index: the local folder alone when it holds every task (indexing lm-eval's own ~15k task
    configs takes 10-20 s), else both."""
    if task_dir is not None:
        local = manager_cls(include_path=str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = manager_cls(include_path=str(task_dir) if task_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"zero_shot: lm-eval knows no task {unknown[0]!r}"
                        + ("" if task_dir else " (set task_dir for a local task folder)"))
    return manager


def _reload_export(state) -> Any:
    """The last export stage's folder, loaded the way a user would (``from_pretrained``) in the run's dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hf_quantizer import load_quantized

    cfg = [s.config for s in state.stages_before if s.name == "export"][-1]
    path = Path(cfg.path or state.output_dir / cfg.format)
    dtype = getattr(torch, state.recipe.model.dtype)
    if cfg.format == "packed":
        return load_quantized(path, device=state.device, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(state.device).eval()
