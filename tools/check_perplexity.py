"""Independent check of the `smollm2_fp.yaml` perplexity: transformers' own causal-LM loss per window, no gift_quant
perplexity or data code. Same text convention (CR stripped, non-empty lines joined by blank lines), 16 x 2048.

    python tools/check_perplexity.py            # prints 21.0259549 for the cached smollm2-135m on this machine
"""

import math
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

cache = Path(os.environ.get("GIFT_QUANT_CACHE") or Path.home() / ".cache" / "gift_quant") / "smollm2-135m"
data = Path(os.environ.get("GIFT_QUANT_DATA", "../shared/data")) / "wikitext2_test.raw"
tok = AutoTokenizer.from_pretrained(cache)
model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
lines = [ln for ln in data.read_text(encoding="utf-8").replace("\r", "").split("\n") if ln.strip()]
ids = tok("\n\n".join(lines), return_tensors="pt").input_ids[0]
losses = []
with torch.no_grad():
    for w in range(16):  # every window predicts 2047 tokens, so the mean of window means is the token mean
        x = ids[w * 2048 : (w + 1) * 2048][None]
        losses.append(model(input_ids=x, labels=x, use_cache=False).loss.double().item())
print(f"independent perplexity: {math.exp(sum(losses) / len(losses)):.7f}")
