"""Size–perplexity front: gift_quant's packed exports against llama.cpp's types, same weights, windows and token ids.

    python tools/bench_size_ppl.py --work outputs/size_ppl --side-python ../side-llamacpp/bin/python \
        --fp --gift "4-bit g64=outputs/size_ppl/w4g64" ... --json docs/size_perplexity.json \
        --table docs/size_perplexity_table.md --plot docs/img/size_perplexity.png

On the embedded default (SmolLM2-135M, whose ``fp`` model is the float32 dequantization of its Q4_1 GGUF):

1. WikiText-2 tokenized with gift_quant's tokenizer and data code, cut into the evaluate stage's windows (GPTQ
   protocol, --windows x --seq-len), saved as ``WORK/windows.npy``.
2. ``tools/llamacpp_side.py`` in the side environment (``--side-python``; its docstring says how to make it) writes
   the fp weights as an F32 GGUF, makes llama.cpp's types with ``llama_model_quantize`` and measures each on those
   ids. Here the F32 GGUF is read back and compared with the fp checkpoint tensor by tensor (q/k in llama.cpp's
   rotary order), so every llama.cpp point starts from exactly the pipeline's fp weights.
3. ``--fp``: gift_quant's own fp perplexity on the same windows (the f16 point must agree within ~0.5 %).
4. ``--gift LABEL=RUN_DIR``: a finished recipe run with a packed export (``RUN_DIR/packed``): file bytes from its
   export report (checked against the files), the reloaded export's perplexity (float32, as ``export.verify``), and
   its decode tokens/s (bf16 through ``generate``, as tools/bench_inference.py).

Decode: best of 3 of 64 greedy tokens after a 32-token prompt, the prompt's prefill excluded, --threads threads.
Every point is cached in --json; a rerun measures only what is missing (--refresh LABEL re-measures one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gift_quant.evaluate import _windows, perplexity  # noqa: E402
from gift_quant.models import SMOLLM2_PACKAGE  # noqa: E402

MB = 1e6  # sizes in decimal MB, as the issue and docs/results.md#embedding-quantization


def token_windows(seq_len: int, n: int) -> torch.Tensor:
    """The evaluate stage's windows of WikiText-2 for the default model: (n, seq_len) token ids."""
    from transformers import AutoTokenizer

    from gift_quant.config import EvaluateConfig
    from gift_quant.data import evaluation_ids, load_documents
    from gift_quant.models import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    return _windows(evaluation_ids(tokenizer, load_documents(EvaluateConfig())), seq_len, n, None)


