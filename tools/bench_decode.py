"""Decode speed at equal size: gift_quant's packed exports against llama.cpp's types, in alternating rounds.

    python tools/bench_decode.py --side-python ../side-llamacpp/bin/python --work outputs/size_ppl \
        --gift "4-bit + 1/32 salient, recovered=outputs/size_ppl/w4s32r/packed" --types Q2_K,Q4_0,Q3_K_M \
        --threads 1,2 --rounds 5 --compiled --json docs/decode_speed.json --table docs/decode_speed.md

The same prompt for every point: the first 32 token ids of ``WORK/windows.npy`` (tools/bench_size_ppl.py's
WikiText-2 windows, made here when missing). Decode tokens/s = 64 greedy tokens after the prompt, the prompt's
prefill excluded, best of --repeats: gift_quant through ``generate`` on the export loaded with ``from_pretrained`` in
bf16 (as bench_size_ppl and bench_inference) and, with --compiled, also through
:class:`gift_quant.decode.CompiledDecoder` (static cache, compiled step; its compilation is a warm-up call, not
timed; --torch-linears adds it with the linears on torch's int4 kernel instead of gift_quant's op, --no-ops with
neither the linears nor the lm_head on gift_quant's ops: torch's int4 and int8 kernels, an int4 head's chunks),
llama.cpp through ``Llama.eval`` in the side environment (``tools/llamacpp_side.py --decode-only``, which makes a
missing type's file as bench_size_ppl does). Every measurement runs in its own process. Per thread count of
--threads the points alternate --rounds times (the order reversed every other round); each point's tok/s is the
median and range over rounds, and each ratio gift_quant / llama.cpp is taken per round (neighbouring runs: the load
of a shared machine drifts), then its median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

from bench_size_ppl import decode_speed, token_windows  # noqa: E402

NEW_TOKENS, PROMPT_TOKENS = 64, 32
COMPILED = ", compiled decode"  # label suffix of the --compiled measurements
CPP_WRAPPER = ", compiled decode, C++ wrapper"  # --cpp-wrapper: CompiledDecoder(cpp_wrapper=True)
TORCH_LINEARS = ", compiled decode, linears on torch's int4 kernel"  # --torch-linears
# --no-ops; in the files of 2026-12-06 (before the linears' op) "lm_head without gift_quant's ops" (--no-head-ops)
# and "torch's int8 lm_head" (--torch-head) name this configuration.
NO_OPS = ", compiled decode, without gift_quant's ops"


def child(export: Path, prompt_file: Path, repeats: int, compiled: bool, cpp_wrapper: bool = False,
          torch_linears: bool = False, no_ops: bool = False) -> float:
    """One gift_quant measurement, in this (child) process: through ``generate``, or through
    :class:`gift_quant.decode.CompiledDecoder` (its compilation done in the warm-up call, not timed); with
    ``torch_linears`` the linears run torch's int4 kernel, with ``no_ops`` the model runs as where gift_quant's ops
    cannot be built (torch's int4 and int8 kernels, an int4 head's chunks)."""
    import gift_quant  # noqa: F401  registers the quantizer with transformers
    from gift_quant import cpu_rows
    from transformers import AutoModelForCausalLM

    if no_ops:
        cpu_rows.switch_off("bench_decode --no-ops")
    elif torch_linears:
        cpu_rows.switch_off_linears()

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    prompt = torch.from_numpy(np.load(prompt_file)[:1, :PROMPT_TOKENS].astype(np.int64))
    if not compiled:
        return decode_speed(model, prompt, NEW_TOKENS, repeats)
    from gift_quant.decode import CompiledDecoder

    decoder = CompiledDecoder(model, cpp_wrapper=cpp_wrapper)  # compiles in decode_speed's warm-up call
    return decode_speed(model, prompt, NEW_TOKENS, repeats,
                        generate=lambda ids, n: decoder.generate(ids, n, stop_at_eos=False))


def last_line(cmd: list[str], threads: int) -> str:
    """The last stdout line of a measuring child; its stderr's tail in the error when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{' '.join(cmd[:3])} … failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return out.stdout.strip().splitlines()[-1]


def measure_gift(export: str, args: argparse.Namespace, threads: int, label: str) -> float:
    compiled = label.endswith((COMPILED, CPP_WRAPPER, TORCH_LINEARS, NO_OPS))
    return float(last_line([sys.executable, __file__, "--child", export, "--work", str(args.work),
                            "--repeats", str(args.repeats), "--threads", str(threads)]
                           + (["--compiled"] if compiled else [])
                           + (["--cpp-wrapper"] if label.endswith(CPP_WRAPPER) else [])
                           + (["--torch-linears"] if label.endswith(TORCH_LINEARS) else [])
                           + (["--no-ops"] if label.endswith(NO_OPS) else []), threads))


