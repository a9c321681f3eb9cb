"""Typed recipe: one pydantic model per stage, unknown keys rejected, values range-checked.

This module knows nothing about torch, so validating a recipe (``--dry-run``) is instant. A recipe is
``model`` + ``data`` + an ordered list of stages, each written in YAML as a one-key mapping
(``- evaluate: {max_windows: 16}``) that maps to exactly one config class here and one stage function (the stage
table, ``gift_quant.stages.STAGES``, which also holds the rules between stages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator,
                      model_validator)

from .method_specs import METHOD_SPECS
from .method_specs import names as method_names

PositiveInt = Annotated[int, Field(gt=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy's and torch's seeding take (the Trainer seeds both)


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"'{pattern}' is not a valid regular expression ({e})") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]
# A path as a shell would read it: `~` is the home folder, not a folder named "~" in the working directory.
UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = "smollm2-135m"  # alias, Hub id, local folder or .gguf file
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"  # compute device: cpu, cuda, cuda:N, auto (cuda when available)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("cpu", "cuda", "auto", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be cpu, cuda, cuda:N, mps or auto")


class DataConfig(Strict):
    # Folder holding wikitext2_test.raw and c4_sample.jsonl; $GIFT_QUANT_DATA when unset; the Hub otherwise.
    dir: UserPath | None = None


class TextSource(Strict):
    """A named text source: wikitext2, c4, a local .txt/.jsonl file, or hf:<dataset>[:<config>]."""

    dataset: str = "c4"
    split: str | None = None  # for hf: datasets (default: the source's natural split)
    text_field: str = "text"


class EvaluateConfig(TextSource):
    dataset: str = "wikitext2"
    label: str | None = None  # name of this measurement in results (default: after the previous stage)
    seq_len: PositiveInt = 2048
    max_windows: PositiveInt | None = None  # None = the whole text
    batch_size: PositiveInt = 1
    bos: bool = False  # start each window with BOS (models that expect it); default: the GPTQ protocol


class CalibrateConfig(TextSource):
    dataset: str = "c4"
    num_samples: PositiveInt = 128
    seq_len: PositiveInt = 2048
    seed: Seed = 0
    true_sequential: bool = True  # q/k/v -> o -> gate/up -> down inside a layer (the architecture table's groups)
    batch_size: PositiveInt = 8  # windows per forward during the layer-by-layer pass


class SelectConfig(Strict):
    """Salient-column selection, s_j = ‖D_j‖_τ · ‖X_j‖_ρ^γ. Presets fix (τ, ρ, γ); ``custom`` takes them free."""

    metric: Literal["gift", "quik", "owq", "custom"] = "gift"
    tau: Literal["1", "2", "inf"] | None = None  # custom only; default inf
    rho: Literal["2", "inf"] | None = None  # custom only; default inf
    gamma: Literal[0.5, 1.0, 2.0] | None = None  # custom only; default 1
    count: int | None = Field(default=None, ge=0)  # salient columns per linear (0 = plain GPTQ)
    fraction: float | None = Field(default=None, ge=0, le=1)  # of in_features (1/32 for small models)
    overrides: dict[Regex, Annotated[float, Field(ge=0)]] = {}  # regex on module name -> count (>= 1) or fraction (< 1)

    @field_validator("tau", "rho", mode="before")
    @classmethod
    def _norm_name(cls, v: Any) -> Any:
        if v is None:
            return v
        s = str(v).lower()
        return "inf" if s in ("inf", "infinity", ".inf") else s.removesuffix(".0")

    @model_validator(mode="after")
    def _consistent(self) -> "SelectConfig":
        if self.count is not None and self.fraction is not None:
            raise ValueError("give either count or fraction of salient columns, not both")
        if self.metric != "custom" and any(v is not None for v in (self.tau, self.rho, self.gamma)):
            raise ValueError(f"tau/rho/gamma are fixed by metric '{self.metric}'; use metric: custom to set them")
        return self


class QuantizeConfig(Strict):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(default=-1, ge=-1)  # -1: per output channel
    sym: bool = True
    mse: bool = False  # clip search for scales
    grid: Annotated[int, Field(gt=0, le=10_000)] = 100  # clip candidates; GPTQ uses 100
    max_shrink: float = Field(default=0.8, gt=0, lt=1)
    norm: float = Field(default=2.4, gt=0)
    percdamp: float = Field(default=0.01, gt=0, le=1)
    block_size: PositiveInt = 128
    act_order: bool = False
    static_groups: bool = False
    # Regexes on full module names (re.search); None: every linear the architecture table lists for the blocks.
    targets: list[Regex] | None = Field(default=None, min_length=1)
    resume: bool = True  # continue after the last finished layer when the fingerprint matches

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0:
            raise ValueError("group_size must be -1 (per channel) or a positive divisor of in_features")
        return v


class RotateConfig(Strict):
    mode: Literal["hadamard", "random"] = "hadamard"
    seed: Seed = 0
    rotate_heads: bool = False
    online_down_hadamard: bool = False


RecoverMethod = Literal[tuple(METHOD_SPECS)]  # type: ignore[valid-type]  # the method table's names
BlockwiseMethod = Literal[method_names(blockwise=True, trains_nothing=False)]  # type: ignore[valid-type]
TRAINS_SALIENT = method_names(salient=True)  # the methods `train_scales` adds step sizes to
LossKind = Literal["lm", "kd", "lm+kd"]


class NoiseSettings(Strict):
    """GIFT-SW's noise on the frozen part (methods with noise only): σ = noise_scale · Δ of a grid."""

    noise: Literal["gaussian", "uniform", "none"] = "gaussian"
    noise_scale: float = Field(default=0.5, ge=0)
    noise_bits: Literal[2, 3, 4, 5, 6, 7, 8] | None = None  # None: the layer's own grid (before: quantize's)
    noise_source: Literal["fresh", "pool"] = "fresh"  # pool: windows of 2^24 fixed i.i.d. draws (no drawing cost)