def gguf_order(hf: torch.Tensor, heads: int) -> torch.Tensor:
    """A q/k projection in llama.cpp's rotary layout (convert_hf_to_gguf's permute): per head, the interleaved
    halves of transformers' rotate_half become adjacent pairs."""
    return hf.reshape(heads, 2, hf.shape[0] // heads // 2, *hf.shape[1:]).swapaxes(1, 2).reshape(hf.shape)


HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m:
        return f"model.layers.{m[1]}.{HF_NAMES[m[2]]}.weight"
    return f"{HF_NAMES[gguf_name.removesuffix('.weight')]}.weight"


def check_master(master: Path) -> dict:
    """Largest |difference| between the F32 GGUF and the fp checkpoint over every tensor."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from gift_quant.models import smollm2_checkpoint

    folder = smollm2_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    worst = 0.0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for t in GGUFReader(master).tensors:
            ref = f.get_tensor(hf_name(t.name)).float()
            kind = t.name.split(".")[-2]
            ref = gguf_order(ref, heads[kind]) if kind in heads else ref
            worst = max(worst, (torch.from_numpy(np.array(t.data)).reshape(ref.shape) - ref).abs().max().item())
    return {"max_abs_diff": worst}


def fp16_bytes(gguf_file: Path) -> int:
    """The model in fp16: every element of the GGUF once, 2 bytes each (tied embedding once), as gift_quant's
    size reports count it."""
    from gguf import GGUFReader

    return 2 * sum(int(t.n_elements) for t in GGUFReader(gguf_file).tensors)


def run_side(args: argparse.Namespace, windows_file: Path, out: Path) -> dict:
    from gift_quant.models import smollm2_gguf

    cmd = [args.side_python, str(REPO / "tools" / "llamacpp_side.py"), "--source", str(smollm2_gguf()),
           "--windows", str(windows_file), "--work", str(args.work / "llamacpp"), "--out", str(out),
           "--types", args.types, "--threads", str(args.threads)] + (["--no-repack"] if args.no_repack else [])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.read_text())


def fp_point(windows: torch.Tensor) -> dict:
    from gift_quant.config import ModelConfig
    from gift_quant.models import load_model

    model, _ = load_model(ModelConfig())
    r = perplexity(model, windows.reshape(1, -1), windows.shape[1], windows.shape[0], progress=False)
    return {"ppl": r.value, "nll_sum": r.nll_sum, "tokens": r.tokens}


def export_record(run_dir: Path) -> dict:
    """The export stage's size rows of a finished run (bytes by component, bits/weight of the linears)."""
    doc = json.loads((run_dir / "results.json").read_text())
    rows = [r for r in doc["results"] if r["stage"] == "export"]
    size = next(r for r in rows if r["metric"] == "checkpoint_mb" and "bytes" in r)
    bits = next(r for r in rows if r["metric"] == "bits_per_weight")
    stages = {next(iter(s)): next(iter(s.values())) for s in doc["recipe"]["stages"]}
    return {"bytes": size["bytes"], "bytes_by_component": size["bytes_by_component"], "linear_bits": bits["value"],
            "embedding_type": stages["export"].get("embedding", "int8"), "quantize": stages["quantize"],
            "select": stages.get("select")}


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int, repeats: int, generate=None) -> float:
    """Greedy tokens/s after the prompt, best of ``repeats``: (t(new + 1) − t(1)) times ``new_tokens`` tokens.
    ``generate(prompt, n)`` makes n tokens (default: ``model.generate``); a warm-up call comes first."""
    if generate is None:
        def generate(prompt: torch.Tensor, n: int) -> None:
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def timed(n: int) -> float:
        start = time.perf_counter()
        generate(prompt, n)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return new_tokens / min(timed(new_tokens + 1) - timed(1) for _ in range(repeats))