def measure_llamacpp(args: argparse.Namespace, threads: int) -> dict[str, dict]:
    """{label: {"bytes", "decode_tok_s", ...}} per llama.cpp type, as the side script reports them."""
    from gift_quant.models import smollm2_gguf

    cmd = [args.side_python, str(TOOLS / "llamacpp_side.py"), "--decode-only", "--source", str(smollm2_gguf()),
           "--windows", str(args.work / "windows.npy"), "--work", str(args.work / "llamacpp"), "--types", args.types,
           "--threads", str(threads), "--repeats", str(args.repeats)] + (["--no-repack"] if args.no_repack else [])
    return {f"llama.cpp {name}": v for name, v in json.loads(last_line(cmd, threads)).items()}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_threads(args: argparse.Namespace, gifts: dict[str, str], threads: int) -> dict:
    rounds: list[dict[str, float]] = []
    sizes: dict[str, int] = {}  # llama.cpp files' bytes, as the side script found them
    for r in range(args.rounds):
        speeds: dict[str, float] = {}

        def llamacpp() -> None:
            for label, point in measure_llamacpp(args, threads).items():
                speeds[label], sizes[label] = point["decode_tok_s"], point["bytes"]

        steps = [llamacpp] + [
            (lambda label=label, d=d: speeds.__setitem__(label, measure_gift(d, args, threads, label)))
            for label, d in gifts.items()]
        for step in (steps if r % 2 == 0 else steps[::-1]):
            step()
        rounds.append(speeds)
        print(f"{threads} thread(s), round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()),
              flush=True)
    labels = list(rounds[0])
    ratios = {f"{g} / {l}": spread([rd[g] / rd[l] for rd in rounds])
              for g in gifts for l in labels if l not in gifts}
    return {"threads": threads, "rounds": rounds, "tok_s": {k: spread([rd[k] for rd in rounds]) for k in labels},
            "ratios": ratios, "llamacpp_bytes": sizes}


def table(doc: dict) -> str:
    def cell(sp: dict, fmt: str, unit: str = "") -> str:
        return f"{sp['median']:{fmt}}{unit} ({sp['min']:{fmt}}–{sp['max']:{fmt}})"

    threads = [b["threads"] for b in doc["by_threads"]]
    head = "| point | file MB | " + " | ".join(f"decode tok/s, {t} thread(s)" for t in threads) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(threads)]
    for label, size in doc["bytes"].items():
        lines.append(f"| {label} | {size / 1e6:.1f} | "
                     + " | ".join(cell(b["tok_s"][label], ".1f") for b in doc["by_threads"]) + " |")
    lines += ["", "| ratio (per round) | " + " | ".join(f"{t} thread(s)" for t in threads) + " |",
              "|---|" + "---:|" * len(threads)]
    for name in doc["by_threads"][0]["ratios"]:
        lines.append(f"| {name} | " + " | ".join(cell(b["ratios"][name], ".2f", "x") for b in doc["by_threads"])
                     + " |")
    return "\n".join(lines) + "\n"


def file_bytes(gifts: dict[str, str], llamacpp_bytes: dict[str, int]) -> dict[str, int]:
    sizes = {label: sum(p.stat().st_size for p in Path(d).glob("model*.safetensors")) for label, d in gifts.items()}
    return dict(sorted({**sizes, **llamacpp_bytes}.items(), key=lambda kv: -kv[1]))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/size_ppl"))
    p.add_argument("--side-python", help="python of the llama.cpp side environment (tools/llamacpp_side.py)")
    p.add_argument("--types", default="Q2_K,Q4_0,Q3_K_M", help="llama.cpp types to time")
    p.add_argument("--no-repack", action="store_true", help="llama.cpp without weight repacking/AMX")
    p.add_argument("--gift", action="append", default=[], metavar="LABEL=EXPORT_DIR")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="best of this many per measurement")
    p.add_argument("--compiled", action="store_true",
                   help="also time each --gift export through gift_quant.decode.CompiledDecoder")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="with --compiled, also time the decoder with Inductor's C++ wrapper (cpp_wrapper=True)")
    p.add_argument("--torch-linears", action="store_true",
                   help="with --compiled, also time the decoder with the linears on torch's int4 kernel instead of "
                        "gift_quant's op (gift_quant/cpu_rows.py)")
    p.add_argument("--no-ops", "--no-head-ops", dest="no_ops", action="store_true",
                   help="with --compiled, also time the decoder without gift_quant's ops: torch's int4 and int8 "
                        "kernels, an int4 head's chunks (--no-head-ops, its name before the linears' op, when the "
                        "linears had no op of ours)")
    p.add_argument("--json", type=Path)
    p.add_argument("--table", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and (not args.side_python or not args.gift):
        p.error("--side-python and at least one --gift are needed")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.child is not None:
        torch.set_num_threads(int(args.threads))
        print(child(Path(args.child), args.work / "windows.npy", args.repeats, args.compiled,
                    cpp_wrapper=args.cpp_wrapper, torch_linears=args.torch_linears, no_ops=args.no_ops))
        return None
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "windows.npy").is_file():
        np.save(args.work / "windows.npy", token_windows(2048, 16).numpy().astype(np.int32))
    gifts = dict(item.partition("=")[::2] for item in args.gift)
    if args.compiled:
        suffixes = ([COMPILED] + ([CPP_WRAPPER] if args.cpp_wrapper else [])
                    + ([TORCH_LINEARS] if args.torch_linears else []) + ([NO_OPS] if args.no_ops else []))
        gifts.update({label + suffix: d for label, d in list(gifts.items()) for suffix in suffixes})
    by_threads = [bench_threads(args, gifts, int(t)) for t in args.threads.split(",")]
    doc = {"new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS, "repeats": args.repeats,
           "rounds": args.rounds, "no_repack": args.no_repack, "compiled": args.compiled, "gift": gifts,
           "bytes": file_bytes(gifts, by_threads[0]["llamacpp_bytes"]), "by_threads": by_threads}
    text = table(doc)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    if args.table:
        args.table.write_text(text)
    return doc


if __name__ == "__main__":
    main()
