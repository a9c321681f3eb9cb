"""Malformed inputs through the command line: every one ends in one line on stderr and exit code 2, with no
traceback, before any work, and nothing outside the output folder changes.

The cases are kinds a new user hits: broken recipes and --set values, stage orders that cannot work, model folders
that are missing, garbage, non-finite or of an unknown architecture, settings that do not fit the model, data files
that are missing, not UTF-8, malformed or too short, and output and export paths that would lose data. The recipe
runs in-process through ``gift_quant.recipe.main`` (the command line's own entry point) on a tiny Llama saved to
disk; a few cases also run as a real subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gift_quant.recipe import main

from conftest import char_hf_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]

GOOD = """
model: {name: MODEL}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 2}
  - calibrate: {dataset: TRAIN, num_samples: 4, seq_len: 32}
  - select: {metric: gift, count: 4}
  - quantize: {method: gptq, bits: 3}
  - recover: {dataset: TRAIN, max_steps: 1, seq_len: 32, eval_dataset: EVAL}
  - export: {}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A user's folder: a tiny model, good and bad text files, and a file and a folder that must survive."""
    ws = tmp_path_factory.mktemp("ws")
    tiny_llama().save_pretrained(ws / "model")
    char_hf_tokenizer().save_pretrained(ws / "model")
    words = " ".join(["the cat sat on the mat and the dog ran far away home."] * 40)
    (ws / "train.jsonl").write_text("\n".join(json.dumps({"text": words}) for _ in range(20)))
    (ws / "eval.txt").write_text(words * 3)
    (ws / "latin1.txt").write_bytes(("café " * 200).encode("latin-1"))
    (ws / "utf16.txt").write_bytes(("the cat " * 200).encode("utf-16"))
    (ws / "numbers.jsonl").write_text('{"text": 42}\n')
    (ws / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (ws / "short.txt").write_text("too short")
    (ws / "cafe.txt").write_text(words.replace("cat", "café") * 3)  # UTF-8, with a character off ASCII
    (ws / "notes.txt").write_text("keep me")
    (ws / "precious").mkdir()
    (ws / "precious" / "thesis.tex").write_text("years of work")
    (ws / "a_file").write_text("not a folder")
    (ws / "link").symlink_to(ws / "precious")  # export paths that are links: to a folder, to nothing
    (ws / "dangling").symlink_to(ws / "nowhere")
    return ws


def snapshot(ws: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ws)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(ws.rglob("*"))
            if p.is_file() and not str(p.relative_to(ws)).startswith(("out", "recipe", "variants"))}


def variant_model(ws: Path, name: str, change) -> Path:
    """A copy of the tiny model folder with ``change(folder)`` applied."""
    import shutil

    folder = ws / "variants" / name
    if not folder.exists():
        shutil.copytree(ws / "model", folder)
        change(folder)
    return folder


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _nan(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    for p in folder.iterdir():
        p.unlink()
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128)).save_pretrained(folder)
    char_hf_tokenizer().save_pretrained(folder)


def _missing_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _big_tokenizer(folder: Path) -> None:
    """A character tokenizer whose ids start at 100: 203 tokens for an embedding of 128 rows."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: 100 + i for i, c in enumerate(string.printable)}
    vocab.update({"</s>": 200, "<unk>": 201, "<s>": 202})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def _huge_norm(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e6  # finite, but beyond float16
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _tokenizer_without_unk(folder: Path) -> None:
    """A tokenizer (WordLevel) with no unknown token: a character outside its vocabulary cannot be encoded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate("the cat sat on mat and dog ran far away home . </s>".split())}
    tok = Tokenizer(models.WordLevel(vocab=words))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for p in folder.glob("tok*"):
        p.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(folder)


VARIANTS = {"garbage": _garbage, "truncated": _truncated, "nan": _nan, "gpt2": _gpt2,
            "missing_tensor": _missing_tensor, "more_layers": lambda f: _edit_config(f, num_hidden_layers=3),
            "qwen2_without_biases": lambda f: _edit_config(f, model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
            "big_tokenizer": _big_tokenizer, "huge_norm": _huge_norm, "no_unk": _tokenizer_without_unk}
# An alias bomb: 9 levels of ten references to the level below (10^9 values once expanded), a few lines of YAML.
BOMB = "".join(f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i else 'x'] * 10)}]\n" for i in range(9))
INLINE_BOMB = "[" + ", ".join(f"&c{i} [{', '.join([f'*c{i - 1}' if i else 'x'] * 10)}]" for i in range(9)) + "]"
KD = "max_steps: 1, loss: kd, kd_top_k: 1000,"

