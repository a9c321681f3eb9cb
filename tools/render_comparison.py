"""Write a compare stage's comparison.md and recovery.png again from its comparison.json, with the current report
code (e.g. the equal-CPU view for a run made before that view existed). Nothing is trained or evaluated.

    python tools/render_comparison.py OUT            # OUT holds comparison.json; rewrites OUT/comparison.*
    python tools/render_comparison.py OUT --to docs/comparison_3bit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gift_quant.compare import write_outputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the compare run's output folder (holds comparison.json)")
    parser.add_argument("--to", type=Path, help="write comparison.json/.md and recovery.png here instead")
    args = parser.parse_args()
    source = args.run / "comparison.json"
    if not source.is_file():
        print(f"error: {source} not found: give the output folder of a run with a compare stage", file=sys.stderr)
        sys.exit(2)
    write_outputs(args.to or args.run, json.loads(source.read_text()))


if __name__ == "__main__":
    main()