def gift_point(run_dir: Path, windows: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    from gift_quant.hf_quantizer import load_quantized

    folder = run_dir / "packed"
    point = export_record(run_dir)
    on_disk = sum(p.stat().st_size for p in folder.glob("model*.safetensors"))
    if on_disk != point["bytes"]:
        raise SystemExit(f"{folder}: export report says {point['bytes']} bytes, the files hold {on_disk}")
    model = load_quantized(folder, device="cpu", dtype=torch.float32)
    r = perplexity(model, windows.reshape(1, -1), windows.shape[1], windows.shape[0], progress=False)
    point.update(ppl=r.value, nll_sum=r.nll_sum, tokens=r.tokens, file=str(folder))
    del model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    point["decode_tok_s"] = decode_speed(model, windows[:1, :32], 64, 3)
    return point


COLLAPSED = 1e3  # perplexity above which a point counts as collapsed: named under the plot instead of drawn


def ppl_text(x: float, sign: str = "") -> str:
    """Two decimals, or e-notation for collapsed models' millions."""
    return f"{x:{sign}.2f}" if abs(x) < 1e4 else f"{x:{sign}.1e}"


def of_kind(points: dict[str, dict], kind: str) -> list[dict]:
    """The points of one kind, each with its label."""
    return [dict(p, label=k) for k, p in points.items() if p["kind"] == kind]


def best_below(size: float, others: list[dict]) -> dict | None:
    """The lowest-perplexity point of ``others`` whose file is no larger than ``size``."""
    fitting = [o for o in others if o["bytes"] <= size]
    return min(fitting, key=lambda o: o["ppl"]) if fitting else None


def smallest_as_good(ppl: float, others: list[dict]) -> dict | None:
    """The smallest point of ``others`` whose perplexity is no worse than ``ppl``."""
    good = [o for o in others if o["ppl"] <= ppl]
    return min(good, key=lambda o: o["bytes"]) if good else None


def front(points: dict[str, dict], lo_mb: float, hi_mb: float) -> str:
    """The issue's target read size by size: on each span of [lo, hi] MB between two points' sizes, the best
    gift_quant export no larger than the span's start against llama.cpp's best type no larger (both step functions
    change only at a point's size)."""
    kinds = {kind: of_kind(points, kind) for kind in ("gift_quant", "llama.cpp")}
    lo, hi = lo_mb * MB, hi_mb * MB  # in bytes, so a point counts from exactly its own size on
    cuts = sorted({lo, hi} | {p["bytes"] for ps in kinds.values() for p in ps if lo < p["bytes"] < hi})
    spans: list[list] = []  # [start, end, gift, llama], neighbours with the same two rivals merged
    for start, end in zip(cuts, cuts[1:]):
        gift, llama = (best_below(start, kinds[k]) for k in ("gift_quant", "llama.cpp"))
        if spans and (spans[-1][2], spans[-1][3]) == (gift, llama):
            spans[-1][1] = end
        else:
            spans.append([start, end, gift, llama])
    lines = ["| size span (MB) | best gift_quant no larger | best llama.cpp no larger | verdict |", "|---|---|---|---|"]
    for start, end, gift, llama in spans:
        name = [f"{r['label']} ({ppl_text(r['ppl'])})" if r else "none" for r in (gift, llama)]
        if gift is None:
            verdict = "no gift_quant point"
        elif llama is None:
            verdict = "no llama.cpp type (gift_quant alone)"
        else:
            verdict = (f"gift_quant by {ppl_text(llama['ppl'] - gift['ppl'])}" if gift["ppl"] < llama["ppl"]
                       else f"**llama.cpp by {ppl_text(gift['ppl'] - llama['ppl'])}**")
        lines.append(f"| {start / MB:.1f}–{end / MB:.1f} | {name[0]} | {name[1]} | {verdict} |")
    return "\n".join(lines) + "\n"


def table(points: dict[str, dict], source_bytes: int, fp16_bytes: int) -> str:
    """One row per point, largest file first; gift_quant rows name their rivals: the best llama.cpp type no larger,
    and the smallest llama.cpp type no worse."""
    lines = ["| point | file MB | vs source GGUF | vs fp16 | linear bits/weight | embedding | WikiText-2 ppl | "
             "decode tok/s | best llama.cpp type no larger | smallest llama.cpp type as good |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|---|"]
    llama = of_kind(points, "llama.cpp")
    for label, p in sorted(points.items(), key=lambda kv: -kv[1].get("bytes", 1e18)):
        if p["kind"] == "fp":
            lines.append(f"| {label} | | | | 32 | float32 | {p['ppl']:.2f} | | | |")
            continue
        rivals = ["", ""]
        if p["kind"] == "gift_quant":
            below, good = best_below(p["bytes"], llama), smallest_as_good(p["ppl"], llama)
            rivals = [f"{r['label']}: {ppl_text(r['ppl'])} at {r['bytes'] / MB:.1f} MB "
                      f"({ppl_text(p['ppl'] - r['ppl'], '+')} ppl, "
                      f"{(p['bytes'] - r['bytes']) / MB:+.1f} MB)" if r else "none" for r in (below, good)]
        tok_s = f"{p['decode_tok_s']:.0f}" if p.get("decode_tok_s") else ""
        lines.append(f"| {label} | {p['bytes'] / MB:.1f} | {p['bytes'] / source_bytes:.3f}x | "
                     f"{p['bytes'] / fp16_bytes:.3f}x | {p['linear_bits']:.2f} | {p['embedding_type']} | "
                     f"{ppl_text(p['ppl'])} | {tok_s} | {rivals[0]} | {rivals[1]} |")
    return "\n".join(lines) + "\n"


def plot(points: dict[str, dict], source_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    style = {"llama.cpp": ("o", "tab:blue"), "gift_quant": ("s", "tab:red")}
    for ax, key, xlabel in ((axes[0], "bytes", "file size (MB)"), (axes[1], "linear_bits", "linear bits/weight")):
        for kind, (marker, color) in style.items():
            chosen = {k: p for k, p in points.items() if p["kind"] == kind and p["ppl"] < COLLAPSED}
            xs = [p[key] / (MB if key == "bytes" else 1) for p in chosen.values()]
            ax.scatter(xs, [p["ppl"] for p in chosen.values()], marker=marker, color=color, label=kind)
            for (label, p), x in zip(chosen.items(), xs):
                ax.annotate(label, (x, p["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if "fp" in {p["kind"] for p in points.values()}:
            ax.axhline(next(p["ppl"] for p in points.values() if p["kind"] == "fp"), color="gray", ls=":", lw=1,
                       label="fp (float32)")
        if key == "bytes":
            ax.axvline(source_bytes / MB, color="gray", ls="--", lw=1, label="source Q4_1 GGUF")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("WikiText-2 perplexity (16 x 2048)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    collapsed = [f"{k} ({ppl_text(p['ppl'])})" for k, p in points.items() if p["ppl"] >= COLLAPSED]
    fig.suptitle("SmolLM2-135M: perplexity against size, gift_quant exports and llama.cpp types"
                 + (f"\nnot drawn (collapsed): {', '.join(collapsed)}" if collapsed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/size_ppl"))
    p.add_argument("--side-python", help="python of the llama.cpp side environment; without it no llama.cpp points")
    p.add_argument("--types", default="F16,Q8_0,Q5_0,Q4_1,Q4_0,Q3_K_M,Q2_K,SOURCE")
    p.add_argument("--no-repack", action="store_true", help="llama.cpp without weight repacking/AMX (llamacpp_side)")
    p.add_argument("--fp", action="store_true", help="measure gift_quant's fp model on the same windows")
    p.add_argument("--gift", action="append", default=[], metavar="LABEL=RUN_DIR")
    p.add_argument("--refresh", action="append", default=[], metavar="LABEL")
    p.add_argument("--front", type=float, nargs=2, default=(60.0, 140.0), metavar=("LO_MB", "HI_MB"),
                   help="size range of the target's size-by-size table (issue #27: 60-140 MB)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path("docs/size_perplexity.json"))
    p.add_argument("--table", type=Path)
    p.add_argument("--plot", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.json.read_text()) if args.json.is_file() else {"points": {}}
    points = {k: v for k, v in doc["points"].items() if k not in args.refresh}
    windows = token_windows(args.seq_len, args.windows)
    windows_file = args.work / "windows.npy"
    np.save(windows_file, windows.numpy().astype(np.int32))
    doc.update(windows=args.windows, seq_len=args.seq_len, threads=args.threads,
               first_ids=windows[0, :8].tolist())
    if args.side_python:
        for name, p in run_side(args, windows_file, args.work / "llamacpp.json").items():
            label = "llama.cpp source file (Q4_1)" if name == "SOURCE" else f"llama.cpp {name}"
            if name == "SOURCE":  # the installed package's file: its name, not this machine's path
                p = dict(p, file=f"{SMOLLM2_PACKAGE}/{Path(p['file']).name}")
            points[label] = dict(p, kind="llama.cpp")
        doc["master_check"] = check_master(args.work / "llamacpp" / "fp32.gguf")
    if args.fp and "gift_quant fp" not in points:
        points["gift_quant fp"] = dict(fp_point(windows), kind="fp")
    for item in args.gift:
        label, _, run_dir = item.partition("=")
        if label not in points:
            points[label] = dict(gift_point(Path(run_dir), windows), kind="gift_quant", run_dir=run_dir)
        args.json.write_text(json.dumps(dict(doc, points=points), indent=1))  # each slow point kept at once
    doc["points"] = points
    args.json.write_text(json.dumps(doc, indent=1))
    from gift_quant.models import smollm2_gguf

    source_bytes = smollm2_gguf().stat().st_size
    text = table(points, source_bytes, fp16_bytes(smollm2_gguf()))
    text += f"\nThe target size by size, {args.front[0]:g}–{args.front[1]:g} MB:\n\n" + front(points, *args.front)
    print(text)
    if args.table:
        args.table.write_text(text)
    if args.plot:
        plot(points, source_bytes, args.plot)
    return doc


if __name__ == "__main__":
    main()
