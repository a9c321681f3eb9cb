"""Shared fixtures: tiny random Llama models (seconds on a CPU) and a tiny tokenizer-free setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GIFT_QUANT_DATA", REPO.parent / "shared" / "data"))


def tiny_llama(seed: int = 0, tie: bool = False, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, use_cache=False, **overrides)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext2_test.raw").is_file():
        pytest.skip(f"shared data not found at {DATA_DIR} (set GIFT_QUANT_DATA)")
    return DATA_DIR
