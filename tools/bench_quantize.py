"""Quantization benchmark on the embedded SmolLM2 (or any model): perplexity, quantization seconds, peak memory.

For every (method, bits, salient fraction[, rotation]) the fp model is copied, quantized layer by layer on the same
calibration windows, and evaluated on WikiText-2. `ref` is the independent float64 column-by-column transcription of
the published GPTQ algorithm (tools/reference_gptq.py) run through the same driver, so `gptq` vs `ref` compares
quality and time of the two implementations on identical inputs, in the same run.

    python tools/bench_quantize.py --bits 4 3 2 --fractions 0 0.03125 --methods rtn gptq ref --out docs/bench_quantize.md

With OMP_NUM_THREADS=1 the CPU seconds of the quantization are the single-thread work whatever else shares the
machine, so parts of the table can run in parallel processes (`--fp-ppl` skips re-measuring the fp32 row).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_gptq import reference_gptq  # noqa: E402

from gift_quant.config import ModelConfig, QuantizeConfig, SelectConfig, TextSource  # noqa: E402
from gift_quant.data import calibration_windows, evaluation_ids, load_documents  # noqa: E402
from gift_quant.evaluate import perplexity  # noqa: E402
from gift_quant.gptq import GPTQ, GPTQResult  # noqa: E402
from gift_quant.models import load_model  # noqa: E402
from gift_quant.quantize import LinearQuantizer, quantize_model  # noqa: E402
from gift_quant.quantized import QuantizedWeight  # noqa: E402


class ReferenceGPTQ(GPTQ):
    """Same Hessian accumulation, quantization by the float64 reference transcription."""

    def quantize(self, weight, spec, salient_idx=None, *, block_size=128, percdamp=0.01, act_order=False,
                 static_groups=False) -> GPTQResult:
        start = time.perf_counter()
        H, self.H = self.H, None
        r = reference_gptq(weight.double(), H.double(), spec, salient_idx, percdamp=percdamp, act_order=act_order,
                           static_groups=static_groups)
        qw = QuantizedWeight(codes=r.codes.to(torch.uint8), scales=r.scales.float(), zeros=r.zeros.float(),
                             g_idx=r.g_idx.int(), salient_idx=r.salient_idx, salient_weight=r.salient_weight.float(),
                             bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
        return GPTQResult(qw, r.loss, percdamp, time.perf_counter() - start)


class Float64GPTQ(GPTQ):
    """gift_quant's GPTQ computing in float64 (it follows the weight's dtype): isolates float32 rounding from the
    algorithm when comparing with `ref`."""

    def quantize(self, weight, spec, salient_idx=None, **kwargs) -> GPTQResult:
        self.H = self.H.double()
        r = super().quantize(weight.double(), spec, salient_idx, **kwargs)
        qw = r.weight
        qw.scales, qw.zeros, qw.salient_weight = qw.scales.float(), qw.zeros.float(), qw.salient_weight.float()
        return r


SOLVERS = {"gptq": GPTQ, "gptq64": Float64GPTQ, "ref": ReferenceGPTQ}
METHODS = ["rtn", *SOLVERS]


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 1 / 32])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "ref"], choices=METHODS,
                    help="gptq64: gift_quant's GPTQ in float64, to separate rounding from the algorithm vs ref")
    ap.add_argument("--ref-bits", type=int, nargs="*", default=[4, 3],
                    help="run `ref` only at these bit-widths, without salient columns (it is slow)")
    ap.add_argument("--rotate", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--rotate-methods", nargs="+", default=["gptq"], help="methods also run with rotation on")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--mse", action="store_true", help="MSE clip search for the scales (default: min-max, as GPTQ)")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--fp-ppl", type=float,
                    help="skip the fp32 evaluation and use this value (it is deterministic; for runs split in parts)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="only render one table from the .json files of runs split in parts (pass their settings)")
    ap.add_argument("--out", type=Path, help="write a markdown table (and .json beside it)")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        write([parts[0][0], *sorted((r for part in parts for r in part[1:]), key=row_order)], args)
        return

    base, tok = load_model(ModelConfig(name=args.model))
    calib = calibration_windows(tok, load_documents(TextSource(dataset="c4")), args.calib_samples, args.calib_len, 0)
    ids = evaluation_ids(tok, load_documents(TextSource(dataset="wikitext2")))
    evaluate = lambda m: perplexity(m, ids, args.eval_len, args.eval_windows, progress=False).value  # noqa: E731
    fp = args.fp_ppl if args.fp_ppl is not None else evaluate(base)
    rows = [{"method": "fp32", "bits": 32, "salient": 0, "rotate": "off", "ppl": fp, "seconds": 0.0, "cpu_seconds": 0.0,
             "peak_rss_mb": peak_rss_mb()}]
    print(rows[-1], flush=True)
    for rotate in args.rotate:
        for bits in args.bits:
            for fraction in args.fractions:
                for method in args.methods:
                    if method == "ref" and (bits not in args.ref_bits or fraction or rotate == "on"):
                        continue
                    if rotate == "on" and method not in args.rotate_methods:
                        continue
                    rows.append(run_one(base, calib, evaluate, method, bits, fraction, rotate, args))
                    print(rows[-1], flush=True)
    write(rows, args)


def row_order(row: dict) -> tuple:
    return -row["bits"], row["salient"], METHODS.index(row["method"]), row["rotate"]


def write(rows: list[dict], args) -> None:
    table = render(rows, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


def run_one(base, calib, evaluate, method, bits, fraction, rotate, args) -> dict:
    model = copy.deepcopy(base)
    reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    if rotate == "on":
        from gift_quant.rotate import RotateSpec, rotate_model

        rotate_model(model, RotateSpec())
    cfg = QuantizeConfig(method="rtn" if method == "rtn" else "gptq", bits=bits, mse=args.mse,
                         act_order=args.act_order)
    select = SelectConfig(metric="gift", fraction=fraction) if fraction else None
    quantizer = LinearQuantizer(cfg, select, solver=SOLVERS.get(method, GPTQ))
    needs_data = method != "rtn" or select is not None
    quantize_model(model, quantizer, calib if needs_data else None, device=torch.device("cpu"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"method": method, "bits": bits, "salient": fraction, "rotate": rotate, "ppl": evaluate(model),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def render(rows: list[dict], args) -> str:
    fp = rows[0]["ppl"]
    head = (f"WikiText-2 perplexity ({args.eval_windows} windows x {args.eval_len}), calibration C4 "
            f"{args.calib_samples} x {args.calib_len}, per-channel symmetric, {'MSE' if args.mse else 'min-max'} "
            f"scales{', act-order' if args.act_order else ''}; fp32 = {fp:.3f}\n\n")
    lines = ["| method | bits | salient | rotate | ppl | ppl / fp | quantize s (wall) | quantize s (CPU) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        sal = "0" if not r["salient"] else f"1/{1 / r['salient']:.3g} of in"
        lines.append(f"| {r['method']} | {r['bits']} | {sal} | {r['rotate']} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} "
                     f"| {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | {r['peak_rss_mb']:.0f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
