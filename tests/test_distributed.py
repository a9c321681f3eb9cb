"""Several processes on one recipe (gift_quant/distributed.py): torchrun with 2 CPU processes (gloo) against one
process at the same global batch. The reference is the one-process run itself, through the same command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, char_hf_tokenizer, tiny_llama
from gift_quant import distributed
from gift_quant.training import micro_batch_seed

RECIPE = """
model: {{name: {dir}/model, dtype: float32, device: cpu}}
stages:
  - evaluate: {{dataset: {dir}/eval.txt, seq_len: 64, max_windows: 5}}
  - calibrate: {{dataset: {dir}/train.jsonl, num_samples: 8, seq_len: 64}}
  - select: {{count: 4}}
  - quantize: {{bits: 3}}
  - recover: {{method: gift_sw, dataset: {dir}/train.jsonl, max_steps: 4, seq_len: 64, learning_rate: 1.0e-3,
              gradient_accumulation_steps: {accumulation}, eval_dataset: {dir}/eval.txt, eval_steps: 2,
              eval_windows: 3, eval_seq_len: 64}}
  - evaluate: {{dataset: {dir}/eval.txt, seq_len: 64, max_windows: 5}}
  - export: {{format: packed, verify: float32}}
"""


def test_micro_batch_seeds_depend_on_seed_step_and_place_only():
    seeds = {micro_batch_seed(s, step, i) for s in (0, 1) for step in range(3) for i in range(4)}
    assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)
    assert micro_batch_seed(0, 2, 1) == micro_batch_seed(0, 2, 1)


def test_a_single_process_needs_no_process_group():
    assert not distributed.active() and distributed.is_main()
    assert distributed.gather({"a": 1}) == [{"a": 1}] and distributed.from_main(3) == 3
    assert list(distributed.my_share(5)) == [0, 1, 2, 3, 4]
    with distributed.rank0_first():
        pass


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "model")
    char_hf_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n)) + "."  # noqa: E731
    (tmp_path / "train.jsonl").write_text("\n".join(f'{{"text": "{text(120)}"}}' for _ in range(40)))
    (tmp_path / "eval.txt").write_text(text(3000))
    return tmp_path


def _run(workdir: Path, name: str, launcher: list[str], accumulation: int) -> tuple[Path, str]:
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(RECIPE.format(dir=workdir, accumulation=accumulation))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GIFT_QUANT_CACHE": str(workdir / "cache")}
    out = workdir / name
    done = subprocess.run([*launcher, "-m", "gift_quant.recipe", str(recipe), "--output-dir", str(out)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout + done.stderr


def _trained(out: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted((out / "recover" / "gift_sw").glob("checkpoint-*"))  # save_total_limit 1: the final one
    return load_file(str(last / "trainable.safetensors"))


@pytest.mark.slow
def test_two_processes_train_exactly_as_one_at_the_same_global_batch(workdir):
    one, _ = _run(workdir, "one", [sys.executable], accumulation=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, log = _run(workdir, "two", torchrun, accumulation=1)

    # Quantization ran once: rank 0 computed every layer, rank 1 loaded them without computing activations.
    assert log.count("no activations computed") == 1
    rows_one, rows_two = (json.loads((o / "results.json").read_text()) for o in (one, two))
    assert rows_two["status"] == "complete"
    assert next(r for r in rows_two["results"] if r["stage"] == "quantize")["resumed_layers"] == 0

    # Same global batch, same data order, same GIFT-SW noise per micro-batch: the trained tensors agree. Two halves
    # sum exactly, so at 2 processes they are bit-identical; more processes would sum in another order (rounding).
    a, b = _trained(one), _trained(two)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # Every number of the report (perplexities shared out over the ranks, the curve, the reloaded export) agrees.
    pairs = [(x["metric"], x["value"], y["value"]) for x, y in zip(rows_one["results"], rows_two["results"])]
    assert [p[0] for p in pairs] == [r["metric"] for r in rows_two["results"]]
    assert sum(p[0].endswith("_ppl_training") for p in pairs) == 3 and pairs[-1][0] == "eval_ppl_reloaded"
    for metric, x, y in pairs:
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9), metric

    # Written once: one export, no temporary siblings left by a second writer.
    assert sorted(p.name for p in two.iterdir() if p.name.startswith((".", "packed"))) == ["packed"]
