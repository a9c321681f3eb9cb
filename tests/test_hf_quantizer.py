"""A packed export loads the Hugging Face way: from_pretrained, pipeline, generate, Trainer, with the checkpoint checks
on that path. The oracle is the in-memory quantized model (reference kernel: bit for bit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_export import ids, logits, quantize, refresh_manifest, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

import gift_quant  # noqa: F401 (registers gift_sw)
from gift_quant.checkpoint import CheckpointError
from gift_quant.export import export_packed
from gift_quant.packing import PackedLinear, packed_linears, set_kernel
from gift_quant.quantizer import QuantSpec

BF16_REL = 2.0**-5  # two layers of bf16 activations, relative to max |logit|


@pytest.fixture(scope="module")
def in_memory():
    # Groups of 32 fit the int4 kernel (q/k/v/o/gate/up); down_proj's groups of 16 fall back to the reference.
    spec_of = lambda name: QuantSpec(bits=3, group_size=16 if "down" in name else 32, sym=False)  # noqa: E731
    return quantize(tiny_llama(), spec_of=spec_of)


@pytest.fixture(scope="module")
def export(in_memory, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "packed"
    export_packed(in_memory, tiny_tokenizer(), out, quant_info={"salient": {"count": 3}})
    return out


def test_from_pretrained_builds_packed_linears(export, in_memory):
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    modules = packed_linears(model)
    assert len(modules) == 14 and model.config.quantization_config.quant_method == "gift_sw"
    assert model.gift_quant_config["salient"] == {"count": 3}
    kernels = {n.rsplit(".", 1)[1]: m.kernel_used for n, m in modules.items()}
    assert kernels["q_proj"] == "int4_cpu" and "kernel groups" in kernels["down_proj"]
    x = ids()
    fast = logits(model, x)
    want = logits(in_memory, x)
    assert (fast - want).abs().max() <= BF16_REL * want.abs().max()
    set_kernel(model, "reference")
    assert torch.equal(logits(model, x), want)


def test_pipeline_and_generate_take_the_folder(export):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(export), dtype=torch.float32)
    assert isinstance(generator.model.model.layers[0].self_attn.q_proj, PackedLinear)
    text = generator("w5 w6 w7", max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    model, tok = generator.model, generator.tokenizer
    prompt = tok("w5 w6 w7", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape[1] == prompt.shape[1] + 5
    assert text.split() == tok.decode(out[0, prompt.shape[1]:]).split()


def test_checkpoint_checks_apply_on_from_pretrained(export, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(bad)
    shutil.rmtree(bad)
    shutil.copytree(export, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="manifest"):  # config.json is covered by the manifest too
        AutoModelForCausalLM.from_pretrained(bad)
    refresh_manifest(bad)  # a consistent manifest, but tensors shaped for 3 bits: caught before loading
    with pytest.raises(CheckpointError, match="qweight|qzeros"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("first,torch_imported", [("import gift_quant", "False"),  # stays light (--dry-run)
                                                   ("import gift_quant.hf_quantizer", "True")])
def test_importing_gift_quant_registers_gift_sw(export, first, torch_imported):
    code = (f"import sys; {first}; print('torch' in sys.modules)\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(export)!r})\n"
            "print(type(m.model.layers[1].mlp.up_proj).__name__, m.dtype)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [torch_imported, "PackedLinear", "torch.float16"]  # dtype "auto": the export's


def test_trainer_evaluates_the_export(export, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    x = ids(4, 12)
    with torch.no_grad():
        want = model(x, labels=x).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], per_device_eval_batch_size=4,
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=[{"input_ids": r, "labels": r} for r in x])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_save_pretrained_points_to_export_packed(export, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")
    info = export_packed(model, None, tmp_path / "again", quant_info=model.gift_quant_config)
    assert info["quantized_linears"] == 14
