"""The zero_shot stage: lm-eval on a tiny local multiple-choice task (lm-eval's file task format, offline), checked
against accuracies computed here from the model's own log-likelihoods."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import char_hf_tokenizer, tiny_llama

from gift_quant.stages import parse_recipe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed (pip install 'gift_quant[eval]')")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def write_task(folder: Path, n_docs: int = 10, data: Path | None = None) -> list[dict]:
    rng = random.Random(0)
    docs = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))),
             "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(3)],
             "answer": rng.randrange(3)} for _ in range(n_docs)]
    folder.mkdir(exist_ok=True)
    data = data or folder / "tiny_mc.jsonl"
    if data.parent == folder:
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return docs


@torch.no_grad()
def accuracies(model, tokenizer, docs: list[dict]) -> dict[str, float]:
    """acc: argmax of log p(" " + choice | question); acc_norm: the same divided by the choice's length in
    characters (lm-eval's definitions), from one forward per choice."""
    hits = {"acc": 0, "acc_norm": 0}
    for doc in docs:
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            ids = torch.tensor([tokenizer(doc["question"] + " " + choice).input_ids])
            logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
            targets = ids[0, len(context):]
            scores.append(logp[len(context) - 1:].gather(1, targets[:, None]).sum().item())
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        hits["acc"] += max(range(3), key=scores.__getitem__) == doc["answer"]
        hits["acc_norm"] += max(range(3), key=norm.__getitem__) == doc["answer"]
    return {k: v / len(docs) for k, v in hits.items()}


def rows(out: Path) -> dict[str, dict]:
    return {r["metric"]: r for r in json.loads((out / "results.json").read_text())["results"]
            if r["stage"] == "zero_shot"}


def test_stage_records_the_accuracies_of_the_in_memory_model(tiny_run, tmp_path):
    docs = write_task(tmp_path / "tasks")
    rc, out = tiny_run(f"stages:\n  - zero_shot: {{tasks: [tiny_mc], task_dir: {tmp_path / 'tasks'}, limit: 8}}\n")
    assert rc == 0
    got = rows(out)
    want = accuracies(tiny_llama(), char_hf_tokenizer(), docs[:8])
    assert got["tiny_mc_acc"]["value"] == want["acc"] and got["tiny_mc_acc_norm"]["value"] == want["acc_norm"]
    assert got["tiny_mc_acc"]["limit"] == 8


def test_stage_evaluates_the_export_reloaded_from_disk(tiny_run, tmp_path):
    from gift_quant.hf_quantizer import load_quantized

    docs = write_task(tmp_path / "tasks")
    rc, out = tiny_run("stages:\n  - quantize: {method: rtn, bits: 4, group_size: -1}\n  - export: {}\n"
                       f"  - zero_shot: {{tasks: [tiny_mc], task_dir: {tmp_path / 'tasks'}, model: export}}\n")
    assert rc == 0
    got = rows(out)
    assert got["tiny_mc_acc"]["label"] == "export model after export"
    reloaded = load_quantized(out / "packed", dtype=torch.float32)  # the same fast kernels lm-eval ran on
    assert got["tiny_mc_acc"]["value"] == accuracies(reloaded, char_hf_tokenizer(), docs)["acc"]


@pytest.mark.parametrize("problem", ["missing data file", "unknown task"])
def test_unreachable_task_data_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, problem):
    write_task(tmp_path / "tasks", data=tmp_path / "nowhere" / "tiny_mc.jsonl")
    task = "tiny_mc" if problem == "missing data file" else "no_such_task"
    rc, _ = tiny_run(f"stages:\n  - zero_shot: {{tasks: [{task}], task_dir: {tmp_path / 'tasks'}}}\n")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert ("could not be loaded" if problem == "missing data file" else "no_such_task") in err[0]


def test_export_model_needs_an_export_stage():
    with pytest.raises(ValueError, match="needs an export stage"):
        parse_recipe({"stages": [{"zero_shot": {"tasks": ["piqa"], "model": "export"}}]})
    with pytest.raises(ValueError, match="unknown key"):
        parse_recipe({"stages": [{"zero_shot": {"tasks": ["piqa"], "shots": 5}}]})
