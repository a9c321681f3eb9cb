"""Check gift_quant's GPU path (gift_quant/gptq_cuda.py) against the reference dequantize path, on any device
gptqmodel supports: the same tensor conversion (v1 layout, zero points repacked to v2) feeds whichever QuantLinear
gptqmodel selects, so on a CPU this checks everything but the CUDA kernel itself.

    python tools/check_gptq_kernel.py [--device cpu|cuda] [--backend auto|torch|...]

Needs gptqmodel (a side environment on a CPU machine: gptqmodel 7.6.0 installs with the CPU torch). Prints one line
per setting (bits, group size, symmetric, salient columns): the kernel class and max |Δ| / max |y|.
Exit codes: 0 all within --rtol (fp16/bf16 kernels), 1 a mismatch, 2 gptqmodel missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_quant import gptq_cuda  # noqa: E402
from gift_quant.packing import PackedLinear  # noqa: E402
from gift_quant.quantizer import QuantSpec, rtn  # noqa: E402

SETTINGS = [(4, 128, True, 0), (4, 32, True, 8), (3, -1, True, 8), (3, 64, False, 8), (2, 64, False, 8),
            (4, 128, False, 0)]


def check(bits: int, group_size: int, sym: bool, k: int, device: str, backend: str, dtype: torch.dtype):
    torch.manual_seed(bits * 1000 + k)
    w = torch.randn(256, 512)
    qw = rtn(w, QuantSpec(bits=bits, group_size=group_size, sym=sym), torch.randperm(512)[:k].sort().values)
    module = PackedLinear.from_quantized(qw, dtype=dtype).to(device)
    qlinear = gptq_cuda.build(module, device, backend)
    x = torch.randn(4, 512, device=device)
    y = gptq_cuda.GptqMatmul(qlinear, dtype)(x).double().cpu()
    want = x.double().cpu() @ qw.quantized_part().double().t()
    return type(qlinear).__name__, ((y - want).abs().max() / want.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--rtol", type=float, default=1e-2)
    args = p.parse_args(argv)
    reason = gptq_cuda.unavailable(args.device)
    if reason is not None:
        print(f"skipped: {reason}")
        return 2
    worst = 0.0
    for bits, group_size, sym, k in SETTINGS:
        name, err = check(bits, group_size, sym, k, args.device, args.backend, getattr(torch, args.dtype))
        worst = max(worst, err)
        print(f"{bits}-bit group {group_size:>4} sym {sym!s:>5} salient {k}: {name:<18} max|Δ|/max|y| = {err:.2e}")
    print("ok" if worst <= args.rtol else f"mismatch: {worst:.2e} > rtol {args.rtol}")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
