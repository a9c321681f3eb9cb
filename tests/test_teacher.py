"""Distillation from the full-precision teacher (gift_quant/teacher.py): the loss against a float64 hand-computed KL,
the top-k cache, and KD training through the recover stage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import import_tool

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


# ---------------------------------------------------------------- where the teacher runs (#24)


def _windows(n: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _home(model) -> list[tuple[int, torch.device]]:
    return [(t.data_ptr(), t.device) for t in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize("model_type", ["llama", "llama_tied", "mistral", "qwen2", "gemma2", "phi3"])
def test_layered_logits_are_the_resident_forward(model_type: str) -> None:
    """float64: one layer at a time on the device gives the whole model's logits (Gemma-2's soft-capping and mixed
    sliding/full masks included), for any chunking; the model keeps its own tensors and layers."""
    from conftest import tiny_causal_lm, tiny_llama
    from gift_quant.layered import layered_logits

    model = (tiny_llama(dtype=torch.float64, tie=model_type == "llama_tied") if model_type.startswith("llama")
             else tiny_causal_lm(model_type).double())
    windows = _windows(5, 24)
    with torch.no_grad():
        ref = model(input_ids=windows, use_cache=False).logits
    before, layers = _home(model), list(model.model.layers)
    for batch in (1, 2, 5):
        got = torch.cat(list(layered_logits(model, windows, torch.device("cpu"), batch)))
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert _home(model) == before and list(model.model.layers) == layers


def test_a_failing_layered_pass_leaves_the_teacher_in_place() -> None:
    from conftest import tiny_llama
    from gift_quant.layered import layered_logits

    model = tiny_llama()
    before, layers = _home(model), list(model.model.layers)

    def boom(module, args, kwargs):
        raise RuntimeError("out of memory")

    handle = model.model.layers[1].register_forward_pre_hook(boom, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(layered_logits(model, _windows(2, 8), torch.device("cpu")))
    handle.remove()
    assert _home(model) == before and list(model.model.layers) == layers


def _measure_teacher():
    """tools/measure_teacher.py: its tracker of created tensors and its check of two sets of top-k targets."""
    return import_tool("measure_teacher")


def test_same_targets_accepts_rounding_and_a_swap_at_the_cut_only() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    logits[0, 0, :2] = logits[0, 0].max() + torch.tensor([1.0, 0.0])  # tokens 0 and 1 win, apart
    order = logits[1, 2].argsort(descending=True)
    logits[1, 2, order[4]] = logits[1, 2, order[3]] - 1e-9  # the 4th and 5th nearly tied at a cut of k = 4
    same = _measure_teacher().same_targets

    def targets(x: torch.Tensor, k: int = 4):
        top = torch.log_softmax(x, -1).topk(k, -1)
        return top.values.half(), top.indices.to(torch.int32)

    assert same(targets(logits), targets(logits + 1e-7 * torch.randn(logits.shape, generator=g, dtype=torch.float64)))
    swapped = logits.clone()
    swapped[1, 2, order[4]] += 2e-9  # rounding lets the 5th token make the cut instead of the 4th
    assert not torch.equal(targets(swapped)[1], targets(logits)[1]) and same(targets(logits), targets(swapped))
    moved = logits.clone()
    moved[0, 0, 1] += 0.5  # a real difference in a log-prob
    assert not same(targets(logits), targets(moved))
    renamed = logits.clone()  # the same log-probs, but the winner and the 5th token trade places: other ids
    first, fifth = renamed[2, 1].argsort(descending=True)[[0, 4]]
    renamed[2, 1, [first, fifth]] = renamed[2, 1, [fifth, first]]
    assert torch.equal(targets(renamed)[0], targets(logits)[0]) and not same(targets(logits), targets(renamed))


def _state(teacher, cache: str, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("GIFT_QUANT_CACHE", cache)
    return SimpleNamespace(weights_digest="w", recipe=SimpleNamespace(model=SimpleNamespace(dtype="float64")),
                           teacher=teacher, device=torch.device("cpu"), rotation=None)


def test_layered_top_k_targets_are_the_resident_ones(tmp_path, monkeypatch) -> None:
    """The cached targets: the same token ids and log-probabilities whichever way the teacher ran, for a group size
    that does not divide the blocks."""
    from conftest import tiny_llama
    from gift_quant.teacher import teacher_topk

    teacher, blocks = tiny_llama(dtype=torch.float64), _windows(5, 16, seed=3)
    (logp_r, ids_r), where_r = teacher_topk(_state(teacher, str(tmp_path / "r"), monkeypatch), blocks, 8, 1.5)
    (logp_l, ids_l), where_l = teacher_topk(_state(teacher, str(tmp_path / "l"), monkeypatch), blocks, 8, 1.5,
                                            setting="layered", group=2)
    assert (where_r, where_l) == ("resident", "layered")
    assert _measure_teacher().same_targets((logp_l, ids_l), (logp_r, ids_r))
    with torch.no_grad():  # and both are the teacher's: float64 reference, stored in fp16
        ref = torch.log_softmax(teacher(input_ids=blocks).logits / 1.5, -1).topk(8, -1)
    torch.testing.assert_close(logp_l.double(), ref.values, atol=2e-3, rtol=0)
    assert torch.equal(ids_l.long(), ref.indices)


def test_the_live_teacher_gives_the_same_logits_either_way() -> None:
    from conftest import tiny_llama
    from gift_quant.teacher import live_teacher

    teacher, ids = tiny_llama(dtype=torch.float64), _windows(3, 12)
    layered = live_teacher(teacher, torch.device("cpu"), "layered")(ids)
    resident = live_teacher(teacher, torch.device("cpu"), "resident")(ids)
    torch.testing.assert_close(layered, resident, atol=1e-12, rtol=1e-12)


def test_auto_placement_keeps_the_teacher_resident_only_where_it_fits(monkeypatch) -> None:
    """On a CPU both are one memory (resident); on a GPU layered once the teacher exceeds its share of the free
    memory the student leaves; an explicit setting is taken as given."""
    from conftest import tiny_llama
    from gift_quant import estimate
    from gift_quant.teacher import LIVE_SHARE, PASS_SHARE, module_bytes, placement

    assert (estimate.PASS_SHARE, estimate.LIVE_SHARE) == (PASS_SHARE, LIVE_SHARE)  # --dry-run decides as the run does
    teacher, student = tiny_llama(), tiny_llama(seed=1)
    t, s = module_bytes(teacher), module_bytes(student)
    assert placement("auto", teacher, student, torch.device("cpu"), live=False) == "resident"
    assert placement("layered", teacher, student, torch.device("cpu"), live=True) == "layered"
    gpu = torch.device("cuda")
    for share, live in ((PASS_SHARE, False), (LIVE_SHARE, True)):
        free = s + t / share  # exactly enough beside the (host-resident) student
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (int(free) + 1, 0))
        assert placement("auto", teacher, student, gpu, live=live) == "resident"
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (int(free) - 64, 0))
        assert placement("auto", teacher, student, gpu, live=live) == "layered"
        assert placement("resident", teacher, student, gpu, live=live) == "resident"


def test_the_teacher_setting_is_typed() -> None:
    from pydantic import ValidationError

    from gift_quant.config import RecoverConfig

    assert RecoverConfig(loss="kd", teacher="layered", teacher_windows=8).teacher == "layered"
    with pytest.raises(ValidationError, match="teacher"):
        RecoverConfig(loss="kd", teacher="gpu")
    with pytest.raises(ValidationError, match="teacher_windows"):
        RecoverConfig(loss="kd", teacher_windows=0)
    with pytest.raises(ValidationError, match="teacher_device"):
        RecoverConfig(loss="kd", teacher_device="cpu")


def test_layered_full_vocabulary_kd_trains_as_the_resident_one(tiny_run, monkeypatch) -> None:
    """Through the recover stage: the teacher visiting layer by layer at every step trains the same model."""
    import shutil

    import gift_quant.teacher as teacher

    passes = []
    real = teacher.layered_logits
    monkeypatch.setattr(teacher, "layered_logits", lambda *a, **k: passes.append(1) or real(*a, **k))
    recipe = KD.replace("LOSS", "kd").replace("kd_top_k: 16", "kd_top_k: null")
    ppls = []
    for where in ("resident", "layered"):
        rc, out = tiny_run(recipe.replace("kd_top_k: null", f"kd_top_k: null, teacher: {where}"))
        assert rc == 0
        ppls.append([r["value"] for r in json.loads((out / "results.json").read_text())["results"]
                     if r["metric"] == "eval_ppl"])
        shutil.rmtree(out)  # the second run trains from scratch (the placement does not invalidate a checkpoint)
    assert len(passes) == 6  # one layer-by-layer pass per training step, in the second run only
    assert ppls[0] == pytest.approx(ppls[1], rel=1e-6)


def test_the_layered_pass_holds_one_layer_not_the_model(tmp_path, monkeypatch) -> None:
    """The tensors the layer-by-layer top-k pass creates (layer copies, hidden states, logits), tracked op by op, peak
    near the estimate's layered parts — one layer, the group's hidden states, one window's forward — far below the
    model; and the targets are the resident pass's."""
    from gift_quant.config import RecoverConfig
    from gift_quant.estimate import Context, Shape, teacher_parts
    from gift_quant.teacher import module_bytes, teacher_topk
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=12,
                                           num_attention_heads=4, num_key_value_heads=4, use_cache=False)).eval()
    blocks = _windows(12, 32, seed=5)
    tool = _measure_teacher()
    tracked = tool.TrackedBytes([*teacher.parameters(), *teacher.buffers(), blocks])
    with tracked:
        (logp, ids), _ = teacher_topk(_state(teacher, str(tmp_path / "l"), monkeypatch), blocks, 8, 1.0, "layered", 4)
    (logp_r, ids_r), _ = teacher_topk(_state(teacher, str(tmp_path / "r"), monkeypatch), blocks, 8, 1.0)
    assert tool.same_targets((logp, ids), (logp_r, ids_r))
    cfg = RecoverConfig(loss="kd", teacher="layered", teacher_windows=4, seq_len=32)
    estimate = sum(teacher_parts(Context(Shape.from_config(teacher.config.to_dict()), 4, cuda=True), cfg,
                                 live=False, windows=12).values())
    layer = module_bytes(teacher.model.layers[0])
    assert layer < tracked.peak < 1.25 * estimate < module_bytes(teacher) / 3
