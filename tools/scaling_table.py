"""The per-stage memory and time table of docs/scaling.md: Llama-2 7B, 13B and 70B on one 80 GB GPU, from
``gift_quant.estimate`` (the public configs; nothing is loaded).

The recipe is ``recipes/llama2_3bit.yaml`` followed by GIFT-SW recovery (4 × 4 × 1024 tokens per step, activation
checkpointing, 250 steps, as ``recipes/llama2_3bit_compare.yaml``) with the frozen part dense, then packed, and a
packed export reloaded in fp16. A cell is the stage's peak GPU memory and time; ``host`` the CPU RAM meanwhile.

    python tools/scaling_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gift_quant.estimate import BUILTIN, GB, GPU_MEMORY, Shape, estimate  # noqa: E402
from gift_quant.recipe import load_recipe  # noqa: E402
from gift_quant.stages import parse_recipe, stage_name  # noqa: E402

MODELS = {"7B": "meta-llama/Llama-2-7b-hf", "13B": "meta-llama/Llama-2-13b-hf", "70B": "meta-llama/Llama-2-70b-hf"}
RECOVER = dict(method="gift_sw", batch_size=4, gradient_accumulation_steps=4, seq_len=1024,
               gradient_checkpointing=True, max_steps=250)
LABELS = ["evaluate (fp16)", "calibrate", "select", "quantize (3-bit GPTQ)", "evaluate (quantized, dense)",
          "recover, frozen dense", "recover, frozen packed", "evaluate (packed)", "export + fp16 reload"]


def _through_quantized_evaluation(stages: list) -> list:
    """The recipe's stages up to the evaluation of the quantized model (the table adds its own recovery rows)."""
    names = [stage_name(s) for s in stages]
    after = names.index("quantize") + 1
    return stages[:after + (names[after:after + 1] == ["evaluate"])]


def recipe():
    base = load_recipe(ROOT / "recipes" / "llama2_3bit.yaml").to_dict()
    base["stages"] = _through_quantized_evaluation(base["stages"]) + [
        {"recover": RECOVER}, {"recover": {**RECOVER, "frozen": "packed"}},
        {"evaluate": {"dataset": "wikitext2", "seq_len": 2048}}, {"export": {"format": "packed", "verify": "float16"}}]
    return parse_recipe(base)


def cell(row) -> str:
    over = " **> 80 GB**" if row.peak > GPU_MEMORY else ""
    return f"{row.peak / GB:.1f} GB{over}, {_time(row.seconds)}"


def _time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def table() -> str:
    r = recipe()
    # A dense recover right after a packed one would train packed layers (the model stays packed): each variant
    # is estimated on the quantized model, as its own recipe would run it.
    columns = {}
    for label, hub_id in MODELS.items():
        shape = Shape.from_config(BUILTIN[hub_id])
        rows = estimate(r.model_copy(update={"stages": r.stages[:6]}), shape)
        rest = estimate(r.model_copy(update={"stages": r.stages[:5] + r.stages[6:]}), shape)[5:]
        columns[label] = (rows + rest, shape)
    lines = ["| stage | " + " | ".join(f"Llama-2-{m} ({s.params / 1e9:.1f}B)" for m, (_, s) in columns.items()) + " |",
             "|---|" + "---:|" * len(columns)]
    for i, label in enumerate(LABELS):
        lines.append(f"| {label} | " + " | ".join(cell(rows[i]) for rows, _ in columns.values()) + " |")
    host = [max(row.host for row in rows) for rows, _ in columns.values()]
    lines.append("| host RAM, most of any stage | " + " | ".join(f"{h / GB:.0f} GB" for h in host) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
