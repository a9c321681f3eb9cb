"""Stage `reconstruct`: block-wise reconstruction of the quantized model from the full-precision one.

For each decoder block in order, the full-precision block (the teacher's, in the run's rotated basis if any) maps the
full-precision stream ``X_fp`` to targets ``Y``; the quantized block's trainable tensors (the recovery method's: salient
columns, + scales with ``train_scales``, + its norms with ``train_norms``; with ``block_ap`` every weight through the
quantizer, EfficientQAT's Block-AP) learn ``block_q(X_q) ≈ Y`` by MSE, under GIFT-SW's noise when the method has it.
Then ``X_q ← block_q(X_q)`` with the trained block and ``X_fp ← Y``, so each block also learns to undo the error the
quantized blocks before it left (``inputs: fp`` trains on ``X_fp`` instead). One decoder block forward/backward per
step instead of the whole model and its vocabulary-wide softmax makes many more token passes affordable.

Both streams of the calibration windows are held at once (one block's activations each); only the current block sits
on the compute device; each finished block's result (its quantized linears' codes, grid and salient columns, and its
norms) is saved under ``reconstruct/`` with the run's fingerprint, so a rerun resumes after the last finished block.
The log gives each block's output MSE before and after, and the share of its codes that changed.
"""

from __future__ import annotations

import itertools
import logging
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import block_norm_weights, decoder_layers
from .calibrate import Chunk, capture_layer0_inputs, run_layer
from .data import calibration_windows, load_documents
from .checkpoints import ResultStore
from .config import ReconstructConfig
from .distributed import is_main
from .fingerprint import fingerprint
from .io_utils import write_csv
from .layers import mixed_linears, pack_frozen
from .method_specs import scales_train
from .methods import METHODS, make_trainable
from .models import check_finite
from .teacher import teacher_model
from .budget import BudgetClock, StageBudget, budget_spent, cosine_by_progress
from .training import SCALE_SUFFIXES, param_groups

log = logging.getLogger(__name__)

LOG_FIELDS = ["layer", "trainable", "mse_start", "mse_end", "heldout_mse_start", "heldout_mse_end", "codes_changed",
              "reverted", "steps", "seconds", "cpu_seconds"]


def _optimizer(block: nn.Module, cfg: ReconstructConfig) -> torch.optim.Optimizer:
    """AdamW with one rate per kind of tensor: grid (scales, zero points), latent codes (code units), the rest."""
    rates = {SCALE_SUFFIXES: cfg.scales_learning_rate or cfg.learning_rate, ".latent": cfg.codes_learning_rate}
    return torch.optim.AdamW(param_groups(block, cfg.learning_rate, rates), lr=cfg.learning_rate, weight_decay=0.0)


def _mse(block: nn.Module, inputs: list[Chunk], targets: list[Chunk]) -> float | None:
    if not targets:
        return None
    with torch.no_grad():
        total = sum(F.mse_loss(out.hidden, t.hidden, reduction="sum").item()
                    for out, t in zip(run_layer(block, inputs), targets))
    return total / sum(t.hidden.numel() for t in targets)


