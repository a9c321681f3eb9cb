"""Distillation from the full-precision teacher (gift_quant/teacher.py): the loss against a float64 hand-computed KL,
the top-k cache, and KD training through the recover stage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gift_quant.teacher import kd_loss, kd_loss_full


def coarse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int, t: float) -> torch.Tensor:
    """float64 by hand: KL between the two distributions coarsened to the teacher's top k tokens + one rest bucket."""
    p = torch.softmax(teacher_logits.double() / t, -1)
    q = torch.softmax(student_logits.double() / t, -1)
    total = torch.zeros((), dtype=torch.float64)
    rows = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    for pr, qr in zip(*rows):
        top = pr.topk(k).indices
        kl = sum(pr[i] * (pr[i].log() - qr[i].log()) for i in top.tolist())
        p_rest, q_rest = 1 - pr[top].sum(), 1 - qr[top].sum()
        if p_rest > 0:
            kl = kl + p_rest * (p_rest.log() - q_rest.log())
        total += kl
    return total / rows[0].shape[0] * t * t


def topk_of(teacher_logits: torch.Tensor, k: int, t: float):
    logp = torch.log_softmax(teacher_logits / t, -1).topk(k, -1)
    return logp.values, logp.indices


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kd_loss_with_the_whole_vocabulary_is_the_kl(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    logp, ids = topk_of(teacher, 11, t)
    full = F.kl_div(torch.log_softmax(student.double() / t, -1), torch.log_softmax(teacher.double() / t, -1),
                    log_target=True, reduction="sum") / 10 * t * t
    torch.testing.assert_close(kd_loss(student, logp, ids, t).double(), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_full_vocabulary_kd_loss_is_the_kl_and_the_top_k_loss_at_k_equal_vocabulary(t: float) -> None:
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    full = F.kl_div(torch.log_softmax(student.double() / t, -1), torch.log_softmax(teacher.double() / t, -1),
                    log_target=True, reduction="sum") / 10 * t * t
    torch.testing.assert_close(kd_loss_full(student, teacher, t).double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kd_loss_full(student, teacher, t), kd_loss(student, *topk_of(teacher, 11, t), t),
                               atol=1e-5, rtol=1e-5)
    assert kd_loss_full(teacher, teacher, t).abs() < 1e-6


@pytest.mark.parametrize("k", [1, 3, 8])
def test_kd_loss_on_top_k_equals_the_coarsened_kl(k: int) -> None:
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(3, 4, 13, generator=g) * 2, torch.randn(3, 4, 13, generator=g) * 2
    logp, ids = topk_of(teacher, k, 1.5)
    torch.testing.assert_close(kd_loss(student, logp, ids, 1.5).double(), coarse_kl(teacher, student, k, 1.5),
                               atol=1e-5, rtol=1e-5)


def test_kd_loss_is_zero_when_the_student_is_the_teacher_and_has_its_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 6, 9, generator=g)
    logp, ids = topk_of(teacher, 4, 1.0)
    assert kd_loss(teacher, logp, ids).abs() < 1e-6
    student = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    kd_loss(student, logp, ids).backward()
    s = student.detach().double().requires_grad_()
    coarse_kl(teacher, s, 4, 1.0).backward()
    torch.testing.assert_close(student.grad.double(), s.grad, atol=1e-5, rtol=1e-4)


KD = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - calibrate: {dataset: TRAIN, num_samples: 8, seq_len: 64, batch_size: 4}
  - select: {metric: gift, fraction: 0.125}
  - quantize: {method: gptq, bits: 2}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - recover: {method: gift_sw, loss: LOSS, dataset: TRAIN, max_steps: 6, seq_len: 32, learning_rate: 0.01,
              train_scales: true, scales_learning_rate: 0.001, kd_top_k: 16}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - export: {verify: float32}
"""


def test_kd_recovery_caches_the_teacher_and_exports_trained_scales(tiny_run, tmp_path, monkeypatch) -> None:
    import gift_quant.teacher as teacher

    calls = []
    real = teacher.teacher_model
    monkeypatch.setattr(teacher, "teacher_model", lambda state: calls.append(1) or real(state))
    rc, out = tiny_run(KD.replace("LOSS", "kd"))
    assert rc == 0 and calls  # the teacher ran once to fill the cache ...
    rows = json.loads((out / "results.json").read_text())["results"]
    fp, ptq, recovered = [r["value"] for r in rows if r["metric"] == "eval_ppl"]
    (reloaded,) = [r["value"] for r in rows if r["metric"].endswith("_ppl_reloaded")]
    assert reloaded == pytest.approx(recovered, rel=1e-3)  # trained scales (fp16 in the file) reload as trained
    config = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    assert config["recover"]["loss"] == "kd" and config["recover"]["train_scales"] is True
    calls.clear()
    rc, out = tiny_run(KD.replace("LOSS", "lm+kd"))  # another loss, same blocks: the cached logits serve it
    assert rc == 0 and not calls


def test_teacher_cache_is_per_block_and_reused_by_a_longer_text(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from conftest import tiny_llama
    from gift_quant.teacher import teacher_topk

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path))
    teacher = tiny_llama()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    state = SimpleNamespace(weights_digest="w", recipe=SimpleNamespace(model=SimpleNamespace(dtype="float32")),
                            teacher=teacher, device=torch.device("cpu"), rotation=None)
    blocks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(3))
    (logp3, ids3), computed = teacher_topk(state, blocks[:3], 4, 1.0)
    assert computed and len(calls) == 3
    (logp5, ids5), computed = teacher_topk(state, blocks, 4, 1.0)
    assert computed and len(calls) == 5  # only the two new blocks ran through the teacher
    assert torch.equal(logp5[:3], logp3) and torch.equal(ids5[:3], ids3)
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=blocks).logits.float(), -1).topk(4, -1)
    torch.testing.assert_close(logp5.float(), ref.values, atol=2e-3, rtol=0)  # stored in fp16
    assert torch.equal(ids5.long(), ref.indices)
    _, computed = teacher_topk(state, blocks.flip(0), 4, 1.0)  # reordered: all cached
    assert not computed and len(calls) == 6  # (the one more is the reference forward above)


def test_full_vocabulary_kd_runs_the_teacher_beside_the_student_and_caches_nothing(tiny_run, tmp_path) -> None:
    import gift_quant.teacher as teacher

    seen = []
    real = teacher.kd_loss_full
    teacher.kd_loss_full = lambda s, t, temp=1.0: seen.append(t.shape) or real(s, t, temp)
    try:
        rc, out = tiny_run(KD.replace("LOSS", "kd").replace("kd_top_k: 16", "kd_top_k: null"))
    finally:
        teacher.kd_loss_full = real
    assert rc == 0 and len(seen) == 6  # one teacher forward per training step, over the whole vocabulary
    assert all(shape[-1] == 128 for shape in seen)
    assert not list((tmp_path / "cache").glob("teacher/*/*.safetensors"))
    rows = json.loads((out / "results.json").read_text())["results"]
    assert not [r for r in rows if r["metric"] == "teacher_tokens"]
    fp, ptq, recovered = [r["value"] for r in rows if r["metric"] == "eval_ppl"]
    assert recovered < ptq