# case: (recipe edit or None, extra argv, expected words in the message)
CASES = {
    # the recipe file
    "recipe_missing": ("MISSING", [], "recipe not found"),
    "recipe_is_a_folder": ("FOLDER", [], "is a folder"),
    "bad_yaml": ("stages: [evaluate: {max_windows: 3}\n", [], "invalid YAML"),
    "duplicate_key": (GOOD.replace("bits: 3}", "bits: 3, bits: 4}"), [], "duplicate key 'bits'"),
    "latin1_recipe": ("LATIN1", [], "not UTF-8"),
    "utf16_recipe": ("UTF16", [], "not UTF-8"),
    "nested": ("stages: " + "[" * 100 + "]" * 100 + "\n", [], "nested"),
    "unknown_stage": (GOOD.replace("- select:", "- selekt:"), [], "unknown stage 'selekt'"),
    "unknown_key": (GOOD.replace("count: 4", "cuont: 4"), [], "cuont: unknown key"),
    "wrong_type": (GOOD.replace("bits: 3", "bits: three"), [], "bits"),
    "bits_out_of_range": (GOOD.replace("bits: 3", "bits: 5"), [], "bits"),
    "negative_seq_len": (GOOD.replace("seq_len: 64", "seq_len: -64"), [], "seq_len"),
    "bad_target_regex": (GOOD.replace("bits: 3}", "bits: 3, targets: ['q_proj(']}"), [], "not a valid regular"),
    "bad_override_regex": (GOOD.replace("count: 4}", "count: 4, overrides: {'*': 2}}"), [], "not a valid regular"),
    "select_after_quantize": (GOOD.replace("  - select: {metric: gift, count: 4}\n", "").replace(
        "  - recover:", "  - select: {count: 4}\n  - recover:"), [], "must come before a quantize stage"),
    "quantize_twice": (GOOD.replace("  - recover:", "  - quantize: {bits: 4}\n  - recover:"), [],
                       "at most one quantize"),
    "export_first": (GOOD.replace("  - evaluate:", "  - export: {}\n  - evaluate:", 1), [], "needs the quantized"),
    "recover_before_quantize": (GOOD.replace("  - calibrate:", "  - recover: {dataset: TRAIN}\n  - calibrate:"), [],
                                "needs the quantized model"),
    "export_after_lora": (GOOD.replace("max_steps: 1,", "method: lora, max_steps: 1,"), [], "LoRA"),
    "rotate_after_quantize": (GOOD.replace("  - recover:", "  - rotate: {}\n  - recover:"), [], "before the quantize"),
    "empty_output_dir": ("output_dir: ''\n" + GOOD, [], "must name a folder of its own"),
    "empty_output_flag": (GOOD, ["--output-dir", ""], "must name a folder of its own"),
    "set_bad_yaml": (GOOD, ["--set", "stages.quantize.bits=[3"], "invalid YAML"),
    "set_unknown_stage": (GOOD, ["--set", "stages.quantise.bits=3"], "no stage named 'quantise'"),
    "set_without_value": (GOOD, ["--set", "stages.quantize.bits"], "expected key.path=value"),
    "alias_bomb": (BOMB + GOOD, [], "expands to more than"),
    "alias_bomb_in_an_unknown_key": (GOOD.replace("stages:", BOMB.replace("b0:", "bomb_key:") + "stages:"), [],
                                     "expands to more than"),
    "alias_bomb_in_targets": (GOOD.replace("bits: 3}", f"bits: 3, targets: {INLINE_BOMB}}}"), [],
                              "expands to more than"),
    "alias_bomb_in_set": (GOOD, ["--set", f"stages.quantize.targets={INLINE_BOMB}"], "expands to more than"),
    "alias_nests_deep": ("a: &a " + "[" * 20 + "x" + "]" * 20 + "\nb: " + "[" * 20 + "*a" + "]" * 20 + "\n" + GOOD, [],
                         "nested more than 32 levels"),
    "alias_refers_to_itself": ("x: &a [1, *a]\n" + GOOD, [], "refers to the node that contains it"),
    "negative_seed": (GOOD.replace("seq_len: 32}", "seq_len: 32, seed: -1}", 1), [], "seed"),
    "seed_beyond_32_bits": (GOOD.replace("seq_len: 32}", "seq_len: 32, seed: 4294967296}", 1), [], "seed"),
    "absurd_grid": (GOOD.replace("bits: 3}", "bits: 3, mse: true, grid: 1000000000}"), [], "grid"),
    "absurd_max_steps": (GOOD.replace("max_steps: 1,", "max_steps: 1000000000000,"), [], "estimated at"),
    "kd_top_k_above_vocab": (GOOD.replace("max_steps: 1,", KD), [], "kd_top_k 1000 is more than"),
    "unparseable_shard_size": (GOOD.replace("export: {}", "export: {max_shard_size: lots}"), [], "not a size"),
    # the model
    "model_missing_a_tensor": (GOOD.replace("MODEL", "VARIANT:missing_tensor"), [], "is incomplete"),
    "model_config_has_more_layers": (GOOD.replace("MODEL", "VARIANT:more_layers"), [], "is incomplete"),
    "model_config_type_with_biases": (GOOD.replace("MODEL", "VARIANT:qwen2_without_biases"), [], "is incomplete"),
    "tokenizer_larger_than_embedding": (GOOD.replace("MODEL", "VARIANT:big_tokenizer"), [],
                                        "but the model's embedding only 128 rows"),
    "tokenizer_without_unknown_token": (GOOD.replace("MODEL", "VARIANT:no_unk").replace("EVAL", "WS/cafe.txt", 1),
                                        [], "cannot encode the text"),
    "weights_beyond_float16": (GOOD.replace("MODEL", "VARIANT:huge_norm"), [], "beyond float16"),
    "model_missing": (GOOD.replace("MODEL", "./no_such_model"), [], "model folder not found"),
    "model_is_a_file": (GOOD.replace("MODEL", "NOTES"), [], "neither a folder nor a .gguf"),
    "model_garbage": (GOOD.replace("MODEL", "VARIANT:garbage"), [], "cannot load model"),
    "model_truncated": (GOOD.replace("MODEL", "VARIANT:truncated"), [], "cannot load model"),
    "model_nan": (GOOD.replace("MODEL", "VARIANT:nan"), [], "model.layers.1.mlp.up_proj.weight holds NaN"),
    "model_unknown_architecture": (GOOD.replace("MODEL", "VARIANT:gpt2"), [], "not in gift_quant's architecture"),
    "targets_match_nothing": (GOOD.replace("bits: 3}", r"bits: 3, targets: ['\.wq$']}"), [], "match no linear"),
    "group_size_does_not_divide": (GOOD.replace("bits: 3}", "bits: 3, group_size: 48}"), [], "does not divide"),
    "count_wider_than_layer": (GOOD.replace("count: 4", "count: 1000"), [], "input columns"),
    "override_wider_than_layer": (GOOD.replace("count: 4}", "count: 4, overrides: {'down_proj': 500}}"), [],
                                  "input columns"),
    # the data
    "data_file_missing": (GOOD.replace("EVAL", "WS/absent.txt", 1), [], "unknown data source"),
    "data_dir_missing": ("data: {dir: WS/no_data}\n" + GOOD.replace("EVAL", "wikitext2", 1), [],
                         "data folder not found"),
    "latin1_data": (GOOD.replace("EVAL", "WS/latin1.txt", 1), [], "not UTF-8"),
    "utf16_data": (GOOD.replace("EVAL", "WS/utf16.txt", 1), [], "not UTF-8"),
    "jsonl_text_not_a_string": (GOOD.replace("TRAIN", "WS/numbers.jsonl", 1), [], "not a string"),
    "jsonl_broken": (GOOD.replace("TRAIN", "WS/broken.jsonl", 1), [], "not a JSON object"),
    "eval_shorter_than_a_window": (GOOD.replace("EVAL", "WS/short.txt", 1), [], "fewer than one window"),
    "huge_seq_len": (GOOD.replace("seq_len: 64, max", "seq_len: 1000000000, max"), [], "fewer than one window"),
    "huge_num_samples": (GOOD.replace("num_samples: 4", "num_samples: 10000000"), [], "num_samples"),
    "training_text_too_short": (GOOD.replace("max_steps: 1, seq_len: 32", "max_steps: 1, seq_len: 100000"), [],
                                "one training sequence"),
    "calibrate_on_eval_text": (GOOD.replace("dataset: TRAIN, num", "dataset: wikitext2, num"), [],
                               "is evaluation text"),
    # where results go
    "output_dir_is_a_file": (GOOD, ["--output-dir", "WS/a_file"], "is not a folder"),
    "export_into_output_dir": (GOOD.replace("export: {}", "export: {path: OUT}"), [], "contains the output folder"),
    "export_into_working_dir": (GOOD.replace("export: {}", "export: {path: .}"), [], "contains the working dir"),
    "export_over_a_user_folder": (GOOD.replace("export: {}", "export: {path: WS/precious}"), [],
                                  "not a previous gift_quant export"),
    "export_over_a_file": (GOOD.replace("export: {}", "export: {path: WS/notes.txt}"), [], "not a folder"),
    "export_through_a_link": (GOOD.replace("export: {}", "export: {path: WS/link}"), [], "symbolic link"),
    "export_to_a_dangling_link": (GOOD.replace("export: {}", "export: {path: WS/dangling}"), [], "symbolic link"),
    "export_into_the_runs_own_files": (GOOD.replace("export: {}", "export: {path: OUT/quantize/x}"), [],
                                       "which the run writes"),
}