KEEPS_FROZEN_PART = method_names(packable=True)  # methods training beside a frozen low-bit part


class FrozenSettings(Strict):
    """How the frozen low-bit part is held while training: ``dense`` keeps its codes and a dense Ŵ (fastest);
    ``packed`` keeps only the bit-packed codes and dequantizes one linear at a time in forward and backward
    (bits/8 bytes per weight instead of 1 + the model's dtype; QLoRA-style). Same numbers either way."""

    frozen: Literal["dense", "packed"] = "dense"


class BudgetSettings(Strict):
    """How long to train: steps, tokens, minutes; whichever ends first (max_steps 100 when none is given).
    With a time budget the learning-rate schedule runs on elapsed time."""

    max_steps: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    max_minutes: float | None = Field(default=None, gt=0)
    budget_clock: Literal["wall", "process"] = "wall"  # process: CPU seconds of this process (all its threads)

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(k) is None for k in ("max_steps", "max_tokens", "max_minutes")):
            data = {**data, "max_steps": 100}
        return data


class TeacherSettings(Strict):
    """Where the full-precision teacher's forward runs (``loss: kd`` / ``lm+kd``): ``resident`` moves the whole
    teacher onto the device; ``layered`` keeps it in host memory and visits one decoder layer at a time, as quantize
    does (same logits, a fraction of the device memory, the weights crossing to the device once per pass); ``auto``
    picks ``layered`` on a GPU where the teacher does not fit beside the student, ``resident`` otherwise."""

    teacher: Literal["auto", "resident", "layered"] = "auto"
    teacher_windows: PositiveInt = 64  # training windows per layer-by-layer pass of the cached top-k targets


