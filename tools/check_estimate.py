"""Run a recipe and put each stage's measured peak memory and CPU time beside ``gift_quant.estimate``'s figures.

Memory is the process's peak RSS while the stage runs (sampled every 20 ms; CPU) or CUDA max allocated (GPU); time is
process CPU seconds (one thread's cost with OMP_NUM_THREADS=1, robust to other jobs). glibc keeps freed memory for
reuse, so on a CPU the RSS can exceed the live tensors by far; ``MALLOC_MMAP_THRESHOLD_=65536`` makes large blocks go
back to the system when freed, and the RSS then follows what the stage really holds.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python tools/check_estimate.py RECIPE.yaml --output-dir DIR

``--kernels`` measures instead the per-weight constants of the estimates on SmolLM2's largest linear (1536 × 576):
the elementwise passes (CPU time over that of one ``w * 2.0``) and peak bytes of a Gaussian noise draw, of the packed
layer's dequantization per bit-width, and of one point of the MSE grid search.

    OMP_NUM_THREADS=1 python tools/check_estimate.py --kernels
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_quant import pipeline  # noqa: E402
from gift_quant.estimate import GB, Shape, estimate, find_config  # noqa: E402
from gift_quant.memory import PeakMemory  # noqa: E402
from gift_quant.recipe import load_recipe  # noqa: E402


def measured_run(recipe, output_dir: Path) -> list[dict]:
    """Run the recipe; per stage, its peak memory (MB) and CPU seconds."""
    rows, plain = [], pipeline.run_stage

    def timed(state, name, config):
        start = time.process_time()
        with PeakMemory(state.device) as mem:
            plain(state, name, config)
        rows.append({"stage": name, "peak_gb": mem.peak_mb * 2**20 / GB, "cpu_s": time.process_time() - start})

    pipeline.run_stage = timed
    try:
        pipeline.run(recipe, output_dir)
    finally:
        pipeline.run_stage = plain
    return rows


def _cpu_seconds(fn, repeat: int = 10) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def _peak_bytes(fn) -> int:
    """Peak bytes of the tensors ``fn`` creates and holds at once (each op's outputs, until they are freed)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    live, held = {"now": 0, "peak": 0}, set()  # storages counted once, however many views of them exist

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))

            def add(t):
                key = t.untyped_storage().data_ptr() if hasattr(t, "untyped_storage") else 0
                if key and key not in held:
                    n = t.untyped_storage().nbytes()
                    held.add(key)
                    live["now"] += n
                    live["peak"] = max(live["peak"], live["now"])
                    weakref.finalize(t, lambda: (held.discard(key), live.update(now=live["now"] - n)))
                return t

            return tree_map(add, out)

    with Track():
        fn()
    return live["peak"]


def kernels() -> str:
    import torch

    from gift_quant.layers import MixedPrecisionLinear, PackedMixedPrecisionLinear
    from gift_quant.noise import draw
    from gift_quant.quantizer import QuantSpec, group_params, rtn

    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    one_pass = _cpu_seconds(lambda: w * 2.0, 200)
    noise = lambda: draw(w.shape, "gaussian", 3, w.device, w.dtype).mul_(0.1)  # noqa: E731
    grid = lambda: group_params(w, QuantSpec(bits=3, mse=True, grid=100), torch.arange(18) * 30)  # noqa: E731
    lines = [f"one pass: {one_pass / w.numel():.2e} s per weight", "| work | passes | peak bytes per weight |",
             "|---|---:|---:|", f"| Gaussian noise draw | {_cpu_seconds(noise) / one_pass:.1f} | "
             f"{_peak_bytes(noise) / w.numel():.1f} |",
             f"| MSE grid search, per grid point | {_cpu_seconds(grid, 5) / one_pass / 100:.1f} | |"]
    for bits in (2, 3, 4, 8):
        dense = MixedPrecisionLinear.from_quantized(rtn(w, QuantSpec(bits=bits), torch.arange(18) * 30))
        packed = PackedMixedPrecisionLinear.from_layer(dense)
        lines.append(f"| dequantize packed {bits}-bit | {_cpu_seconds(packed.frozen_weight, 30) / one_pass:.1f} | "
                     f"{_peak_bytes(packed.frozen_weight) / w.numel():.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", type=Path, nargs="?")
    p.add_argument("--output-dir", type=Path)
    p.add_argument("--json", type=Path, help="also write the measured rows here")
    p.add_argument("--measured", type=Path, help="compare with the rows an earlier run wrote (--json) instead of running")
    p.add_argument("--kernels", action="store_true", help="measure the per-weight constants instead")
    args = p.parse_args()
    if args.kernels:
        print(kernels())
        return
    if args.recipe is None or (args.output_dir is None and args.measured is None):
        p.error("give a recipe and --output-dir or --measured (or --kernels)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    recipe = load_recipe(args.recipe)
    config, _ = find_config(recipe.model.name)
    estimates = estimate(recipe, Shape.from_config(config))
    rows = json.loads(args.measured.read_text()) if args.measured else measured_run(recipe, args.output_dir)
    lines = ["| stage | peak, estimated | peak, measured | error | time, estimated | CPU time, measured | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for est, got in zip(estimates, rows):
        got.update(estimated_gb=est.peak / GB, estimated_s=est.seconds, parts={k: v / GB for k, v in est.parts.items()})
        lines.append(f"| {got['stage']} | {est.peak / GB:.2f} GB | {got['peak_gb']:.2f} GB | "
                     f"{_error(est.peak / GB, got['peak_gb'])} | {est.seconds:.0f} s | {got['cpu_s']:.0f} s | "
                     f"{_error(est.seconds, got['cpu_s'])} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps([{k: r[k] for k in ("stage", "peak_gb", "cpu_s")} for r in rows], indent=2)
                             + "\n")


def _error(estimated: float, measured: float) -> str:
    return f"{round(100 * (estimated - measured) / measured):+d} %" if measured > 0.01 else "—"


if __name__ == "__main__":
    main()