def recipe_path(ws: Path, text: str) -> Path:
    special = {"MISSING": ws / "nope.yaml", "FOLDER": ws / "precious"}
    if text in special:
        return special[text]
    path = ws / "recipe.yaml"
    if text == "LATIN1":
        path.write_bytes("# café\nstages: [evaluate]\n".encode("latin-1"))
        return path
    if text == "UTF16":
        path.write_bytes("stages: [evaluate]\n".encode("utf-16"))
        return path
    if "VARIANT:" in text:
        name = text.split("VARIANT:")[1].split("}")[0]
        folder = variant_model(ws, name, VARIANTS[name])
        text = text.replace(f"VARIANT:{name}", str(folder))
    text = (text.replace("MODEL", str(ws / "model")).replace("TRAIN", str(ws / "train.jsonl"))
            .replace("EVAL", str(ws / "eval.txt")).replace("NOTES", str(ws / "notes.txt"))
            .replace("OUT", str(ws / "out")).replace("WS", str(ws)))
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch, offline):
    text, extra, expected = CASES[case]
    path = recipe_path(workspace, text)
    extra = [a.replace("WS", str(workspace)) for a in extra]
    argv = [str(path), *(["--output-dir", str(workspace / "out")] if "--output-dir" not in extra else []), *extra]
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert snapshot(workspace) == before, "a file outside the output folder changed"
    assert not (workspace / "out").exists(), "work was done before the input was refused"