def train_block(block: nn.Module, inputs: list[Chunk], targets: list[Chunk], cfg: ReconstructConfig,
                seconds: float | None, seed: int, progress: tqdm, channel_weight: torch.Tensor | None = None) -> int:
    """Train the block's trainable tensors so that block(inputs) ≈ targets (MSE, each hidden channel's squared error
    times ``channel_weight`` when given: tools/probe_reconstruct.py) for ``cfg.epochs`` or until ``seconds`` pass on
    the budget's clock (``cfg.epochs`` None: only the clock ends it); returns the steps taken (none when ``seconds``
    is 0)."""
    if seconds is not None and seconds <= 0:
        return 0
    if seconds is None and not cfg.epochs:  # neither epochs nor a clock would end it (tools/probe_reconstruct.py)
        raise ValueError("epochs: null trains until a time budget ends it; none was given")
    optimizer = _optimizer(block, cfg)
    total = cfg.epochs * len(inputs) if cfg.epochs else None
    clock, steps = BudgetClock(cfg.budget_clock), 0
    spent = budget_spent(clock, seconds / 60 if seconds else None, total)  # the cosine ends with the budget
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_by_progress(0.0, spent))
    order = random.Random(seed)
    torch.manual_seed(seed)  # the noise draws of this block
    block.train()
    clock.start()
    for _ in range(cfg.epochs) if cfg.epochs else itertools.count():
        for i in order.sample(range(len(inputs)), len(inputs)):
            out = block(inputs[i].hidden, **inputs[i].kwargs)
            out, target = (out[0] if isinstance(out, tuple) else out).float(), targets[i].hidden.float()
            loss = F.mse_loss(out, target) if channel_weight is None else ((out - target) ** 2 * channel_weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            progress.set_postfix(block_step=steps, mse=f"{loss.item():.3g}", refresh=False)
            if seconds is not None and clock.minutes * 60 >= seconds:
                return steps
    return steps


def _result(model: nn.Module, block: nn.Module) -> dict[str, torch.Tensor]:
    """What reconstruction may change in a finished block: its quantized linears' codes, grid and salient columns, and
    its norms (saved per block; a resumed block loads exactly these)."""
    kept = {f"{name}.{t}" for name in mixed_linears(block)
            for t in ("codes", "qcodes", "scales", "zeros", "salient_weight")} | set(block_norm_weights(model, block))
    return {n: t for n, t in block.state_dict(keep_vars=True).items() if n in kept}


def _put(model: nn.Module, block: nn.Module, result: dict[str, torch.Tensor]) -> bool:
    """Copy a :func:`_result` into ``block`` (False when its tensors are not this block's)."""
    current = _result(model, block)
    if result.keys() != current.keys():
        return False
    with torch.no_grad():
        for k, v in result.items():
            current[k].copy_(v)
    for m in mixed_linears(block).values():
        m.refresh()  # the dense Ŵ follows the loaded codes and grid
    return True


def _load_block(store: ResultStore, index: int, model: nn.Module, block: nn.Module) -> dict | None:
    """Put a finished block's saved result into ``block``; its log row, or None to train it (again)."""
    saved = store.load(index)
    return saved[1] if saved is not None and _put(model, block, saved[0]) else None


def _windows(state, cfg: ReconstructConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stage's training windows (the calibrate stage's, or ``num_samples`` drawn the same way, its own first) and
    its ``heldout_windows`` (the sampler's next windows: never trained on; None when 0), from one draw."""
    calib = state.calibration
    conf, n = calib.config, cfg.num_samples or calib.windows.shape[0]
    if n == calib.windows.shape[0] and not cfg.heldout_windows:
        return calib.windows, None
    docs = load_documents(conf, state.recipe.data.dir)
    drawn = calibration_windows(state.tokenizer, docs, n + cfg.heldout_windows, conf.seq_len, conf.seed)
    return drawn[:n], (drawn[n:] if cfg.heldout_windows else None)


def _train_one(model: nn.Module, block: nn.Module, index: int, streams: dict[str, tuple[list[Chunk], list[Chunk]]],
               cfg: ReconstructConfig, device: torch.device, budget: StageBudget, progress: tqdm) -> dict:
    """Train one block in its method's form on ``streams["train"]`` (inputs, targets), end it in evaluation form;
    its log row, with the block MSE on the training and the held-out windows before and after."""
    (inputs, targets), heldout = streams["train"], streams["heldout"]
    start = {k: v.detach().clone() for k, v in _result(model, block).items()} if cfg.revert_worse else None
    trainable = make_trainable(model, block, cfg, device, _dtype(block))
    t0, cpu0 = time.perf_counter(), time.process_time()
    before, heldout_before = _mse(block.eval(), inputs, targets), _mse(block, *heldout)
    share = budget.training_seconds()
    if share == 0:
        log.info("block %d: the stage's time budget is spent; it keeps its start", index)
    steps = train_block(block, inputs, targets, cfg, share, cfg.seed * 100003 + index, progress)
    budget.trained()
    ended = METHODS[cfg.method].finish(block, _dtype(block))
    check_finite(block, f"after reconstructing block {index}, its")
    changed = ended.get("codes_flipped", 0) / max(ended.get("codes_total", 0), 1)
    after = _mse(block, inputs, targets)
    reverted = start is not None and after > before
    if reverted:  # training left the block worse on its own windows: it goes back to how it started
        log.info("block %d: training raised its MSE from %.4g to %.4g; put back as it was", index, before, after)
        _put(model, block, start)
        after, changed = _mse(block, inputs, targets), 0.0
    return {"layer": index, "trainable": trainable, "mse_start": before, "mse_end": after,
            "heldout_mse_start": heldout_before, "heldout_mse_end": _mse(block, *heldout),
            "codes_changed": round(changed, 6), "reverted": int(reverted), "steps": steps,
            "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2)}


def reconstruct_stage(state, cfg: ReconstructConfig) -> None:
    """Stage `reconstruct` (see the module docstring)."""
    model, device = state.model, state.device
    budget = StageBudget(cfg.max_minutes, cfg.budget_clock, len(decoder_layers(model)))  # from here on: all counts
    model.requires_grad_(False)  # only each block's declared tensors train, one block at a time
    if cfg.frozen == "packed":
        pack_frozen(model)
    windows, heldout = _windows(state, cfg)
    stamp = fingerprint(state, {"base": state.quantization.fingerprint,
                                "reconstruct": cfg.model_dump(mode="json",
                                                              exclude={"resume", "frozen", "heldout_windows"})},
                        [windows])
    saved = ResultStore(state.output_dir / "reconstruct", stamp, cfg.resume, prefix="block")
    layers, fp_layers = decoder_layers(model), decoder_layers(teacher_model(state))
    fp_in = {"train": capture_layer0_inputs(model, windows, device, cfg.batch_size),
             "heldout": [] if heldout is None else capture_layer0_inputs(model, heldout, device, cfg.batch_size)}
    # The embeddings are not quantized: both streams start the same.
    quant_in = {k: [Chunk(c.hidden.clone(), c.layer_kwargs, c.index) for c in v] if cfg.inputs == "quantized" else []
                for k, v in fp_in.items()}
    rows, start, cpu_start, resumed_cpu = [], time.perf_counter(), time.process_time(), 0.0
    # One tick per block: with a time budget every block gets an even share of what is left, so the ETA holds.
    with tqdm(total=len(layers), desc=f"reconstruct ({cfg.method})", unit="block") as progress:
        for index, (block, fp_block) in enumerate(zip(layers, fp_layers)):
            budget.start_block()
            home = next(block.parameters()).device
            block.to(device)
            fp_block.to(device)
            with torch.no_grad():
                targets = {k: run_layer(fp_block, v) for k, v in fp_in.items()}
            fp_block.to(home)
            inputs = quant_in if cfg.inputs == "quantized" else fp_in
            row = _load_block(saved, index, model, block)
            resumed = row is not None
            if row is None:
                streams = {k: (inputs[k], targets[k]) for k in targets}
                row = _train_one(model, block, index, streams, cfg, device, budget, progress)
                saved.save(index, _result(model, block), {k: str(v) for k, v in row.items()})
            else:  # its training's CPU time counts as when it ran (a resumed stage reports the whole cost)
                resumed_cpu += float(row.get("cpu_seconds") or 0)
            rows.append(row)
            progress.update(1)
            last = index + 1 == len(layers)
            with torch.no_grad():
                quant_in = {k: run_layer(block.eval(), v) if v and not last else [] for k, v in quant_in.items()}
            fp_in = targets
            block.to(home)
            budget.end_block(resumed=resumed)
    if is_main():
        write_csv(state.output_dir / "reconstruct_log.csv", rows, LOG_FIELDS)
    reduction = [float(r["mse_end"]) / max(float(r["mse_start"]), 1e-30) for r in rows]
    changed = [float(r.get("codes_changed") or 0) for r in rows]
    held = [float(r["heldout_mse_end"]) / max(float(r["heldout_mse_start"]), 1e-30) for r in rows
            if r.get("heldout_mse_start") not in (None, "", "None")]
    state.record("reconstruct", "block_mse_ratio", round(sum(reduction) / len(reduction), 4),
                 heldout_mse_ratio=round(sum(held) / len(held), 4) if held else None,
                 method=cfg.method, seconds=round(time.perf_counter() - start, 1),
                 cpu_seconds=round(time.process_time() - cpu_start + resumed_cpu, 1),
                 trainable_params=sum(int(r["trainable"]) for r in rows),
                 codes_changed=round(sum(changed) / len(changed), 6),
                 blocks_reverted=sum(int(r.get("reverted") or 0) for r in rows),
                 note=f"reconstruct: {cfg.method}{' + scales' if scales_train(cfg.method, cfg.train_scales) else ''}"
                      f"{' + norms' if cfg.train_norms else ''}, {cfg.passes} over "
                      f"{windows.shape[0]} calibration windows per block ({cfg.inputs} inputs); block MSE "
                      f"after/before on them and on {cfg.heldout_windows} held-out windows, and codes changed, per "
                      f"block in reconstruct_log.csv")


def _dtype(block: nn.Module) -> torch.dtype:
    layers = mixed_linears(block)
    return next(iter(layers.values())).dtype if layers else next(block.parameters()).dtype
