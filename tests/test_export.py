"""Tests for gift_quant/export.py: packed checkpoint write/load, dense export, validation, size accounting.

Models are tiny random Llamas quantized with RTN into MixedPrecisionLinear. Their parameters, scales and salient
weights are first rounded to fp16 (the format stores them in fp16), so a float32 reload must reproduce the
in-memory model bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import import_tool

from gift_quant.checkpoint import CheckpointError
from gift_quant.hf_quantizer import load_quantized
from gift_quant.export import export_dense, export_packed, size_report
from gift_quant.layers import MixedPrecisionLinear, quantized_modules, replace_linears
from gift_quant.packing import PackedLinear
from gift_quant.quantizer import QuantSpec, rtn
from gift_quant.rotate import RotateSpec, rotate_model

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# fp16 reload vs float32 in-memory model: every tensor and activation rounded to 11 significant bits through two
# layers; logits here are O(1).
FP16_ATOL = 5e-3


def tiny_llama(tie: bool = True, bias: bool = False, inter: int = 80, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tie,
        initializer_range=0.1, attention_bias=bias, mlp_bias=bias,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            p.copy_(p.half().float())  # fp16-representable, as the checkpoint stores them
    return model


def quantize(model, spec_of=lambda name: QuantSpec(bits=3, group_size=16, sym=False), k: int = 3, only=None):
    """RTN every target linear (or those in ``only``) into MixedPrecisionLinear, k salient columns each."""
    records = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS and (only is None or name in only):
            g = torch.Generator().manual_seed(len(records))
            salient = torch.randperm(mod.in_features, generator=g)[:k]
            qw = rtn(mod.weight.detach(), spec_of(name), salient)
            qw.scales = qw.scales.half().float()
            records[name] = qw
    replace_linears(model, records, lambda qw, b: MixedPrecisionLinear.from_quantized(qw, b))
    return model.eval()  # fresh modules start in training mode (noise on)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", pad_token="w2")


def ids(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def refresh_manifest(folder: Path) -> None:
    """Re-hash every file, as a tamperer who also updates the manifest would."""
    manifest = json.loads((folder / "gift_quant_manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "gift_quant_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def quantized():
    return quantize(tiny_llama())


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "packed"
    info = export_packed(quantized, tiny_tokenizer(), out, quant_info={"bits": 3, "salient": {"metric": "gift", "count": 3}})
    return out, info


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------


def test_folder_layout_and_config(exported, quantized):
    out, info = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "gift_quant_manifest.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(out.parent.glob(".packed*"))  # no temporary sibling left
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gift_sw" and qc["format_version"] == 1
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (3, 16, False, False)
    assert qc["salient"] == {"metric": "gift", "count": 3} and qc["rotation"] is None
    assert qc["modules"] == sorted(quantized_modules(quantized))
    tensors = read_tensors(out)
    q = "model.layers.1.mlp.down_proj"  # in_features 80: 3-bit rows padded to 96 codes = 9 words
    assert {k.removeprefix(q + ".") for k in tensors if k.startswith(q + ".")} == {
        "qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight", "weight"}
    assert tensors[f"{q}.weight"].shape == (1,)  # the guard: plain nn.Linear cannot take it (checkpoint.GUARD_SUFFIX)
    assert tensors[f"{q}.qweight"].shape == (9, 64) and tensors[f"{q}.scales"].shape == (5, 64)
    assert tensors["model.norm.weight"].dtype == torch.float16
    assert "lm_head.weight" not in tensors  # tied to the embeddings, saved once (HF convention)
    manifest = json.loads((out / "gift_quant_manifest.json").read_text())["files"]
    assert set(manifest) == names - {"gift_quant_manifest.json"}
    assert manifest["model.safetensors"]["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_float32_reload_is_bit_exact(exported, quantized):
    model = load_quantized(exported[0], dtype=torch.float32, kernel="reference")
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in quantized_modules(quantized))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = ids()
    assert torch.equal(logits(model, x), logits(quantized, x))


def test_float16_reload_within_tolerance(exported, quantized):
    model = load_quantized(exported[0])  # default dtype float16
    assert model.model.embed_tokens.weight.dtype == torch.float16
    x = ids()
    torch.testing.assert_close(logits(model, x).float(), logits(quantized, x), rtol=0, atol=FP16_ATOL)


def test_greedy_generation_identical(exported, quantized):
    model = load_quantized(exported[0], dtype=torch.float32, kernel="reference")
    prompt = ids(1, 4)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(model.generate(prompt, **kwargs), quantized.generate(prompt, **kwargs))


def test_reloaded_model_exports_identical_tensors(exported, tmp_path):
    model = load_quantized(exported[0], dtype=torch.float32, kernel="reference")
    info = export_packed(model, None, tmp_path / "again", quant_info=model.gift_quant_config)
    first, second = read_tensors(exported[0]), read_tensors(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["salient"] == {
        "metric": "gift", "count": 3}
    assert info["bits_per_weight"] == exported[1]["bits_per_weight"]


def test_sharded_export_loads_identically(quantized, tmp_path):
    out = tmp_path / "sharded"
    export_packed(quantized, None, out, quant_info={}, max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(p.stat().st_size <= 20_000 + 8192 for p in out.glob("model-*.safetensors"))  # + header
    x = ids()
    assert torch.equal(logits(load_quantized(out, dtype=torch.float32, kernel="reference"), x), logits(quantized, x))


def test_untied_model_with_biases_and_bfloat16(tmp_path):
    model = quantize(tiny_llama(tie=False, bias=True))
    out = tmp_path / "bf16"
    export_packed(model, None, out, quant_info={}, dtype=torch.bfloat16)
    tensors = read_tensors(out)
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16  # format: always fp16
    loaded = load_quantized(out, dtype=torch.float32, kernel="reference")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    x = ids()
    # bf16 rounds the unquantized parameters and biases (salient weights stay fp16): round the reference alike.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("salient_weight", "scales", "zeros")):  # the grid is stored as it is
                p.copy_(p.bfloat16().float())
        for m in quantized_modules(model).values():
            m.bias.copy_(m.bias.bfloat16().float())
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_mixed_bits_are_recorded_per_module(tmp_path):
    spec_of = lambda name: QuantSpec(bits=2 if "mlp" in name else 4, group_size=-1, sym="k_proj" in name)  # noqa
    model = quantize(tiny_llama(layers=1), spec_of=spec_of, k=2)
    out = tmp_path / "mixed"
    export_packed(model, None, out, quant_info={})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, -1, False)  # 4 attention linears, 3 MLP ones
    assert qc["module_overrides"]["model.layers.0.mlp.up_proj"] == {"bits": 2, "group_size": -1, "sym": False}
    assert qc["module_overrides"]["model.layers.0.self_attn.k_proj"] == {"bits": 4, "group_size": -1, "sym": True}
    x = ids()
    assert torch.equal(logits(load_quantized(out, dtype=torch.float32, kernel="reference"), x), logits(model, x))


def test_quant_info_must_agree_with_the_tensors(quantized, tmp_path):
    with pytest.raises(ValueError, match="bits"):
        export_packed(quantized, None, tmp_path / "bad", quant_info={"bits": 4})
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------------------
# Rotation and dense export
# ----------------------------------------------------------------------------------------------------------------


def test_rotation_record_restores_online_modules(tmp_path):
    model = tiny_llama(inter=96)  # 96 = 12·8: a Hadamard order
    record = rotate_model(model, RotateSpec(online_down_hadamard=True))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    quantize(model)
    out = tmp_path / "rotated"
    export_packed(model, None, out, quant_info={"rotation": record})
    loaded = load_quantized(out, dtype=torch.float32, kernel="reference")
    assert hasattr(loaded.model.layers[0].mlp, "online_rotation")
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(ValueError, match="online_rotation"):
        export_dense(loaded, None, tmp_path / "dense")


def test_dense_export_matches_packed_model(exported, tmp_path):
    packed = load_quantized(exported[0], dtype=torch.float32, kernel="reference")
    out = tmp_path / "dense"
    export_dense(packed, tiny_tokenizer(), out, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(type(dense.get_submodule(n)) is torch.nn.Linear for n in quantized_modules(packed))
    for name, m in quantized_modules(packed).items():
        assert torch.equal(dense.get_submodule(name).weight, m.to_quantized_weight().dequantize())
    x = ids()
    # One dense matmul vs low-bit + salient matmuls: float32 summation-order differences only.
    torch.testing.assert_close(logits(dense, x), logits(packed, x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Size accounting
# ----------------------------------------------------------------------------------------------------------------


def test_bits_per_weight_hand_count(tmp_path):
    model = tiny_llama(layers=1, inter=96)
    dense_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    specs = {"model.layers.0.self_attn.q_proj": QuantSpec(bits=4, group_size=32, sym=True),
             "model.layers.0.mlp.down_proj": QuantSpec(bits=3, group_size=32, sym=False)}
    quantize(model, spec_of=specs.__getitem__, k=2, only=specs)
    # q_proj 64×64, 4-bit, 2 groups, k=2: qweight 8·64·4 = 2048, qzeros 2·8·4 = 64, scales 2·64·2 = 256,
    #   g_idx 64·4 = 256, salient_idx 2·4 = 8, salient_weight 64·2·2 = 256 -> 2888 bytes for 4096 weights.
    # down_proj 64×96, 3-bit, 3 groups, k=2: qweight 9·64·4 = 2304, qzeros 3·6·4 = 72, scales 3·64·2 = 384,
    #   g_idx 96·4 = 384, salient_idx 8, salient_weight 256 -> 3408 bytes for 6144 weights.
    expected_bits = (2888 + 3408) * 8 / (4096 + 6144)
    assert expected_bits == pytest.approx(4.91875)
    report = size_report(model)
    assert report["bits_per_weight"] == pytest.approx(expected_bits, abs=1e-12)
    assert report["quantized_weights"] == 10240 and report["quantized_bytes"] == 6296
    assert report["fp16_bytes"] == 2 * dense_params
    out = tmp_path / "hand"
    export_packed(model, None, out, quant_info={})
    on_disk = size_report(out)
    assert on_disk["bits_per_weight"] == pytest.approx(expected_bits, abs=1e-12)
    assert on_disk["fp16_bytes"] == 2 * dense_params
    assert on_disk["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert on_disk["ratio"] == pytest.approx(on_disk["checkpoint_bytes"] / (2 * dense_params))
    # The file holds the tensors plus a small JSON header.
    assert 0 < on_disk["checkpoint_bytes"] - report["checkpoint_bytes"] < 8192


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(exported, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(exported[0], dst)
    return dst


def assert_rejected(folder: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        load_quantized(folder, dtype=torch.float32, kernel="reference")
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_truncated_file_is_rejected(copy_of):
    f = copy_of / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_rejected(copy_of, "truncated")


def test_flipped_byte_is_rejected(copy_of):
    f = copy_of / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert_rejected(copy_of, "sha256")


def test_missing_manifest_or_file_is_rejected(copy_of):
    (copy_of / "tokenizer.json").unlink()
    assert_rejected(copy_of, "missing")
    (copy_of / "gift_quant_manifest.json").unlink()
    assert_rejected(copy_of, "gift_quant_manifest.json")


@pytest.mark.parametrize("key,value,match", [("bits", 4, "qweight|qzeros"), ("group_size", 32, "qzeros|scales"),
                                              ("sym", True, "sym"), ("dtype", "bfloat16", "bfloat16")])
def test_config_disagreeing_with_tensors_is_rejected(copy_of, key, value, match):
    config = json.loads((copy_of / "config.json").read_text())
    config["quantization_config"][key] = value
    (copy_of / "config.json").write_text(json.dumps(config))
    refresh_manifest(copy_of)
    assert_rejected(copy_of, match)


def test_missing_tensor_is_rejected(copy_of):
    from safetensors.torch import save_file

    tensors = read_tensors(copy_of)
    del tensors["model.layers.0.mlp.up_proj.qzeros"]
    save_file(tensors, copy_of / "model.safetensors", metadata={"format": "pt"})
    refresh_manifest(copy_of)
    assert_rejected(copy_of, "qzeros")


def test_not_a_gift_checkpoint_is_rejected(tmp_path):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "plain")
    assert_rejected(tmp_path / "plain", "manifest")
    assert_rejected(tmp_path / "nowhere", "not a checkpoint folder")


def test_failed_export_leaves_previous_folder_intact(exported, quantized, tmp_path):
    import shutil

    out = tmp_path / "target"
    shutil.copytree(exported[0], out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_packed(quantized, BrokenTokenizer(), out, quant_info={})
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # temporary sibling removed
    load_quantized(out, dtype=torch.float32, kernel="reference")  # the previous export is untouched and still valid
    with pytest.raises(RuntimeError):
        export_packed(quantized, BrokenTokenizer(), tmp_path / "fresh", quant_info={})
    assert not (tmp_path / "fresh").exists()


# ----------------------------------------------------------------------------------------------------------------
# GPTQ interop
# ----------------------------------------------------------------------------------------------------------------


def gptq_dequantize(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The GPTQ v1 4-bit dequantization (AutoGPTQ's torch path): (in, out) weight from the packed tensors."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & 15  # (groups, out/8, 8)
    zeros = zeros.reshape(qzeros.shape[0], -1) + 1
    weight = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 15  # (in/8, 8, out)
    weight = weight.reshape(-1, qweight.shape[1])
    g = g_idx.long()
    return scales.float()[g] * (weight - zeros[g]).float()


def test_zero_salient_4bit_sym_export_follows_gptq_v1(tmp_path):
    model = quantize(tiny_llama(), spec_of=lambda n: QuantSpec(bits=4, group_size=16, sym=True), k=0)
    out = tmp_path / "gptq_like"
    export_packed(model, None, out, quant_info={})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (
        4, 16, True, False, "gptq")
    tensors = read_tensors(out)
    for name, m in quantized_modules(model).items():
        t = {s: tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx", "salient_idx")}
        out_f, in_f = m.out_features, m.in_features
        assert t["qweight"].shape == (in_f // 8, out_f) and t["qweight"].dtype == torch.int32
        assert t["qzeros"].shape == (in_f // 16, out_f // 8) and t["qzeros"].dtype == torch.int32
        assert t["scales"].shape == (in_f // 16, out_f) and t["scales"].dtype == torch.float16
        assert torch.equal(t["g_idx"], (torch.arange(in_f) // 16).to(torch.int32))
        assert t["salient_idx"].numel() == 0
        assert torch.all(t["qzeros"] == 0x77777777)  # zero point 8 stored as 7 in every nibble
        ref = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]).T
        assert torch.equal(ref, m.to_quantized_weight().dequantize())


def test_gptq_interop_tool_structure_check(tmp_path, capsys):
    check_gptq_interop = import_tool("check_gptq_interop")
    gptq_like = quantize(tiny_llama(), spec_of=lambda n: QuantSpec(bits=4, group_size=16, sym=True), k=0)
    export_packed(gptq_like, None, tmp_path / "gptq_like", quant_info={})
    _, problems = check_gptq_interop.structure_problems(tmp_path / "gptq_like")
    assert problems == []
    export_packed(quantize(tiny_llama(), k=2), None, tmp_path / "gift", quant_info={})
    _, problems = check_gptq_interop.structure_problems(tmp_path / "gift")
    assert any("salient" in p for p in problems)
    assert check_gptq_interop.main([str(tmp_path / "gift")]) == 1


def test_gptq_interop_tool(tmp_path):
    for module in ("gptqmodel", "optimum"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: a GPTQ backend is needed to load the export with transformers")
    import subprocess

    model = quantize(tiny_llama(), spec_of=lambda n: QuantSpec(bits=4, group_size=16, sym=True), k=0)
    export_packed(model, tiny_tokenizer(), tmp_path / "gptq_like", quant_info={})
    run = subprocess.run([sys.executable, str(REPO / "tools" / "check_gptq_interop.py"), str(tmp_path / "gptq_like")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr


def test_bench_inference_tiny_smoke(capsys):
    bench_inference = import_tool("bench_inference")
    args = ["--tiny", "--new-tokens", "4", "--prompt-tokens", "4", "--repeats", "1", "--in-process"]
    result = bench_inference.main(args)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "ratio" in printed
    assert result["checkpoint_bytes"] > 0 and result["packed"]["tokens_per_s"] > 0
    assert result["dense"]["tokens_per_s"] > 0 and result["speed_ratio"] > 0