def test_the_good_recipe_runs(workspace, capsys, monkeypatch, offline):
    """The baseline the cases are made from is itself legitimate."""
    monkeypatch.chdir(workspace)
    out = workspace / "out_good"
    assert main([str(recipe_path(workspace, GOOD)), "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert (out / "packed" / "gift_quant_manifest.json").is_file()


@pytest.mark.parametrize("case", ["model_garbage", "count_wider_than_layer", "latin1_data"])
def test_real_processes_print_one_line_without_traceback(case, workspace):
    text, extra, expected = CASES[case]
    path = recipe_path(workspace, text)
    proc = subprocess.run([sys.executable, "-m", "gift_quant.recipe", str(path), "--output-dir",
                           str(workspace / "out_proc")], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and expected in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] == [proc.stderr.splitlines()[-1]]


def test_a_failed_stage_marks_the_run_failed_and_removes_the_old_export(workspace, capsys, monkeypatch, offline):
    """A rerun that fails after its start says so in results.json, and no earlier export stays beside it."""
    monkeypatch.chdir(workspace)
    out = workspace / "out_rerun"
    assert main([str(recipe_path(workspace, GOOD)), "--output-dir", str(out)]) == 0
    assert (out / "packed").is_dir()
    import gift_quant.recover as recover

    def broken(*args, **kwargs):
        raise recover.UserError("training text vanished")

    monkeypatch.setattr(recover, "run_method", broken)
    assert main([str(recipe_path(workspace, GOOD)), "--output-dir", str(out)]) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "training text vanished" in results["error"]
    assert not (out / "packed").exists()
    assert "Status: **failed**" in (out / "report.md").read_text()


def test_non_finite_numbers_from_a_stage_name_the_module(workspace, capsys, monkeypatch, offline):
    """A stage that produces NaN (here: a learning rate that blows training up) fails with the module named."""
    monkeypatch.chdir(workspace)
    recipe = GOOD.replace("max_steps: 1,", "max_steps: 3, learning_rate: 1.0e+30,").replace("  - export: {}\n", "")
    assert main([str(recipe_path(workspace, recipe)), "--output-dir", str(workspace / "out_nan")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN or Inf" in err and "salient_weight" in err, err
    assert torch.isfinite(torch.tensor(1.0))  # (the check itself runs in the stage; nothing else to assert here)
