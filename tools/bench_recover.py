"""Step time and peak memory of GIFT-SW against STE (QAT) and full fine-tuning, measured in the same run.

Each method runs in its own fresh process (so one method's freed memory cannot hide another's peak) on the same
model: by default SmolLM2-135M's architecture with random weights (no download), ``--model`` for a real checkpoint,
``--tiny`` for a 2-layer smoke test. The quantized methods start from 3-bit RTN layers with 1/32 salient columns and
are set up by the method registry (``gift_quant.methods.METHODS``) exactly as the recover stage does (STE's latent
weights start on the grid: there is no teacher here); ``full`` trains every parameter of the
full-precision model. A step is forward + backward + AdamW update on random tokens; the first ``--warmup`` steps
(which allocate the optimizer state) count for memory but not for time. ``--frozen dense packed`` runs the methods
that keep a frozen low-bit part both ways (``recover: {frozen: packed}``: bit-packed codes, one linear dequantized
at a time); ``model MB`` is the bytes of the model's tensors (parameters and buffers) after the method's setup.

    python tools/bench_recover.py                     # SmolLM2-135M shape, all 30 layers, batch 1 × 512
    python tools/bench_recover.py --layers 8 --steps 5
    python tools/bench_recover.py --tiny              # seconds; checks the tool works
    python tools/bench_recover.py --model smollm2-135m --methods gift_sw salient_ft --frozen dense packed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("gift_sw", "salient_ft", "scales_only", "ste", "ste_lsq", "lora", "full")
TARGETS = [r"\.(q|k|v|o)_proj$", r"\.(gate|up|down)_proj$"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 model (smoke test)")
    source.add_argument("--model", help="load this model (alias, Hub id or folder) instead of random SmolLM2 weights")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["gift_sw", "ste", "full"])
    p.add_argument("--frozen", nargs="+", choices=("dense", "packed"), default=["dense"],
                   help="how methods with a frozen low-bit part hold it (both: one row each)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--fraction", type=float, default=1 / 32, help="salient columns per linear, fraction of inputs")
    p.add_argument("--noise-bits", type=int, default=4, help="gift_sw: σ = ½·Δ of a grid of this many bits")
    p.add_argument("--noise-source", choices=("fresh", "pool"), default="fresh", help="gift_sw: how noise is drawn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-frozen", choices=("dense", "packed"), default="dense", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model:
        from gift_quant.config import ModelConfig
        from gift_quant.models import load_model

        model = load_model(ModelConfig(name=args.model))[0]
    else:
        torch.manual_seed(0)
        if args.tiny:
            cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        else:  # SmolLM2-135M's shape
            cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                              tie_word_embeddings=True, rope_theta=100000.0)
        model = LlamaForCausalLM(cfg)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    return model


def quantize(model, bits: int, fraction: float) -> None:
    """RTN records with the columns of largest norm salient: a stand-in for GPTQ that costs nothing to build."""
    import torch

    from gift_quant.layers import MixedPrecisionLinear, replace_linears
    from gift_quant.models import find_linears
    from gift_quant.quantizer import QuantSpec, rtn
    from gift_quant.saliency import num_salient

    records = {}
    for name, lin in find_linears(model, TARGETS).items():
        k = num_salient(lin.in_features, None, fraction)
        salient = lin.weight.detach().norm(dim=0).topk(k).indices
        records[name] = rtn(lin.weight, QuantSpec(bits=bits), salient)
    replace_linears(model, records, MixedPrecisionLinear.from_quantized)
    torch.manual_seed(0)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from gift_quant.config import RecoverConfig
    from gift_quant.layers import pack_frozen
    from gift_quant.memory import PeakMemory
    from gift_quant.methods import METHODS as REGISTRY
    from gift_quant.methods import setup_of

    device = torch.device(args.device)
    model = build_model(args)
    if args.worker == "full":
        model.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters())
    else:
        quantize(model, args.bits, args.fraction)
        cfg = RecoverConfig(method=args.worker, noise_bits=args.noise_bits, noise_source=args.noise_source,
                            frozen=args.worker_frozen)
        if cfg.frozen == "packed":
            pack_frozen(model)
        trainable = REGISTRY[args.worker].prepare(model, setup_of(cfg, device, next(model.parameters()).dtype))
    model.to(device).train()
    model_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    release_freed_memory()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, cpu_times = [], []
    with PeakMemory(device) as mem:
        for step in range(args.warmup + args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            with autocast:
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    return {"method": label(args.worker, args.worker_frozen), "trainable_params": trainable, "model_mb": model_mb,
            "step_s": sum(times) / len(times),
            "step_cpu_s": sum(cpu_times) / len(cpu_times),
            "tokens_per_s": args.batch * args.seq_len * len(times) / sum(times), "peak_mb": mem.peak_mb,
            "extra_mb": mem.extra_mb, "loss": loss.item()}


def release_freed_memory() -> None:
    """Hand memory freed while building the model (the fp weights the quantized layers replaced) back to the OS, so
    that the RSS at the start of training is what the model holds (glibc; elsewhere a no-op)."""
    import gc

    from gift_quant.memory import trim_heap

    gc.collect()
    trim_heap()


def label(method: str, frozen: str) -> str:
    return f"{method} (packed)" if frozen == "packed" else method


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    from gift_quant.config import KEEPS_FROZEN_PART

    results = []
    runs = [(m, f) for m in args.methods for f in args.frozen if f == "dense" or m in KEEPS_FROZEN_PART]
    for method, frozen in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method, "--worker-frozen", frozen]
        print(f"[bench] {label(method, frozen)} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def table(results: list[dict], args: argparse.Namespace) -> str:
    ref = next((r for r in results if r["method"] == "gift_sw"), results[0])
    shape = "tiny" if args.tiny else (args.model or "SmolLM2-135M shape, random weights")
    lines = [f"model: {shape}, layers: {args.layers or 'all'}, batch {args.batch} × {args.seq_len} tokens, "
             f"{args.bits}-bit, salient fraction {args.fraction:g}, device {args.device}, "
             f"checkpointing {'on' if args.checkpointing else 'off'}, {args.steps} timed steps",
             "", f"| method | trainable params | model MB | step (s) | step CPU (s) | tokens/s | peak memory (MB) | "
             f"training memory (MB) | step CPU time / {ref['method']} | training memory / {ref['method']} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['model_mb']:.1f} | {r['step_s']:.3f} | "
                     f"{r['step_cpu_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | "
                     f"{r['step_cpu_s'] / ref['step_cpu_s']:.2f}× | "
                     f"{r['extra_mb'] / max(ref['extra_mb'], 1e-9):.2f}× |")
    lines.append("")
    lines.append("step CPU: process CPU seconds per step; with OMP_NUM_THREADS=1 it is the single-thread cost even "
                 "when other jobs share the machine (wall `step` then is not).")
    lines.append("model MB: bytes of the model's parameters and buffers after the method's setup (the frozen part "
                 "included); peak memory: the whole process (CPU RSS) or CUDA max allocated, model included; training "
                 "memory: the peak above the level after building the model (activations, gradients, optimizer "
                 "state).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = run_all(args, argv)
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
