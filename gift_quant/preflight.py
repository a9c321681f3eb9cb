"""Everything a recipe needs, checked before any stage runs, so a mistake costs seconds, not an hour of quantization.

The recipe's values and regexes are checked when it is parsed (``config.py``), its stage order too (``stages.py``).
Here, in order:

1. before the model loads: the stage order again (a recipe built in Python was never parsed; the stages trust it),
   the output folder can be written, local text files exist, export targets are safe;
2. with the model (whose weights ``models.load_model`` found complete): its architecture is in the table, its
   weights are finite, its tokenizer fits the embedding, the quantize targets match linears whose widths the group
   size divides and whose widths hold the salient columns asked for, rotation would preserve it, a BOS evaluation
   has a BOS token, ``kd_top_k`` fits the vocabulary, a float16 export can hold the weights;
3. with the data: every text decodes as UTF-8, the tokenizer encodes it within the embedding, and it is long enough
   for what each stage asks of it;
4. no stage is estimated at more than ``estimate.MAX_STAGE_DAYS`` (a typo'd budget or grid, not a plan).

Each problem is a ``UserError`` naming the stage, the setting and what to change.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import TextSource
from .errors import UserError
from .stages import STAGES, check_stage_order


def check_output_dir(path: Path) -> None:
    """The output folder exists as a folder or can be made, and a file can be written there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} exists and is not a folder; choose another --output-dir")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output folder {path}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".gift_quant_write_test.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"cannot write the output folder {path} ({e.strerror} in {probe})") from None


def _before_model(state) -> None:
    from .data import local_path
    from .export import check_export_target

    try:
        check_stage_order(state.recipe.stages)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_output_dir(state.output_dir)
    for stage in state.recipe.stages:
        if isinstance(stage.config, TextSource):
            local_path(stage.config, state.recipe.data.dir)
        if stage.name == "export":
            check_export_target(stage.config.path or state.output_dir / stage.config.format, state.output_dir)


def _quantize_fits(model, stages, index: int) -> None:
    """The targets of the quantize stage at ``index`` match linears that its group size and the salient columns fit."""
    from .architectures import target_linears
    from .select import salient_count

    cfg = stages[index].config
    where = f"stages.{index}.quantize"
    linears = target_linears(model, cfg.targets)
    select = next((s.config for s in stages[:index] if s.name == "select"), None)
    for name, lin in linears.items():
        if cfg.group_size != -1 and lin.in_features % cfg.group_size:
            raise UserError(f"{where}: group_size {cfg.group_size} does not divide the {lin.in_features} input "
                            f"columns of {name}; choose a divisor of every target's width, or -1 (per channel)")
        try:
            salient_count(name, lin.in_features, select)
        except ValueError as e:
            raise UserError(f"select: {name} has {lin.in_features} input columns: {e}") from None


def _with_model(state) -> None:
    from .architectures import architecture
    from .evaluate import bos_token_id
    from .models import check_finite
    from .rotate import check_rotatable

    architecture(state.model)
    check_finite(state.model)
    _tokenizer_fits(state.model, state.tokenizer, state.recipe.stages)
    stages = state.recipe.stages
    head = state.model.get_output_embeddings()
    vocab = head.out_features if head is not None else state.model.config.vocab_size
    for i, stage in enumerate(stages):
        if stage.name == "quantize":
            _quantize_fits(state.model, stages, i)
        elif stage.name == "rotate":
            check_rotatable(state.model)
        elif stage.name == "evaluate" and stage.config.bos:
            bos_token_id(state.tokenizer)
        elif (STAGES[stage.name].trains_on_text and stage.config.distils
              and (stage.config.kd_top_k or 0) > vocab):
            raise UserError(f"stages.{i}.{stage.name}: kd_top_k {stage.config.kd_top_k} is more than the model's "
                            f"{vocab} output tokens; choose at most {vocab}")
        elif stage.name == "export" and stage.config.dtype == "float16":
            _fits_float16(state.model, f"stages.{i}.export")


