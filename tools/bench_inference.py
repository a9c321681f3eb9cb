"""Packed vs dense inference on CPU: checkpoint size, resident memory after load, prefill and decode tokens/s.

    python tools/bench_inference.py --model-dir outputs/run/packed [--threads 1,2] [--rounds 5]
    python tools/bench_inference.py --tiny            # builds a tiny random quantized export first (smoke test)

The packed model is loaded the Hugging Face way (``AutoModelForCausalLM.from_pretrained`` once gift_quant is
imported) and runs its fast kernels (``--kernel auto``: torch's int4 kernel on the CPU, see gift_quant.cpu_int4) or
the reference path (``--kernel reference``: codes dequantized at every forward; ``--cache-dense`` keeps them); it
computes in --dtype (default bf16). The dense references are the same weights merged into plain ``nn.Linear``
(``export_dense`` to a temporary folder, loaded with ``AutoModelForCausalLM``) in each of --dense-dtypes (default
bf16, the deployment baseline, then fp32). Each model is measured in its own child process so that one model's freed
memory cannot hide the other's RSS growth (``--in-process`` measures them here, sequentially: faster, RSS less
trustworthy). Per thread count of --threads, the models alternate --rounds times; each metric is reported as the
median and range over rounds, and the ratios packed/dense per round (neighbouring runs: on a shared machine the
load drifts) as their median and range. Decode speed is (N-1) / (t(N new tokens) - t(1 new token)), greedy, median
over --repeats, so the prompt's prefill is excluded; prefill speed is --prefill-tokens / t(one forward over them).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gift_quant.hf_quantizer import load_quantized  # noqa: E402
from gift_quant.export import export_dense, export_packed, size_report  # noqa: E402
from gift_quant.packing import PackedLinear, set_kernel  # noqa: E402

MB = 2**20


def build_tiny(folder: Path) -> Path:
    """A 2-layer random Llama, RTN 4-bit (group 32) with 4 salient columns per linear, exported packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gift_quant.layers import MixedPrecisionLinear, replace_linears
    from gift_quant.quantizer import QuantSpec, rtn

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    spec = QuantSpec(bits=4, group_size=32, sym=True)
    records = {
        name: rtn(m.weight.detach(), spec, torch.arange(4))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    replace_linears(model, records, lambda qw, b: MixedPrecisionLinear.from_quantized(qw, b))
    out = folder / "tiny_packed"
    export_packed(model.eval(), None, out, quant_info={"bits": 4, "group_size": 32, "sym": True})
    return out


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def warm_imports(dense_dir: Path) -> None:
    """Import the architecture's modules before the RSS baseline, so code pages don't count as model memory."""
    from transformers import AutoConfig, GenerationConfig  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(dense_dir))]


def load(kind: str, model_dir: Path, dense_dir: Path, dtype: torch.dtype, cache_dense: bool, kernel: str):
    from transformers import AutoModelForCausalLM

    if kind == "packed":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        for m in model.modules():
            if isinstance(m, PackedLinear):
                m.cache_dense = cache_dense
        set_kernel(model, kernel)
        return model
    return AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).eval()


@torch.no_grad()
def prefill_speed(model, tokens: int, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))

    def run() -> float:
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0

    run()  # warm-up
    return tokens / max(statistics.median(run() for _ in range(repeats)), 1e-9)


@torch.no_grad()
def decode_speed(model, prompt_tokens: int, new_tokens: int, repeats: int) -> float:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)  # warm-up
    times = [run(new_tokens) - run(1) for _ in range(repeats)]
    return (new_tokens - 1) / max(statistics.median(times), 1e-9)


def measure(kind: str, args: argparse.Namespace) -> dict:
    warm_imports(Path(args.dense_dir))
    before = rss()
    model = load(kind, Path(args.model_dir), Path(args.dense_dir), getattr(torch, args.dtype), args.cache_dense,
                 args.kernel)
    after = rss()
    tps = decode_speed(model, args.prompt_tokens, args.new_tokens, args.repeats)
    # With --cache-dense the dequantized weights appear during the first forward: report that footprint too.
    after_decode = rss()
    prefill = prefill_speed(model, args.prefill_tokens, args.repeats)
    kernels = dict(Counter(m.kernel_used for m in model.modules() if isinstance(m, PackedLinear)))
    return {"rss_delta_bytes": after - before, "rss_delta_after_decode_bytes": after_decode - before,
            "rss_delta_after_prefill_bytes": rss() - before, "tokens_per_s": tps, "prefill_tokens_per_s": prefill,
            "kernels": kernels, "threads": torch.get_num_threads()}


