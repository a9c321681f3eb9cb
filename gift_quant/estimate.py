"""Peak memory and time of each stage of a recipe, from the model's config alone (what ``--dry-run`` prints).

Nothing is loaded (and this module needs no torch): the shape comes from the model's ``config.json`` (a local folder, the
embedded alias's cached conversion), a built-in table of public configs (Llama-2 7B/13B/70B, SmolLM2-135M) or
transformers' offline cache. A stage's peak is the sum of what this code holds at the stage's worst moment, part by
part (``StageEstimate.parts``), on the compute device; ``host`` is what the CPU holds meanwhile (the model between
the layers of the layer-by-layer pass, the copies compare starts from). On a CPU run the two are one memory.

The parts follow the code: quantize keeps two copies of the calibration activations (a layer's inputs and outputs),
one layer on the device, the Hessians of one group of linears (q/k/v share one accumulation and copy it) and GPTQ's
working copies; training keeps the frozen part (codes and a dense Ŵ, or only the packed codes), the trainable tensors
with their gradient and AdamW's two moments, the activations autograd saves (per token and layer: 4h + 3I + 2·kv +
the salient inputs; measured on Llama blocks), the loss's float copies of the logits, and the largest linear's
transient Ŵ (noise or dequantization). Times are FLOPs over a sustained matmul rate plus GPTQ's per-column loop and
elementwise passes over the weights; the CPU rates were measured on SmolLM2 (docs/scaling.md), the CUDA ones are
assumptions for an 80 GB A100/H100-class GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architecture_table import ARCHITECTURES, LLAMA as LLAMA_TABLE, Architecture
from .budget import sequences_per_step, step_budget
from .config import Recipe, RecoverConfig, SelectConfig
from .method_specs import METHOD_SPECS, scales_train

GB = 1e9
GPU_MEMORY = 80 * GB  # the budget the docs tabulate against: one 80 GB GPU


# What each linear of the architecture table maps (in, out) from the config's widths: hidden h, attention q = heads ·
# head_dim, kv = kv_heads · head_dim, intermediate i; fused linears hold their parts' outputs stacked.
_WIDTHS = {"q_proj": lambda s: (s.hidden, s.q), "k_proj": lambda s: (s.hidden, s.kv),
           "v_proj": lambda s: (s.hidden, s.kv), "qkv_proj": lambda s: (s.hidden, s.q + 2 * s.kv),
           "o_proj": lambda s: (s.q, s.hidden), "gate_proj": lambda s: (s.hidden, s.intermediate),
           "up_proj": lambda s: (s.hidden, s.intermediate), "gate_up_proj": lambda s: (s.hidden, 2 * s.intermediate),
           "down_proj": lambda s: (s.intermediate, s.hidden)}


@dataclass(frozen=True)
class Shape:
    """What the estimates need from a decoder's config; which linears and norms a block holds is the architecture
    table's entry for the config's ``model_type`` (Llama's when it has none)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    arch: Architecture = LLAMA_TABLE

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], intermediate=c["intermediate_size"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),
                   arch=ARCHITECTURES.get(c.get("model_type", "llama"), LLAMA_TABLE))

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name in a block, in_features, out_features) in true-sequential order."""
        return [(n, *_WIDTHS[n.rpartition(".")[2]](self)) for n in self.arch.linears]

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Indices into ``linears()`` of the linears reading the same input (one Hessian, copied)."""
        index = {n: k for k, n in enumerate(self.arch.linears)}
        return tuple(tuple(index[n] for n in g) for g in self.arch.groups)

    @property
    def block_weights(self) -> int:
        return sum(i * o for _, i, o in self.linears())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and norms: what stays in the model's dtype."""
        norms = len(self.arch.norms) * self.layers + 1
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_weights + self.other_params