class RecoverConfig(TextSource, NoiseSettings, FrozenSettings, BudgetSettings, TeacherSettings):
    """Fine-tuning after (or, ``order: before``, ahead of) quantization; ``dataset`` is the training text."""

    method: RecoverMethod = "gift_sw"
    order: Literal["after", "before"] = "after"  # before: Pre-GIFT-SW, noise at the target bit-width on the fp model
    loss: LossKind = "lm"  # next-token loss, distillation from the model before quantization (KL), or their sum
    kd_temperature: float = Field(default=1.0, gt=0)
    kd_top_k: PositiveInt | None = 64  # teacher logits kept per token (cached once per model and training text);
    # None: the full vocabulary, the teacher run beside the student at every step (nothing cached)
    train_scales: bool = False  # gift_sw / salient_ft: the quantization scales train too (codes fixed)
    train_norms: bool = False  # the decoder's RMSNorm weights train too (ordinary fp tensors in the export)
    learning_rate: float = Field(default=1e-4, gt=0)
    scales_learning_rate: float | None = Field(default=None, gt=0)  # None: learning_rate
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: PositiveInt = 1  # per device
    gradient_accumulation_steps: PositiveInt = 1
    seq_len: PositiveInt = 512
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    gradient_checkpointing: bool = False
    lora_rank: PositiveInt | None = None  # None: matched to GIFT-SW's trainable parameter count
    lora_alpha: float | None = Field(default=None, gt=0)  # None: 2 * rank
    eval_dataset: str = "wikitext2"  # perplexity text during training (never trained on)
    eval_steps: PositiveInt | None = None  # None: no evaluation during training (see also eval_minutes)
    eval_minutes: list[Annotated[float, Field(gt=0)]] = []  # also evaluate when the budget clock passes these
    eval_windows: PositiveInt = 4
    eval_seq_len: PositiveInt = 512
    save_steps: PositiveInt | None = None  # None: every quarter of max_steps (and always at the end)
    seed: Seed = 0
    resume: bool = True  # continue from the last checkpoint when the run's fingerprint matches

    @property
    def distils(self) -> bool:
        """Whether the loss reads the teacher (kd, lm+kd): decided here for the data, the trainer and the estimate."""
        return "kd" in self.loss

    @model_validator(mode="after")
    def _consistent(self) -> "RecoverConfig":
        if self.order == "before" and self.method not in TRAINS_SALIENT:
            raise ValueError(f"order: before trains the full-precision model; method '{self.method}' needs the "
                             f"quantized one (use gift_sw or salient_ft)")
        if self.frozen == "packed" and (self.method not in KEEPS_FROZEN_PART or self.order == "before"):
            raise ValueError(f"frozen: packed keeps the frozen low-bit part packed; method '{self.method}'"
                             f"{' before quantization' if self.order == 'before' else ''} trains without one "
                             f"(use it with {', '.join(KEEPS_FROZEN_PART)} after quantization)")
        if self.train_scales and (self.method not in TRAINS_SALIENT or self.order == "before"):
            raise ValueError(f"train_scales adds the scales to gift_sw or salient_ft after quantization; "
                             f"'{self.method}'{' before quantization' if self.order == 'before' else ''} cannot "
                             f"take it (scales_only and ste_lsq train scales by definition)")
        return self


class CompareConfig(RecoverConfig):
    """Every entry of ``methods`` from the same quantized model, with the training settings inherited above, for
    every seed in ``seeds``; with ``lr_sweep`` each entry first picks its learning rate on held-out training text.
    An entry is a method's name, or a name defined in ``variants`` as a method with settings of its own (e.g.
    ``gift_sw_scales: {method: gift_sw, train_scales: true}``); the budget, data and loss stay shared."""

    methods: list[str] = ["gift_sw", "salient_ft", "ste", "lora"]
    variants: dict[str, dict[str, Any]] = {}
    learning_rates: dict[str, Annotated[float, Field(gt=0)]] = {}  # per-entry override of learning_rate
    seeds: list[Seed] = Field(default=[0], min_length=1)
    lr_sweep: list[Annotated[float, Field(gt=0)]] = []  # candidates; each method's best on held-out text wins
    lr_sweeps: dict[str, list[Annotated[float, Field(gt=0)]]] = {}  # per-entry candidates, instead of lr_sweep
    lr_sweep_extend: NonNegativeInt = 2  # extra log-steps past an edge pick, so picks end inside the sweep
    sweep_fraction: float = Field(default=0.25, gt=0, le=1)  # of the budget, for each sweep run
    heldout_windows: PositiveInt = 8  # windows of seq_len from training-text documents that training never reads
    final_seq_len: PositiveInt = 2048  # before/after perplexity; match the evaluate stages to reuse their rows
    final_windows: PositiveInt | None = 16  # None = the whole text

    def sweep_for(self, entry: str) -> list[float]:
        """The learning rates ``entry`` tries before its seeds run (empty: it runs at its configured rate)."""
        return list(self.lr_sweeps.get(entry, self.lr_sweep))

    @property
    def sweeping(self) -> bool:
        return bool(self.lr_sweep or self.lr_sweeps)

    @property
    def most_sweep_runs(self) -> int:
        """Shortened runs of the longest sweep, its extensions past an edge included (an upper bound)."""
        return max(len(self.sweep_for(m)) for m in self.methods) + (self.lr_sweep_extend if self.sweeping else 0)

    @model_validator(mode="after")
    def _methods(self) -> "CompareConfig":
        if {"method", "order"} & self.model_fields_set:
            raise ValueError("compare runs every entry of 'methods' on the quantized model; 'method' and 'order' "
                             "belong to the recover stage")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must be a non-empty list without repeats")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must not repeat")
        if (self.lr_sweep or self.lr_sweeps) and self.learning_rates:
            raise ValueError("give either lr_sweep / lr_sweeps (each method picks its own) or learning_rates, not both")
        known = set(get_args(RecoverMethod)) | set(self.variants)
        unknown = [m for m in [*self.methods, *self.learning_rates, *self.lr_sweeps] if m not in known]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is neither a recovery method ({', '.join(get_args(RecoverMethod))}) "
                             f"nor defined in variants")
        shared = set(BudgetSettings.model_fields) | {"dataset", "split", "text_field", "loss", "seq_len", "seed",
                                                     "batch_size", "gradient_accumulation_steps"}
        for name, settings in self.variants.items():
            if "method" not in settings or set(settings) & shared:
                raise ValueError(f"variants.{name}: needs a 'method' and may not change the shared budget, data, "
                                 f"loss or seed ({', '.join(sorted(set(settings) & shared)) or 'method missing'})")
            try:
                RecoverConfig.model_validate(settings)
            except ValidationError as err:
                raise ValueError(describe(err, f"variants.{name}")) from None
        return self