def measure_in_child(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", str(args.model_dir), "--dense-dir",
           str(args.dense_dir), "--dtype", args.dtype, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--kernel", args.kernel,
           "--prefill-tokens", str(args.prefill_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]  # one thread count per child
    if args.cache_dense:
        cmd += ["--cache-dense"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def kernel_perplexity(model_dir: str, windows: int, seq_len: int) -> dict[str, float]:
    """WikiText-2 perplexity of the packed model on its fast kernels and on the reference path, in float32:
    windows of up to 64 tokens run the bf16 int4 kernel, longer ones its float32 dense path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.config import TextSource
    from gift_quant.data import evaluation_ids, load_documents
    from gift_quant.evaluate import perplexity

    ids = evaluation_ids(AutoTokenizer.from_pretrained(model_dir), load_documents(TextSource(dataset="wikitext2")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for kernel in ("auto", "reference"):
        set_kernel(model, kernel)
        out[kernel] = perplexity(model, ids, seq_len, windows, progress=False).value
    print(f"WikiText-2 perplexity, {windows} windows of {seq_len}: fast kernels {out['auto']:.4f}, "
          f"reference {out['reference']:.4f}")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="packed export folder (export_packed)")
    src.add_argument("--tiny", action="store_true", help="build and bench a tiny random export")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype of the packed model")
    p.add_argument("--dense-dtypes", default="bfloat16,float32", type=lambda v: v.split(","),
                   help="dense references, comma-separated; ratios are given against each (the first one is the "
                        "headline)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--kernel", default="auto", choices=["auto", "reference"],
                   help="packed model: fast kernels, or the reference dequantize path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5,
                   help="alternate the models this many times per thread count (0: none, with --ppl-windows)")
    p.add_argument("--threads", default=None, help="thread counts, comma-separated (default: torch's)")
    p.add_argument("--cache-dense", action="store_true",
                   help="packed model keeps its dequantized weights between forwards (speed for memory)")
    p.add_argument("--in-process", action="store_true", help="measure the models in this process")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--ppl-windows", type=int, default=0,
                   help="also compare WikiText-2 perplexity (fast kernels vs reference) over this many windows")
    p.add_argument("--ppl-seq-len", type=int, default=64)
    p.add_argument("--dense-dir", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["packed", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    if any(d not in DTYPES for d in args.dense_dtypes):
        p.error(f"--dense-dtypes: each of {DTYPES}")
    try:
        args.threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    except ValueError:
        p.error("--threads: comma-separated integers")
    return args


DTYPES = ("float32", "float16", "bfloat16")
METRICS = {  # result key: (column title, scale)
    "tokens_per_s": ("decode tokens/s", 1),
    "prefill_tokens_per_s": ("prefill tokens/s", 1),
    "rss_delta_after_decode_bytes": ("RSS after decoding, MB", 1 / MB),
    "rss_delta_after_prefill_bytes": ("after the prefill, MB", 1 / MB),
}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_threads(args: argparse.Namespace, threads: int | None, dense_dirs: dict[str, str]) -> dict:
    """All models at one thread count, alternated ``args.rounds`` times: per-round results, spreads, ratios."""
    run = measure if args.in_process else measure_in_child
    variants = {"packed": ("packed", args.dtype, args.dense_dir)}
    variants.update({f"dense_{d}": ("dense", d, dense_dirs[d]) for d in args.dense_dtypes})
    if args.in_process and threads:
        torch.set_num_threads(threads)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: run(kind, argparse.Namespace(**{**vars(args), "dtype": dtype, "dense_dir": folder,
                                                              "threads": threads}))
                       for name, (kind, dtype, folder) in variants.items()})
    stats = {name: {k: spread([r[name][k] for r in rounds]) for k in METRICS} for name in variants}
    ratios = {name: {k: spread([r["packed"][k] / r[name][k] for r in rounds]) for k in METRICS}
              for name in variants if name != "packed"}
    return {"threads": rounds[0]["packed"]["threads"], "rounds": rounds, "stats": stats, "ratios": ratios}


def table(benches: list[dict], args: argparse.Namespace) -> str:
    """Markdown: per thread count, each model's median (range) and the packed/dense ratios."""
    def cell(sp: dict, scale: float, fmt: str) -> str:
        return f"{sp['median'] * scale:{fmt}} ({sp['min'] * scale:{fmt}}–{sp['max'] * scale:{fmt}})"

    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    lines = ["| threads | model | " + " | ".join(t for t, _ in METRICS.values()) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for b in benches:
        for name, st in b["stats"].items():
            label = f"packed {short[args.dtype]}" if name == "packed" else f"dense {short[name[6:]]}"
            lines.append(f"| {b['threads']} | {label} | " + " | ".join(
                cell(st[k], scale, ".0f") for k, (_, scale) in METRICS.items()) + " |")
        for name, ra in b["ratios"].items():
            lines.append(f"| {b['threads']} | **packed / dense {short[name[6:]]}** | " + " | ".join(
                cell(ra[k], 1, ".2f") + "×" for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        if args.threads[0]:
            torch.set_num_threads(args.threads[0])
        result = measure(args.child, args)
        print(json.dumps(result))
        return result
    if args.rounds == 0:  # --rounds 0 --ppl-windows N: only the perplexity comparison
        return {"perplexity": kernel_perplexity(args.model_dir, args.ppl_windows, args.ppl_seq_len)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.model_dir = str(build_tiny(Path(tmp)))
        dense_dirs = {d: str(Path(tmp) / f"dense_{d}") for d in args.dense_dtypes}
        merged = load_quantized(args.model_dir, dtype=torch.float32)
        for d, folder in dense_dirs.items():
            export_dense(merged, None, folder, dtype=getattr(torch, d))
        del merged
        gc.collect()
        args.dense_dir = dense_dirs[args.dense_dtypes[0]]
        benches = [bench_threads(args, threads, dense_dirs) for threads in args.threads]
        sizes = size_report(args.model_dir)
    first, headline = benches[0], f"dense_{args.dense_dtypes[0]}"
    middle = first["rounds"][len(first["rounds"]) // 2]
    ratio = first["ratios"][headline]
    result = {
        "model_dir": args.model_dir,
        "checkpoint_bytes": sizes["checkpoint_bytes"],
        "fp16_bytes": sizes["fp16_bytes"],
        "bits_per_weight": sizes["bits_per_weight"],
        # Headline (first thread count, first dense dtype): the middle round's runs and the median ratios.
        "packed": middle["packed"],
        "dense": middle[headline],
        "memory_ratio": ratio["rss_delta_after_decode_bytes"]["median"],
        "prefill_memory_ratio": ratio["rss_delta_after_prefill_bytes"]["median"],
        "speed_ratio": ratio["tokens_per_s"]["median"],
        "prefill_ratio": ratio["prefill_tokens_per_s"]["median"],
        "by_threads": benches,
    }
    print(f"checkpoint: {sizes['checkpoint_bytes'] / MB:.2f} MB ({sizes['bits_per_weight']:.3f} bits/weight in "
          f"quantized linears; fp16 model {sizes['fp16_bytes'] / MB:.2f} MB, ratio {sizes['ratio']:.3f})")
    print(f"packed linears per kernel: {middle['packed']['kernels']}")
    print(f"{args.rounds} alternating rounds per thread count; median (min–max) over rounds; ratio = packed/dense "
          f"per round:")
    print(table(benches, args))
    if args.ppl_windows:
        result["perplexity"] = kernel_perplexity(args.model_dir, args.ppl_windows, args.ppl_seq_len)
    if args.json:
        args.json.write_text(json.dumps({**result, "argv": argv if argv is not None else sys.argv[1:]}, indent=2))
    return result


if __name__ == "__main__":
    main()
