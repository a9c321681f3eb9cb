"""A tiny recipe end to end on one device, then the export reloaded there in fp16 and bf16 with its fast kernel.

    python tools/gpu_tiny_recipe.py [--device cuda] [--workdir DIR]

Builds everything in-tree (no download): a 2-layer random Llama wide enough for GPTQ kernels (hidden 256), a
character tokenizer, local training and evaluation text. Runs evaluate → calibrate → select → quantize (GPTQ 4-bit,
groups of 128) → evaluate → recover (GIFT-SW, 4 steps) → export (packed, verified in float32) through
``python -m gift_quant.recipe`` with ``device: --device``, then reloads the export there and compares its fast path
with the reference path per dtype. Prints which kernel each linear runs; exit 0 when the recipe succeeds and every
dtype's fast logits agree with the reference (and, on CUDA, gptq_cuda runs every linear in every dtype), else 1.
"""

from __future__ import annotations

import argparse
import random
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = """model: {{name: {model}, dtype: float32, device: {device}}}
stages:
  - evaluate: {{dataset: {eval}, seq_len: 64, max_windows: 4}}
  - calibrate: {{dataset: {train}, num_samples: 16, seq_len: 64, batch_size: 4}}
  - select: {{metric: gift, fraction: 0.03125}}
  - quantize: {{method: gptq, bits: 4, group_size: 128, sym: true}}
  - evaluate: {{dataset: {eval}, seq_len: 64, max_windows: 4}}
  - recover: {{method: gift_sw, dataset: {train}, eval_dataset: {eval}, max_steps: 4, seq_len: 64}}
  - export: {{format: packed, verify: float32}}
"""
RTOL = 2.0**-4  # half-precision logits of two summation orders, relative to max |logit|


def build(folder: Path) -> Path:
    """The tiny model and tokenizer saved as a local Hugging Face folder, and the two text files."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(string.printable)}
    vocab.update({"</s>": len(vocab), "<unk>": len(vocab) + 1})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    LlamaForCausalLM(cfg).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n)) + "."  # noqa: E731
    (folder / "train.jsonl").write_text("\n".join(f'{{"text": "{text(120)}"}}' for _ in range(40)))
    (folder / "eval.txt").write_text(text(2000))
    return folder / "model"


def check_export(packed: Path, device: str) -> bool:
    """Fast path against the reference path on the reloaded export, per half dtype."""
    from gift_quant.hf_quantizer import load_quantized
    from gift_quant.packing import set_kernel

    ok = True
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    for dtype in (torch.float16, torch.bfloat16):
        model = load_quantized(packed, device=device, dtype=dtype)
        with torch.no_grad():
            used = set_kernel(model, "auto")
            fast = model(ids).logits.float()
            set_kernel(model, "reference")
            ref = model(ids).logits.float()
        err = ((fast - ref).abs().max() / ref.abs().max()).item()
        good = err <= RTOL and (device != "cuda" or set(used) == {"gptq_cuda"})
        ok &= good
        print(f"  {str(dtype):>14}: kernels {dict(used)}; max|fast − reference| / max|logit| = {err:.2e}"
              f" {'ok' if good else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build(work)
        recipe = work / "recipe.yaml"
        recipe.write_text(RECIPE.format(model=model, device=args.device, train=work / "train.jsonl",
                                        eval=work / "eval.txt"))
        out = work / "out"
        rc = subprocess.run([sys.executable, "-m", "gift_quant.recipe", str(recipe), "--output-dir", str(out)],
                            cwd=REPO).returncode
        if rc != 0:
            print(f"tiny recipe on {args.device}: FAILED (exit {rc})")
            return 1
        print(f"tiny recipe on {args.device}: ok; export reloaded on {args.device}:")
        return 0 if check_export(out / "packed", args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
