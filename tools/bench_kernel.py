"""Per-linear kernel benchmark on one device: the fast path PackedLinear picks there (gptq_cuda on CUDA, int4_cpu on
the CPU) against a dense matmul of the same weight and against the reference path (codes dequantized per call).

    python tools/bench_kernel.py [--device cuda] [--dtype bfloat16] [--shapes 4096x4096,11008x4096] [--rows 1,16,512]

Random 4-bit codes, groups of 128, act-order off, 1/32 salient columns (what the packed export holds). Prints one
line per shape, row count and path: median milliseconds over --repeats and the speed-up over dense. Exit 1 when the
fast path is not used on this device (kernel_used gives the reason) or its output differs from the reference by
more than 2^-5 of max |y|.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gift_quant.packing import PackedLinear  # noqa: E402
from gift_quant.quantized import QuantizedWeight  # noqa: E402

FAST = {"cuda": "gptq_cuda", "cpu": "int4_cpu"}


def linear(out_f: int, in_f: int, dtype: torch.dtype, device: str) -> PackedLinear:
    g = torch.Generator().manual_seed(out_f + in_f)
    n_groups, k = in_f // 128, in_f // 32
    g_idx = torch.arange(in_f) // 128
    zeros = torch.full((out_f, n_groups), 8.0)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    salient = torch.randperm(in_f, generator=g)[:k].sort().values
    codes[:, salient] = 8
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.01 + 0.001).half().float()
    qw = QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), salient,
                         torch.randn(out_f, k, generator=g).half().float() * 0.02, 4, 128, True)
    return PackedLinear.from_quantized(qw, dtype=dtype).to(device)


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of fn() over ``repeats`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shapes", default="4096x4096,11008x4096", help="out x in, comma-separated")
    p.add_argument("--rows", default="1,16,512")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    dtype, device, ok = getattr(torch, args.dtype), args.device, True
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        m = linear(out_f, in_f, dtype, device)
        used = m.prepare()
        if used != FAST.get(device.split(":")[0]):
            print(f"{shape}: fast path not used on {device}: {used}")
            ok = False
            continue
        dense = m.quantized_part(dtype)  # the same weight, dense
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_f, device=device).to(dtype)
            with torch.no_grad():
                y, ref = m(x).float(), F.linear(x, dense).float() + F.linear(
                    x.index_select(-1, m.salient_idx), m.salient_weight.to(dtype)).float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                t_dense = timed(lambda: F.linear(x, dense), device, args.repeats)
                t_fast = timed(lambda: m(x), device, args.repeats)
                m.kernel = "reference"
                t_ref = timed(lambda: m(x), device, args.repeats)
                m.kernel = "auto"
            ok &= err <= 2.0**-5
            print(f"{shape} rows {rows:>4} {args.dtype}: dense {t_dense:8.3f} ms | {used} {t_fast:8.3f} ms "
                  f"({t_dense / t_fast:5.2f}x dense) | reference {t_ref:8.3f} ms | rel. error {err:.1e}")
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