# Public configs (Hugging Face config.json of each model): the docs' table and Hub ids without a local config.
BUILTIN: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-70b-hf": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def find_config(name: str) -> tuple[dict | None, str]:
    """(config dict, where it came from), or (None, why not) — without loading weights or touching the network."""
    cache = Path(os.environ.get("GIFT_QUANT_CACHE") or Path.home() / ".cache" / "gift_quant")
    local = cache / "smollm2-135m" if name.lower() == "smollm2-135m" else Path(name).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text()), str(local / "config.json")
    key = name.lower().removesuffix("-chat-hf").removesuffix("-hf")
    for known, cfg in BUILTIN.items():
        if known.lower().removesuffix("-hf") == key:
            return cfg, f"built-in public config of {known}"
    if name.endswith(".gguf") or local.exists():
        return None, f"no config.json for {name}"
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=True).to_dict(), "transformers' offline cache"
    except (OSError, ValueError, ImportError):
        return None, f"no config for {name} on this machine (offline)"


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Rates:
    """Sustained speeds the time estimates divide by."""

    matmul: float  # FLOP/s in large matrix products
    column: float  # seconds per column of GPTQ's sequential loop (launches / interpreter, not FLOPs)
    weight_pass: float  # seconds per weight of one elementwise pass (grid search, noise draw, dequantization)
    base: float  # bytes a process holds before any tensor (CPU: the Python runtime and libraries)


# CPU: one thread of this project's 2-core machine, measured on SmolLM2 (docs/scaling.md): the matmul rate from an
# evaluation, the column cost from the quantize stage, the pass from `w * 2.0`, the base from the process's RSS
# after loading (Python, torch, transformers, tokenizer, texts) minus the model. CUDA: assumed for an 80 GB
# A100/H100-class GPU in bf16 (not measured here): 40 % of ~300 TFLOP/s, ~100 µs of launches per GPTQ column,
# elementwise passes over float32 at ~2 TB/s.
CPU_RATES = Rates(matmul=8.4e10, column=2.6e-3, weight_pass=4.2e-10, base=0.63 * GB)
CUDA_RATES = Rates(matmul=1.2e14, column=1.0e-4, weight_pass=5.0e-12, base=0.0)


@dataclass
class StageEstimate:
    stage: str
    peak: float  # bytes on the compute device at the stage's worst moment
    host: float  # bytes in host memory meanwhile (equal to peak on a CPU run)
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Context:
    """The recipe's walk through the stages: the model's form so far and the settings stages read."""

    shape: Shape
    dtype_bytes: int
    cuda: bool
    select: SelectConfig | None = None
    bits: int = 4
    group_size: int = -1
    sym: bool = True
    form: str = "fp"  # fp | dense (quantized, codes + dense Ŵ) | packed

    @property
    def rates(self) -> Rates:
        return CUDA_RATES if self.cuda else CPU_RATES

    @property
    def act_bytes(self) -> int:
        return 2 if self.cuda else self.dtype_bytes  # bf16 autocast on CUDA


# ---------------------------------------------------------------- sizes