BUDGET_FIELDS = ("max_steps", "max_tokens", "max_minutes")


def entry_method(cfg: CompareConfig, name: str) -> str:
    """The recovery method behind an entry of a comparison's ``methods``: the method itself or the one a variant
    names."""
    return cfg.variants.get(name, {}).get("method", name)


def method_config(cfg: CompareConfig, method: str, learning_rate: float, seed: int, fraction: float = 1.0
                  ) -> RecoverConfig:
    """The recover settings of one run: the shared ones, this entry's method (and its variant's settings), learning
    rate and seed, the budget scaled by ``fraction`` (learning-rate sweeps), and evaluation at least 4 times."""
    shared = cfg.model_dump(include=set(RecoverConfig.model_fields) - {"method", "order"})
    variant = dict(cfg.variants.get(method, {"method": method}))
    method = variant.pop("method")
    shared.update(variant)
    for key in BUDGET_FIELDS:
        if shared[key] is not None and fraction < 1:
            shared[key] = max(1, round(shared[key] * fraction)) if key != "max_minutes" else shared[key] * fraction
    steps = shared["max_steps"]
    shared.update(method=method, learning_rate=learning_rate, seed=seed,
                  frozen=cfg.frozen if method in KEEPS_FROZEN_PART else "dense",
                  eval_steps=cfg.eval_steps or (max(1, steps // 4) if steps and not cfg.eval_minutes else None))
    return RecoverConfig.model_validate(shared)


class ReconstructConfig(NoiseSettings, FrozenSettings):
    """Block-wise reconstruction after quantization: each decoder block in order trains its method's tensors to
    reproduce the full-precision block's output on the calibration windows (MSE); the next block then reads the
    reconstructed block's output. ``block_ap`` trains every weight through the quantizer (EfficientQAT's Block-AP)
    and writes the codes it ends on back into the quantized model; the salient methods train their columns (+ scales,
    + norms) with the codes fixed."""

    method: BlockwiseMethod = "gift_sw"
    train_scales: bool = True  # gift_sw / salient_ft: the scales train with the salient columns (block_ap: always)
    train_norms: bool = False  # the block's RMSNorm weights train too (exported as ordinary fp tensors)
    learning_rate: float = Field(default=1e-4, gt=0)  # salient columns (and norms)
    scales_learning_rate: float | None = Field(default=None, gt=0)  # scales and zero points; None: learning_rate
    codes_learning_rate: float = Field(default=0.01, gt=0)  # block_ap's latent codes, in code units (0.5 flips one;
    # on SmolLM2 at 3 bits 0.03 raised some blocks' MSE above the PTQ block's, 0.1 diverged: docs/results.md)
    epochs: PositiveInt | None = 2  # passes over the calibration windows per block; None: until max_minutes ends the
    # stage (the cosine then follows the clock alone; how many passes a budget affords depends on the machine)
    batch_size: PositiveInt = 4  # calibration windows per step
    num_samples: PositiveInt | None = None  # windows to train on; None: the calibrate stage's (more are drawn with
    # its source, length and seed, its own windows first)
    inputs: Literal["quantized", "fp"] = "quantized"  # each block's inputs: the reconstructed blocks' outputs before
    # it (GPTQ convention: it learns to undo their error) or the full-precision stream
    heldout_windows: NonNegativeInt = 8  # windows never trained on (the calibration sampler's next ones), whose block
    # MSE before and after is logged beside the training windows' (does the block generalise or fit them?); 0: none
    revert_worse: bool = True  # a block whose MSE on its training windows ends above where it started is put back
    # as it was (discrete code flips can raise it; the held-out windows stay unused for any decision)
    max_minutes: float | None = Field(default=None, gt=0)  # the whole stage, targets and checks included: budget.py
    budget_clock: Literal["wall", "process"] = "wall"  # process: CPU seconds of this process (all its threads)
    seed: Seed = 0
    resume: bool = True  # continue after the last finished block when the fingerprint matches

    @model_validator(mode="after")
    def _consistent(self) -> "ReconstructConfig":
        if self.epochs is None and self.max_minutes is None:
            raise ValueError("epochs: null trains until max_minutes ends the stage; give max_minutes (or a number of "
                             "epochs)")
        if self.frozen == "packed" and self.method not in KEEPS_FROZEN_PART:
            raise ValueError(f"frozen: packed keeps the frozen low-bit part packed; method '{self.method}' trains "
                             f"every weight (use it with {', '.join(KEEPS_FROZEN_PART)})")
        return self

    @property
    def passes(self) -> str:
        """Each block's passes over its windows, in words (the stage's note and the estimate say it alike)."""
        return f"{self.epochs} epochs" if self.epochs else f"as many epochs as {self.max_minutes:g} minutes allow"


class ExportConfig(Strict):
    format: Literal["packed", "dense"] = "packed"
    dtype: Literal["float16", "bfloat16"] = "float16"
    max_shard_size: str = "2GB"
    path: UserPath | None = None  # default: <output_dir>/<format>
    verify: Literal["float32", "float16", "bfloat16"] | None = None  # reload in this dtype and re-measure perplexity
    # Packed format: the input embedding and lm_head (tied: stored once) as int8 per row (absmax scale), int4 in
    # groups of embedding_group_size columns, or a float dtype. On a small model the embedding is most of the file.
    embedding: Literal["int8", "int4", "float16", "bfloat16"] = "int8"
    embedding_group_size: PositiveInt = 32

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        from huggingface_hub.serialization._base import parse_size_to_int  # what the writer parses it with

        try:
            size = parse_size_to_int(v)
        except ValueError:
            size = 0
        if size <= 0:
            raise ValueError(f"'{v}' is not a size such as 500MB or 2GB (units KB, MB, GB, TB)")
        return v


class ZeroShotConfig(Strict):
    """lm-eval-harness tasks scored zero-shot (the optional ``eval`` extra)."""

    tasks: list[str] = Field(min_length=1)  # lm-eval task names, e.g. [piqa, arc_easy, hellaswag, winogrande]
    limit: PositiveInt | None = None  # documents per task (None = all)
    batch_size: PositiveInt = 1
    task_dir: UserPath | None = None  # extra folder of task YAMLs (lm-eval's include_path), e.g. a local file task
    model: Literal["memory", "export"] = "memory"  # the run's model, or the last export reloaded from disk
    label: str | None = None


class Stage(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    config: Strict


class Recipe(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    output_dir: UserPath | None = None  # default: outputs/<recipe file stem>
    seed: Seed = 0
    stages: list[Stage]

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: Path | None) -> Path | None:
        if v is not None and str(v).strip() in ("", "."):
            raise ValueError("must name a folder of its own (not empty, not the working directory)")
        return v

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe in the YAML's own shape (one-key stage mappings)."""
        out = self.model_dump(mode="json", exclude={"stages"})
        out["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in self.stages]
        return out


def describe(err: ValidationError, prefix: str = "") -> str:
    """First validation problem as 'where: what'; extra ones are counted, not listed."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        what = "unknown key (check the spelling; see the stage's settings in the README)"
    else:
        what = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {what}{more}" if where else f"{what}{more}"
