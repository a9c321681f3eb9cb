"""Shared fixtures: tiny random models of every supported architecture (seconds on a CPU) and tiny tokenizers."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Tiny tensors: one thread avoids OpenMP spin contention on small shared machines (measured 30x slowdowns).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GIFT_QUANT_DATA", REPO.parent / "shared" / "data"))


def import_tool(name: str):
    """A script of ``tools/`` as a module (the tools are scripts, not a package; ``tools/`` leaves sys.path after)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def tiny_llama(seed: int = 0, tie: bool = False, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, use_cache=False, **overrides)
    return LlamaForCausalLM(cfg).to(dtype).eval()


# Per-architecture settings of the tiny models: sliding windows shorter than the test sequences, and Gemma's mix of
# sliding-window and full-attention layers, so that layers really are called with different masks.
TINY_OVERRIDES = {
    "mistral": {"sliding_window": 16},
    "gemma2": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
}


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """A tiny random causal LM of ``model_type`` from its transformers config class (offline): hidden 64, 2 layers,
    vocab 128, lm_head tied as the family usually does, non-trivial norm scales and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gift_quant.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(model_type)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=bool(arch and arch.tied_embeddings), use_cache=False,
        **{**TINY_OVERRIDES.get(model_type, {}), **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    unit = 0.0 if arch is not None and arch.norm == "1+w" else 1.0  # the scale a fresh norm starts at
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(unit + torch.empty_like(p).uniform_(-0.5, 0.5))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext2_test.raw").is_file():
        pytest.skip(f"shared data not found at {DATA_DIR} (set GIFT_QUANT_DATA)")
    return DATA_DIR


class CharTokenizer:
    """Byte-level stand-in for a HF tokenizer (ids 0..255 = bytes, 256 = EOS): enough for the data functions."""

    eos_token_id = 256

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = list(text.encode("utf-8"))
        return type("Encoding", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def offline(monkeypatch):
    """No Hub access, whatever the environment says (the libraries read HF_HUB_OFFLINE once, at import)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def char_hf_tokenizer(bos: bool = False):
    """A real (saveable) HF fast tokenizer over printable ASCII: one token per character, ids < 103; with a BOS
    token ``<s>`` (never added by itself) when ``bos``."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(string.printable)}
    vocab.update({"</s>": len(vocab), "<unk>": len(vocab) + 1, "<s>": len(vocab) + 2})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   **({"bos_token": "<s>"} if bos else {}))


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """Run a recipe (YAML text) end to end on a tiny model (``run.build``, a tiny Llama unless set) with a character
    tokenizer (``run.tokenizer``) and local text files; ``run.model`` is the model the last run worked on."""
    import random

    import gift_quant.models as models
    from gift_quant.recipe import main

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n)) + "."  # noqa: E731
    (tmp_path / "train.jsonl").write_text("\n".join(f'{{"text": "{text(120)}"}}' for _ in range(40)))
    (tmp_path / "eval.txt").write_text(text(3000))

    def load(cfg):  # a fresh model each run
        run.model = run.build()
        return run.model, run.tokenizer()

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))  # teacher logits of tiny models stay here

    def run(recipe_yaml: str, *extra: str) -> tuple[int, Path]:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe_yaml.replace("TRAIN", str(tmp_path / "train.jsonl"))
                        .replace("EVAL", str(tmp_path / "eval.txt")))
        out = run.last_out = tmp_path / "out"
        return main([str(path), "--output-dir", str(out), *extra]), out

    run.build, run.tokenizer, run.model = tiny_llama, char_hf_tokenizer, None
    return run
