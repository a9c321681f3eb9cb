"""Probe block-wise reconstruction settings on a few decoder blocks, without running the whole stage (issue #22).

From a run folder whose stages up to ``quantize`` are finished (they resume from its saved layers), each listed
block is trained once per setting, from the same PTQ block, on the full-precision stream (``inputs: fp``), with the
stage's own pieces (method forms, optimizer groups, cosine schedule, finish); the block MSE after/before is reported
on the training windows and on held-out windows (the calibration sampler's next ones, never trained on), with the
share of codes changed and the CPU seconds. A setting is a ReconstructConfig as JSON plus ``n`` (training windows,
the first n of one draw) and optionally ``norm: true`` (MSE weighted per channel by 1 / mean square of the fp
block's output: the massive-activation channels no longer dominate).

    OMP_NUM_THREADS=1 python tools/probe_reconstruct.py RUN_DIR --blocks 1,4 --windows 512 \\
        --setting '{"n": 512, "epochs": 1, "codes_learning_rate": 0.01}' --setting '{"n": 128, ...}' --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_quant import reconstruct as R  # noqa: E402
from gift_quant.architectures import decoder_layers  # noqa: E402
from gift_quant.calibrate import capture_layer0_inputs, run_layer  # noqa: E402
from gift_quant.config import ReconstructConfig  # noqa: E402
from gift_quant.methods import METHODS, make_trainable  # noqa: E402
from gift_quant.pipeline import run_stage  # noqa: E402
from gift_quant.preflight import preflight  # noqa: E402
from gift_quant.recipe import load_recipe  # noqa: E402
from gift_quant.state import RunState  # noqa: E402
from gift_quant.teacher import teacher_model  # noqa: E402


CHUNK = 4  # windows per captured chunk = per training step (the stage's default batch_size)


def quantized_state(run_dir: Path) -> RunState:
    """The run's state after its stages up to quantize (resumed from the folder)."""
    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    state = RunState(recipe=recipe, output_dir=run_dir)
    preflight(state)
    for stage in recipe.stages:
        if stage.name in ("calibrate", "select", "rotate", "quantize"):
            run_stage(state, stage.name, stage.config)
    return state


def channel_weights(targets) -> torch.Tensor:
    square = torch.cat([t.hidden.reshape(-1, t.hidden.shape[-1]) for t in targets]).pow(2).mean(0)
    w = 1.0 / square.clamp_min(square.mean() * 1e-3)
    return w / w.mean()


def probe(state: RunState, block, index: int, streams, setting: dict) -> dict:
    setting = dict(setting)
    n, norm = setting.pop("n"), setting.pop("norm", False)
    cfg = ReconstructConfig(**{"method": "block_ap", **setting})
    (train_in, train_out), heldout = streams
    inputs, targets = train_in[: n // CHUNK], train_out[: n // CHUNK]  # one step per chunk of CHUNK windows
    trial = copy.deepcopy(block)
    make_trainable(state.model, trial, cfg, torch.device("cpu"), torch.float32)
    weight = channel_weights(targets) if norm else None
    cpu = time.process_time()
    start, held_start = R._mse(trial.eval(), inputs, targets), R._mse(trial, *heldout)
    steps = R.train_block(trial, inputs, targets, cfg, None, 7 + index, tqdm(disable=True), weight)
    ended = METHODS[cfg.method].finish(trial, torch.float32)
    return {"block": index, "n": n, "norm": norm, **setting, "steps": steps,
            "train_ratio": R._mse(trial, inputs, targets) / start, "heldout_ratio": R._mse(trial, *heldout) / held_start,
            "codes_changed": ended.get("codes_flipped", 0) / max(ended.get("codes_total", 1), 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--blocks", required=True, help="comma-separated block indices")
    p.add_argument("--windows", type=int, default=512, help="training windows drawn (the largest n)")
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--setting", action="append", required=True, help="JSON: n, norm and ReconstructConfig fields")
    p.add_argument("--out", type=Path, help="JSON lines, one per (block, setting)")
    args = p.parse_args(argv)
    blocks = sorted(int(b) for b in args.blocks.split(","))
    settings = [json.loads(s) for s in args.setting]
    state = quantized_state(args.run_dir)
    state.model.requires_grad_(False)
    windows, held = R._windows(state, ReconstructConfig(num_samples=args.windows, heldout_windows=args.heldout))
    layers, fp_layers = decoder_layers(state.model), decoder_layers(teacher_model(state))
    fp_train = capture_layer0_inputs(state.model, windows, torch.device("cpu"), CHUNK)
    fp_held = capture_layer0_inputs(state.model, held, torch.device("cpu"), CHUNK)
    for index in range(blocks[-1] + 1):
        with torch.no_grad():
            train_out, held_out = run_layer(fp_layers[index], fp_train), run_layer(fp_layers[index], fp_held)
        if index in blocks:
            for setting in settings:
                row = probe(state, layers[index], index, ((fp_train, train_out), (fp_held, held_out)), setting)
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        fp_train, fp_held = train_out, held_out


if __name__ == "__main__":
    main()
