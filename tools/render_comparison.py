"""Write a compare stage's comparison.md and recovery.png again from comparison.json with the current report code,
or merge the comparisons of several runs that split one recipe's `methods` between processes. Nothing is trained or
evaluated.

Every method of a comparison trains its own copy of the same quantized model, so a recipe's methods can run in
parallel processes (`--set stages.compare.methods=[...]`, one output folder each) and be merged afterwards; the runs
must agree on everything else (model, training settings, evaluation, full-precision and post-quantization
perplexities), which is checked.

    python tools/render_comparison.py OUT                        # rewrites OUT/comparison.md and recovery.png
    python tools/render_comparison.py OUT_A OUT_B --to docs/x    # merged into docs/x/comparison.{json,md}, recovery.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gift_quant.comparison_report import write_outputs  # noqa: E402

SHARED = ("model", "eval", "training", "device")


def merge(summaries: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, Any]:
    """One comparison from runs of the same recipe with different methods; ValueError when they disagree."""
    first = summaries[0]
    for other in summaries[1:]:
        for key in SHARED:
            if other[key] != first[key]:
                raise ValueError(f"the runs differ in {key!r}: they are not parts of one comparison")
        for key in ("fp_ppl", "ptq_ppl"):
            if not math.isclose(other[key], first[key], rel_tol=1e-6):
                raise ValueError(f"the runs differ in {key} ({first[key]} vs {other[key]}): not the same start")
    methods: dict[str, dict] = {}
    for summary in summaries:
        for m in summary["methods"]:
            methods.setdefault(m["method"], m)  # `none` may appear in several parts; it is the same row
    names = order or list(methods)
    missing = [n for n in names if n not in methods]
    if missing:
        raise ValueError(f"no run holds {', '.join(missing)}")
    return {**first, "methods": [methods[n] for n in names]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of runs with a compare stage")
    parser.add_argument("--to", type=Path, help="write comparison.json/.md and recovery.png here (default: the run)")
    parser.add_argument("--order", nargs="+", help="the methods' order in the table (default: as found)")
    args = parser.parse_args()
    try:
        sources = [run / "comparison.json" for run in args.runs]
        absent = [str(s) for s in sources if not s.is_file()]
        if absent:
            raise ValueError(f"{', '.join(absent)} not found: give output folders of runs with a compare stage")
        if len(sources) > 1 and args.to is None:
            raise ValueError("merging several runs needs --to")
        summary = merge([json.loads(s.read_text()) for s in sources], args.order)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_outputs(args.to or args.runs[0], summary)


if __name__ == "__main__":
    main()