def salient(ctx: Context, name: str, in_features: int) -> int:
    """Salient columns of one linear: the select stage's count or fraction, or the first matching override."""
    cfg = ctx.select
    if cfg is None:
        return 0
    value = next((v for p, v in cfg.overrides.items() if re.search(p, f"model.layers.0.{name}")), None)
    if value is None:
        value = cfg.count if cfg.count is not None else (cfg.fraction or 0.0)
        return min(in_features, round(value * in_features)) if cfg.count is None else int(value)
    return int(value) if value >= 1 else min(in_features, round(value * in_features))


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one output row's codes in the GPTQ packing (blocks of whole int32 words)."""
    words = math.lcm(bits, 32) // 32
    codes = words * 32 // bits
    return -(-in_features // codes) * words * 4


def linear_bytes(ctx: Context, name: str, i: int, o: int, form: str) -> float:
    """One quantized linear as the model holds it: codes (+ dense Ŵ) or packed codes, grid, salient columns."""
    k = salient(ctx, name, i)
    groups = 1 if ctx.group_size == -1 else i // ctx.group_size
    small = 3 * o * groups * 4 + i * 4 + k * 8 + o * k * ctx.dtype_bytes  # scales, zeros, noise ratio; g_idx; S
    if form == "packed":
        return o * packed_row_bytes(i, ctx.bits) + small
    return o * i * (1 + ctx.dtype_bytes) + small


def model_bytes(ctx: Context, form: str | None = None) -> float:
    form = form or ctx.form
    s = ctx.shape
    other = s.other_params * ctx.dtype_bytes
    if form == "fp":
        return s.layers * s.block_weights * ctx.dtype_bytes + other
    return s.layers * sum(linear_bytes(ctx, n, i, o, form) for n, i, o in s.linears()) + other


def forward_flops(s: Shape, seq_len: int) -> float:
    """FLOPs of one token's forward: the linears, lm_head and causal attention (mean context seq_len/2)."""
    return 2 * (s.layers * s.block_weights + s.vocab * s.hidden) + 2 * s.layers * seq_len * s.heads * s.head_dim


def saved_per_token(ctx: Context, method: str, train_scales: bool = False, lora_rank: int = 0) -> float:
    """Bytes autograd keeps per token and layer (measured on Llama blocks, tests/test_estimate.py): the norms' inputs,
    q and attention's output, k and v at their own width, the MLP's three intermediate tensors; the salient input
    columns when they train; the linears' inputs when their weights, scales or adapters need them (q/k/v share
    one, o's is attention's output already kept); LoRA's rank-r intermediates."""
    s = ctx.shape
    elements = 4 * s.hidden + 3 * s.intermediate + 2 * s.kv_heads * s.head_dim
    spec = METHOD_SPECS[method]
    if spec.salient:
        elements += sum(salient(ctx, n, i) for n, i, _ in s.linears())
    if scales_train(method, train_scales) or spec.latent or spec.adapters:
        elements += 2 * s.hidden + s.intermediate
    return (elements + len(s.linears()) * lora_rank) * ctx.act_bytes


def largest_linear(s: Shape) -> int:
    return max(i * o for _, i, o in s.linears())


# Per-weight costs, in elementwise passes (Rates.weight_pass: one `w * 2.0` over float32) and bytes, measured on
# SmolLM2's largest linear (`python tools/check_estimate.py --kernels`, docs/scaling.md): a Gaussian draw with its
# scaling; unpacking and dequantizing packed codes (3-bit codes straddle int32 words and are unpacked through int64,
# hence the larger workspace); one point of the MSE grid search for the scales.
NOISE_PASSES = 17.0
DEQUANT_PASSES = {2: 11.0, 3: 50.0, 4: 15.0, 8: 15.0}
DEQUANT_BYTES = {2: 8, 3: 33, 4: 8, 8: 8}
GRID_PASSES = 13.0
WIKITEXT2_TOKENS = 340_000  # an evaluation of the whole WikiText-2 test set (Llama-2 tokenizer: 166 × 2048)
CALIBRATION_FORWARDS = 2.5  # layer forwards per layer in quantize: partial ones per true-sequential group + the last


def _eval_tokens(cfg) -> int:
    windows = cfg.max_windows or WIKITEXT2_TOKENS // cfg.seq_len
    return windows * cfg.seq_len


def _transient(ctx: Context, form: str, noisy: bool) -> float:
    """The largest linear's short-lived out × in tensors: its dequantized Ŵ (packed) or its noise."""
    n, grouped = largest_linear(ctx.shape), ctx.group_size != -1  # per-group σ is gathered to every weight
    return n * (DEQUANT_BYTES[ctx.bits] if form == "packed" else 0) + n * (ctx.dtype_bytes + 4 * grouped) * noisy


def _weight_passes(ctx: Context, form: str, noisy: bool) -> float:
    """Seconds of elementwise passes over every quantized weight in one forward (backward repeats them)."""
    passes = (DEQUANT_PASSES[ctx.bits] if form == "packed" else 0) + (NOISE_PASSES if noisy else 0)
    return passes * ctx.shape.layers * ctx.shape.block_weights * ctx.rates.weight_pass


def _with_host(ctx: Context, stage: str, device: dict[str, float], host: dict[str, float], seconds: float,
               note: str = "") -> StageEstimate:
    """A CPU run holds both in one memory; a GPU run keeps ``host`` in the machine's RAM."""
    if not ctx.cuda:
        device = {**host, **device, "runtime": ctx.rates.base}
    return StageEstimate(stage, sum(device.values()), sum(host.values()) + ctx.rates.base, seconds, device, note)


def eval_logits(tokens: int, vocab: int, dtype_bytes: int, batch: int) -> float:
    """The logits, their float32 copy for the loss (none in float32 at batch 1, where dropping the last position
    leaves them contiguous) and cross-entropy's log-softmax."""
    copy = 4 if dtype_bytes != 4 or batch > 1 else 0
    return tokens * vocab * (dtype_bytes + copy + 4)


def _forward_seconds(ctx: Context, tokens: int, seq_len: int) -> float:
    """A perplexity measurement: one forward over ``tokens`` in windows of ``seq_len``."""
    return tokens * forward_flops(ctx.shape, seq_len) / ctx.rates.matmul + tokens / seq_len * _weight_passes(
        ctx, ctx.form, False)


def evaluate(ctx: Context, cfg) -> StageEstimate:
    s, t = ctx.shape, cfg.batch_size * cfg.seq_len
    device = {"model": model_bytes(ctx), "logits and loss": eval_logits(t, s.vocab, ctx.dtype_bytes, cfg.batch_size),
              "transient": _transient(ctx, ctx.form, False)}
    tokens = _eval_tokens(cfg)
    return _with_host(ctx, "evaluate", device, {}, _forward_seconds(ctx, tokens, cfg.seq_len), f"{tokens:,} tokens")


def quantize(ctx: Context, cfg, calib) -> StageEstimate:
    s, b = ctx.shape, ctx.dtype_bytes
    n, seq, batch = calib.num_samples, calib.seq_len, calib.batch_size
    lin = s.linears()
    # A group's float32 Hessians (one accumulated, copied for each other linear) + GPTQ's four in × in working copies
    # (permuted, damped, Cholesky, inverse) + its float32 weight, permuted weight and two code matrices.
    hessian = max((len(g) + 4) * lin[g[0]][1] ** 2 * 4 + max(lin[j][1] * lin[j][2] for j in g) * 10 for g in s.groups)
    # Collecting them: one batch of windows through the layer, and the float32 input copies the accumulation makes.
    forward = batch * seq * ((3 * s.intermediate + 4 * s.hidden) * b + 2 * max(i for _, i, _ in lin) * 4)
    ctx.bits, ctx.group_size, ctx.sym = cfg.bits, cfg.group_size, cfg.sym
    # The layer's quantized linears, and the full-precision weight of the one being replaced.
    layer = sum(linear_bytes(ctx, name, i, o, "dense") for name, i, o in lin) + largest_linear(s) * b
    device = {"calibration activations": 2 * n * seq * (s.hidden + 2 * s.head_dim) * b,  # + rotary cos/sin
              "one layer": layer, "Hessians and GPTQ (one group)": max(hessian, forward)}
    host = {"model": model_bytes(ctx, "dense")}
    if not ctx.cuda:
        device.pop("one layer")  # part of the model
    seconds = s.layers * (_quantize_flops(s, n * seq) / ctx.rates.matmul + _gptq_loop(ctx, cfg.mse, cfg.grid))
    ctx.form = "dense"
    return _with_host(ctx, "quantize", device, host, seconds, f"{n} × {seq} calibration tokens, layer by layer")


def _quantize_flops(s: Shape, tokens: int) -> float:
    """One layer: its calibration forwards, the Hessian accumulations (one per input) and GPTQ's updates and
    factorisations (out·in² and ~2·in³ per linear)."""
    lin = s.linears()
    forwards = CALIBRATION_FORWARDS * 2 * s.block_weights * tokens
    hessians = sum(2 * lin[g[0]][1] ** 2 * tokens for g in s.groups)
    gptq = sum(2 * o * i * i + 2 * i**3 for _, i, o in lin)
    return forwards + hessians + gptq


def _gptq_loop(ctx: Context, mse: bool, grid: int) -> float:
    """One layer: GPTQ's column-by-column loop and, with ``mse``, the grid search for the scales."""
    lin = ctx.shape.linears()
    columns = sum(i for _, i, _ in lin) * ctx.rates.column
    search = grid * GRID_PASSES * ctx.shape.block_weights * ctx.rates.weight_pass if mse else 0.0
    return columns + search


def trainable_count(ctx: Context, cfg) -> int:
    """Trainable tensors of ``cfg.method`` (a recover or reconstruct config) over the whole model."""
    s, groups = ctx.shape, lambda i: 1 if ctx.group_size == -1 else i // ctx.group_size  # noqa: E731
    spec = METHOD_SPECS[cfg.method]
    steps = s.layers * sum(o * groups(i) for _, i, o in s.linears())
    grid = steps * (1 if ctx.sym or not spec.zero_points else 2)  # the step sizes, and the zero points when trained
    scales = grid if scales_train(cfg.method, cfg.train_scales) else 0
    salient_cols = s.layers * sum(o * salient(ctx, n, i) for n, i, o in s.linears())
    if spec.salient:
        return salient_cols + scales
    if spec.latent:  # every weight; STE's salient columns are among them, block_ap keeps them apart
        return s.layers * s.block_weights + scales
    if spec.adapters:
        per_rank = s.layers * sum(i + o for _, i, o in s.linears())
        return (cfg.lora_rank or max(1, round(salient_cols / per_rank))) * per_rank
    return scales


def training_parts(ctx: Context, cfg: RecoverConfig, tokens: int) -> tuple[dict[str, float], str]:
    """The device's parts while ``cfg`` trains on ``tokens`` per micro-batch; and the frozen part's form."""
    s = ctx.shape
    spec = METHOD_SPECS[cfg.method]
    form = "packed" if cfg.frozen == "packed" and spec.packable else ctx.form
    param = 4 if ctx.cuda and ctx.dtype_bytes != 4 else ctx.dtype_bytes  # float32 master copies under autocast
    n = trainable_count(ctx, cfg)
    latent = spec.latent
    rank = n // (s.layers * sum(i + o for _, i, o in s.linears())) if spec.adapters else 0
    saved = saved_per_token(ctx, cfg.method, cfg.train_scales, rank)
    activations = s.layers * (tokens * saved + s.block_weights * spec.latent_bytes)
    if cfg.gradient_checkpointing:
        activations = s.layers * tokens * s.hidden * ctx.act_bytes + activations / s.layers
    frozen = model_bytes(ctx, form) - (s.layers * s.block_weights * ctx.dtype_bytes if latent else 0)
    parts = {"frozen model": frozen, "trainable, gradients, AdamW": n * param * 4,
             "saved activations": activations,
             "logits and loss": tokens * s.vocab * (ctx.act_bytes + 8 + (4 if cfg.distils else 0)),
             "transient": _transient(ctx, form, spec.noise and cfg.noise != "none")}
    return parts, form


def _curve_seconds(ctx: Context, cfg: RecoverConfig, steps: int | None) -> float:
    """The perplexity curve during training: at the start, every eval_steps, and at each eval_minutes mark."""
    if cfg.eval_steps is None and not cfg.eval_minutes:
        return 0.0
    points = 1 + len(cfg.eval_minutes) + (steps // cfg.eval_steps if cfg.eval_steps and steps else 0)
    return points * _forward_seconds(ctx, cfg.eval_windows * cfg.eval_seq_len, cfg.eval_seq_len)


def recover(ctx: Context, cfg: RecoverConfig, stage: str = "recover", teacher_time: bool = True) -> StageEstimate:
    """``teacher_time``: whether the teacher's pass counts in this stage's time (compare runs it once for all its
    methods); its memory counts either way."""
    s, tokens = ctx.shape, cfg.batch_size * cfg.seq_len
    parts, form = training_parts(ctx, cfg, tokens)
    spec = METHOD_SPECS[cfg.method]
    noisy = spec.noise and cfg.noise != "none"
    backward = 2 if spec.latent or spec.adapters else 1  # frozen weights: the input gradient only
    per_micro = tokens * (1 + backward) * forward_flops(s, cfg.seq_len) / ctx.rates.matmul
    per_micro += 2 * _weight_passes(ctx, form, noisy) + (per_micro / 3 if cfg.gradient_checkpointing else 0)
    steps = step_budget(cfg)
    seconds = steps * cfg.gradient_accumulation_steps * per_micro if steps else 60 * (cfg.max_minutes or 0)
    if noisy and cfg.noise_bits:  # set_noise's MSE grid at noise_bits for every linear, once
        seconds += 100 * GRID_PASSES * s.layers * s.block_weights * ctx.rates.weight_pass
    seconds += _curve_seconds(ctx, cfg, steps)
    host = {}
    if cfg.distils:  # the teacher's one pass over the training text (before training, or step by step)
        during, teacher_seconds = _teacher_pass(ctx, cfg, steps)
        seconds += teacher_seconds if teacher_time else 0.0
        fp = model_bytes(ctx, "fp")
        if cfg.kd_top_k is None:  # the full vocabulary: the teacher runs beside the student at every step
            parts = {**parts, **teacher_parts(ctx, cfg, live=True)}
            if "fp teacher" not in parts:  # layered: it waits in host memory
                host["fp teacher"] = fp
        elif ctx.cuda:  # it lives in host RAM and visits the GPU, beside the quantized model, for its pass
            host["fp teacher"] = fp
            if sum(during.values()) > sum(parts.values()):
                parts = during
        else:  # it stays in the process's memory while the student trains
            parts = {**parts, "fp teacher": fp}
    ctx.form = form
    note = f"{cfg.method}, frozen part {form}, {trainable_count(ctx, cfg):,} trainable"
    return _with_host(ctx, stage, parts, host, seconds, note)


def _teacher_pass(ctx: Context, cfg: RecoverConfig, steps: int | None) -> tuple[dict[str, float], float]:
    """The device's parts during the teacher's pass, and its seconds (one forward over every training token, and
    the layer-by-layer passes' copies of the weights to the device)."""
    windows = (steps or 0) * sequences_per_step(cfg)
    parts = {"frozen model": model_bytes(ctx, _student_form(ctx, cfg)),  # packed before the pass
             **teacher_parts(ctx, cfg, live=False, windows=windows)}
    seconds = windows * cfg.seq_len * forward_flops(ctx.shape, cfg.seq_len) / ctx.rates.matmul
    return parts, seconds + teacher_copy_seconds(ctx, cfg, windows, live=cfg.kd_top_k is None)


# ---------------------------------------------------------------- the teacher's placement (teacher.py, layered.py)

HOST_TO_DEVICE = 16e9  # bytes/s of host-to-GPU copies (assumed: PCIe 4.0 x16 from pageable memory)
PASS_SHARE, LIVE_SHARE = 0.9, 0.5  # as teacher.py: the teacher's most share of what the student leaves, if resident


def _student_form(ctx: Context, cfg: RecoverConfig) -> str:
    return "packed" if cfg.frozen == "packed" and METHOD_SPECS[cfg.method].packable else ctx.form


def teacher_placement(ctx: Context, cfg: RecoverConfig, live: bool) -> str:
    """``cfg.teacher`` as ``teacher.placement`` resolves ``auto``, against an 80 GB GPU holding the student."""
    if cfg.teacher != "auto":
        return cfg.teacher
    left = GPU_MEMORY - model_bytes(ctx, _student_form(ctx, cfg))
    fits = model_bytes(ctx, "fp") <= (LIVE_SHARE if live else PASS_SHARE) * left
    return "layered" if ctx.cuda and not fits else "resident"


def teacher_parts(ctx: Context, cfg: RecoverConfig, live: bool, windows: int = 0) -> dict[str, float]:
    """The teacher's parts on the device: the whole model, or (layered) the largest of one decoder layer and the
    embeddings + head, the hidden states of the pass's windows (inputs and outputs of a layer); either way one
    forward's intermediates inside a layer and the logits: one window's for the cached top-k (with their float
    copies), the micro-batch's for the full-vocabulary loss (measured: tools/measure_teacher.py)."""
    s, b = ctx.shape, ctx.dtype_bytes
    tokens = (cfg.batch_size if live else 1) * cfg.seq_len
    logits = ({"teacher logits": tokens * s.vocab * 8} if live
              else {"logits and loss": eval_logits(cfg.seq_len, s.vocab, b, 1)})
    logits["teacher forward"] = tokens * (3 * s.intermediate + 4 * s.hidden) * b  # as quantize's layer forward
    if teacher_placement(ctx, cfg, live) == "resident":
        return {"fp teacher": model_bytes(ctx, "fp"), **logits}
    outer = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden
    held = cfg.batch_size if live else min(cfg.teacher_windows, max(windows, 1))
    return {"teacher layer (layered)": max(s.block_weights, outer) * b,
            "teacher activations (layered)": 2 * held * cfg.seq_len * (s.hidden + 2 * s.head_dim) * b, **logits}


def teacher_copy_seconds(ctx: Context, cfg: RecoverConfig, windows: int, live: bool = False) -> float:
    """Seconds of copying the weights to the GPU: once per ``teacher_windows`` windows of the cached pass, or once
    per micro-batch for the full-vocabulary loss; none when the teacher is resident or the device is the CPU."""
    if not ctx.cuda or teacher_placement(ctx, cfg, live) == "resident":
        return 0.0
    passes = windows / cfg.batch_size if live else -(-windows // cfg.teacher_windows)
    return passes * model_bytes(ctx, "fp") / HOST_TO_DEVICE


def compare(ctx: Context, cfg) -> StageEstimate:
    from .config import entry_method, method_config

    start = ctx.form
    trained = [m for m in cfg.methods if not METHOD_SPECS[entry_method(cfg, m)].trains_nothing]
    runs = []
    for method in trained or cfg.methods[:1]:  # `none` trains nothing: its row is the starting perplexity
        ctx.form = start
        runs.append(recover(ctx, method_config(cfg, method, cfg.learning_rate, cfg.seeds[0]), "compare",
                            teacher_time=False))
    ctx.form = start
    first = method_config(cfg, cfg.methods[0], cfg.learning_rate, cfg.seeds[0])
    # one teacher pass, shared by every method and seed
    teacher_seconds = _teacher_pass(ctx, first, step_budget(first))[1] if cfg.distils else 0.0
    worst = max(runs, key=lambda r: r.peak)
    device = {**worst.parts, "the quantized model copies start from": model_bytes(ctx)}
    device.pop("runtime", None)
    # every seed's full run, plus the lr sweep's shortened runs (first seed, the longest sweep with its extensions
    # past an edge: an upper bound) for each method; after each run its perplexity: on the final windows, or for a
    # sweep run on the held-out training text
    repeats = len(cfg.seeds) + cfg.most_sweep_runs * cfg.sweep_fraction
    final = _forward_seconds(ctx, (cfg.final_windows or WIKITEXT2_TOKENS // cfg.final_seq_len) * cfg.final_seq_len,
                             cfg.final_seq_len)
    heldout = _forward_seconds(ctx, cfg.heldout_windows * cfg.seq_len, cfg.seq_len) if cfg.sweeping else 0.0
    seconds = (repeats * sum(r.seconds for r in runs) if trained else 0.0) + teacher_seconds
    seconds += len(trained) * (len(cfg.seeds) * final + cfg.most_sweep_runs * heldout)
    host = {"the quantized model copies start from": device.pop("the quantized model copies start from")} \
        if ctx.cuda else {}
    if ctx.cuda and cfg.distils:
        host["fp teacher"] = model_bytes(ctx, "fp")
    return _with_host(ctx, "compare", device, host, seconds, f"{len(cfg.methods)} methods × {len(cfg.seeds)} seeds")


def reconstruct(ctx: Context, cfg, calib) -> StageEstimate:
    s, b = ctx.shape, ctx.dtype_bytes
    n, seq = cfg.num_samples or calib.num_samples, calib.seq_len
    form = "packed" if cfg.frozen == "packed" else ctx.form
    block = sum(linear_bytes(ctx, name, i, o, form) for name, i, o in s.linears())
    n_train = trainable_count(ctx, cfg) // s.layers
    device = {"three streams of calibration activations": 3 * n * seq * s.hidden * b,
              "student and teacher block": block + s.block_weights * b, "trainable, gradients, AdamW": n_train * 16,
              "saved activations": cfg.batch_size * seq * saved_per_token(ctx, cfg.method, cfg.train_scales),
              "transient": _transient(ctx, form, METHOD_SPECS[cfg.method].noise)}
    host = {"model": model_bytes(ctx, form), "teacher (full precision)": model_bytes(ctx, "fp")}
    if not ctx.cuda:
        device.pop("student and teacher block")
    if cfg.epochs:
        steps = cfg.epochs * math.ceil(n / cfg.batch_size)
        per_step = cfg.batch_size * seq * 3 * 2 * s.block_weights / ctx.rates.matmul
        seconds = s.layers * (steps * per_step + 3 * n * seq * 2 * s.block_weights / ctx.rates.matmul)
    else:  # epochs: null trains until the clock ends the stage
        seconds = math.inf
    if cfg.max_minutes:  # it bounds the whole stage (targets and checks included)
        seconds = min(seconds, 60 * cfg.max_minutes)
    ctx.form = form
    return _with_host(ctx, "reconstruct", device, host, seconds, f"{cfg.passes} per block")


def export(ctx: Context, cfg, last_eval) -> StageEstimate:
    s = ctx.shape
    packed = ctx.shape.layers * sum(o * packed_row_bytes(i, ctx.bits) for _, i, o in s.linears())
    out = packed + s.other_params * 2 if cfg.format == "packed" else s.params * 2
    host = {"model": model_bytes(ctx), "checkpoint tensors": out}
    device, seconds = {}, 0.0
    if cfg.verify is not None:
        verify_bytes = {"float32": 4}.get(cfg.verify, 2)
        reloaded = packed + s.other_params * verify_bytes if cfg.format == "packed" else s.params * verify_bytes
        t = last_eval.batch_size * last_eval.seq_len
        device = {"reloaded model": reloaded,
                  "logits and loss": eval_logits(t, s.vocab, verify_bytes, last_eval.batch_size),
                  "transient": largest_linear(s) * DEQUANT_BYTES[ctx.bits]}
        tokens = _eval_tokens(last_eval)
        seconds = tokens * forward_flops(s, last_eval.seq_len) / ctx.rates.matmul
        seconds += tokens / t * _weight_passes(ctx, "packed" if cfg.format == "packed" else "fp", False)
    return _with_host(ctx, "export", device, host, seconds, f"{cfg.format} checkpoint {out / GB:.1f} GB")


def estimate(recipe: Recipe, shape: Shape) -> list[StageEstimate]:
    """Every stage of ``recipe`` in order, the model's form carried from one to the next."""
    from .config import CalibrateConfig, EvaluateConfig

    cuda = recipe.model.device.startswith("cuda") or recipe.model.device == "auto"
    ctx = Context(shape, 4 if recipe.model.dtype == "float32" else 2, cuda)
    calib, last_eval, out = CalibrateConfig(), EvaluateConfig(), []
    for stage in recipe.stages:
        cfg = stage.config
        if stage.name == "calibrate":
            calib = cfg
        elif stage.name == "select":
            ctx.select = cfg
        elif stage.name == "evaluate":
            last_eval = cfg
        rows = {"evaluate": lambda: evaluate(ctx, cfg), "quantize": lambda: quantize(ctx, cfg, calib),
                "recover": lambda: recover(ctx, cfg), "compare": lambda: compare(ctx, cfg),
                "reconstruct": lambda: reconstruct(ctx, cfg, calib), "export": lambda: export(ctx, cfg, last_eval)}
        row = rows.get(stage.name, lambda: _with_host(ctx, stage.name, {}, {"model": model_bytes(ctx)}, 0.0))()
        out.append(row)
    return out


def render(rows: list[StageEstimate], cuda: bool) -> str:
    where = "GPU" if cuda else "process (CPU)"
    lines = [f"| stage | peak {where} | {'host RAM | ' if cuda else ''}time | largest parts |",
             f"|---|---:|{'---:|' if cuda else ''}---:|---|"]
    for r in rows:
        big = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(r.parts.items(), key=lambda kv: -kv[1])[:3] if v)
        flag = " (over 80 GB)" if cuda and r.peak > GPU_MEMORY else ""
        host = (f"{r.host / GB:.1f} GB | " if r.host else "— | ") if cuda else ""
        lines.append(f"| {r.stage} | {r.peak / GB:.2f} GB{flag} | {host}{_duration(r.seconds)} | {big} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def report(recipe: Recipe) -> str:
    """What ``--dry-run`` prints after the plan: the table, or why there is none."""
    config, source = find_config(recipe.model.name)
    if config is None:
        return f"memory and time estimate: unavailable ({source})"
    try:
        shape = Shape.from_config(config)
    except KeyError as missing:
        return f"memory and time estimate: unavailable (the config has no {missing})"
    cuda = recipe.model.device.startswith("cuda") or recipe.model.device == "auto"
    head = (f"memory and time estimate (from {source}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers; "
            f"{'one GPU, assumed A100/H100-class rates' if cuda else 'one CPU thread, rates measured on SmolLM2'}):")
    return head + "\n" + render(estimate(recipe, shape), cuda)


MAX_STAGE_DAYS = 30  # no recipe of ours comes near (Llama-2 compare: 7 h); beyond this a setting is out of proportion


def check_bounds(recipe: Recipe, config: dict | None = None) -> None:
    """Refuse (UserError, with the estimate) a recipe one of whose stages would run for more than MAX_STAGE_DAYS:
    a typo'd max_steps or grid, not a plan. ``config``: the model's config (else looked up as --dry-run does);
    without one nothing is checked here (preflight checks again with the loaded model's)."""
    from .errors import UserError

    if config is None:
        config, _ = find_config(recipe.model.name)
    try:
        shape = Shape.from_config(config) if config is not None else None
    except (KeyError, TypeError, ValueError):
        shape = None
    if shape is None:
        return
    cuda = recipe.model.device.startswith("cuda") or recipe.model.device == "auto"
    for i, row in enumerate(estimate(recipe, shape)):
        days = row.seconds / 86400
        if days > MAX_STAGE_DAYS:
            where = "one GPU" if cuda else "one CPU thread"
            raise UserError(f"stages.{i}.{row.stage}: estimated at {days:.3g} days on {where} (more than "
                            f"{MAX_STAGE_DAYS}); check its budget and sizes (max_steps, max_tokens, num_samples, grid, "
                            f"seeds) — --dry-run shows every stage's estimate")