def _tokenizer_fits(model, tokenizer, stages) -> None:
    """The tokenizer's vocabulary and the special tokens the stages add have rows in the embedding (else an
    IndexError deep in a stage). Added tokens beyond it (a pad token some conversions append) are harmless unless a
    text holds them; the texts' own ids are checked with the data."""
    rows = model.get_input_embeddings().num_embeddings
    vocab = getattr(tokenizer, "vocab_size", 0) or 0
    used = {"eos": any(STAGES[s.name].trains_on_text for s in stages),  # training joins documents with EOS
            "bos": any(s.name == "evaluate" and s.config.bos for s in stages)}
    special = {n: getattr(tokenizer, f"{n}_token_id", None) for n in used if used[n]}
    beyond = {n: i for n, i in special.items() if isinstance(i, int) and i >= rows}
    if vocab > rows or beyond:
        what = (f"has {vocab:,} tokens" if vocab > rows
                else f"has its {', '.join(beyond)} token at id {max(beyond.values())}")
        raise UserError(f"the tokenizer {what} but the model's embedding only {rows:,} rows; the model folder mixes a "
                        f"tokenizer and weights of different models")


def _fits_float16(model, where: str) -> None:
    """The export stores float16: a weight beyond its range would only be found after every stage ran."""
    import torch

    limit = torch.finfo(torch.float16).max
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and t.abs().max().item() > limit:
            raise UserError(f"{where}: {name} holds values beyond float16's range (|x| up to "
                            f"{t.abs().max().item():.3g} > {limit:.0f}); export with dtype: bfloat16")


def _tokens(state, source: TextSource) -> int:
    from .evaluate import eval_ids

    return eval_ids(state, source).numel()


def _enough(state, where: str, source: TextSource, needed: int, what: str) -> None:
    from .evaluate import eval_ids

    ids = eval_ids(state, source)
    rows = state.model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= rows:
        raise UserError(f"{where}: the tokenizer turns '{source.dataset}' into token id {int(ids.max()):,} but the "
                        f"model's embedding has {rows:,} rows; use the model's own tokenizer")
    have = _tokens(state, source)
    if have < needed:
        raise UserError(f"{where}: '{source.dataset}' has {have:,} tokens, fewer than {what} ({needed:,}); use a "
                        f"longer text or ask for less")


def _with_data(state) -> None:
    from .config import EvaluateConfig
    from .data import check_not_eval_text
    from .compare import heldout_blocks

    for i, stage in enumerate(state.recipe.stages):
        cfg, where = stage.config, f"stages.{i}.{stage.name}"
        if stage.name == "evaluate":
            _enough(state, where, cfg, cfg.seq_len, f"one window of {cfg.seq_len}")
        elif stage.name == "calibrate":
            check_not_eval_text(cfg, "calibration")
            _enough(state, where, cfg, cfg.num_samples * cfg.seq_len,
                    f"num_samples × seq_len = {cfg.num_samples} × {cfg.seq_len}")
        elif STAGES[stage.name].trains_on_text:
            check_not_eval_text(cfg, "recovery training")
            _enough(state, where, cfg, cfg.seq_len + 1, f"one training sequence of {cfg.seq_len}")
            evaluating = cfg.eval_steps or cfg.eval_minutes or stage.name == "compare"
            if evaluating:
                _enough(state, where, EvaluateConfig(dataset=cfg.eval_dataset), cfg.eval_seq_len,
                        f"one evaluation window of {cfg.eval_seq_len}")
            if stage.name == "compare":
                _enough(state, where, EvaluateConfig(dataset=cfg.eval_dataset), cfg.final_seq_len,
                        f"one final window of {cfg.final_seq_len}")
                if cfg.sweeping:
                    heldout_blocks(state, cfg)


def preflight(state) -> None:
    """All checks above, in order; the model and the texts it loads stay in the state for the stages."""
    from .estimate import check_bounds

    _before_model(state)
    _with_model(state)
    _with_data(state)
    check_bounds(state.recipe, state.model.config.to_dict())  # a stage estimated at months: a typo, not a plan
