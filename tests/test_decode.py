"""The compiled greedy decoder (gift_quant/decode.py) on a tiny packed export.

Oracle: the eager model itself. Each token the decoder picks must be a greedy choice of the eager forward over the
whole sequence (teacher-forced, so a near-tie broken the other way by a fused kernel's rounding is not a failure),
and EOS handling must follow ``generate``'s rules (a row stops at an EOS id, is padded until all have stopped).
"""

from __future__ import annotations

import pytest
import torch
from test_cpu_rows import case, case4
from test_export import QuantSpec, ids, quantize, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from gift_quant import cpu_int4, cpu_rows
from gift_quant.decode import MIN_CACHE_LEN, CompiledDecoder, cache_len
from gift_quant.export import export_packed
from gift_quant.packing import set_kernel


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = quantize(tiny_llama(tie=True), spec_of=lambda name: QuantSpec(bits=4, group_size=-1, sym=True))
    out = tmp_path_factory.mktemp("decode") / "packed"
    export_packed(model, tiny_tokenizer(), out, quant_info={}, embedding="int8")
    return out


def load(folder, dtype):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def assert_greedy(model, sequence: torch.Tensor, prompt_len: int, tol: float) -> None:
    """Every generated token's eager logit is within ``tol`` × the logits' range of that position's maximum."""
    with torch.no_grad():
        logits = model(sequence).logits.float()[:, prompt_len - 1:-1]
    chosen = logits.gather(-1, sequence[:, prompt_len:, None]).squeeze(-1)
    gap = (logits.amax(-1) - chosen) / (logits.amax(-1) - logits.amin(-1))
    assert gap.max() <= tol, f"a non-greedy token: logit gap {gap.max():.3g} of the logits' range"


def test_cache_sizes_are_powers_of_two_from_the_minimum():
    assert [cache_len(n) for n in (1, MIN_CACHE_LEN, MIN_CACHE_LEN + 1, 1000)] == [
        MIN_CACHE_LEN, MIN_CACHE_LEN, 2 * MIN_CACHE_LEN, 1024]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_tokens_are_the_eager_models_greedy_choices(packed, dtype):
    model = load(packed, dtype)
    prompt = ids(2, 10)
    out = CompiledDecoder(model).generate(prompt, 12, stop_at_eos=False)
    forms = [m._fast[1] for m in model.modules() if getattr(m, "kernel_used", "") == "int4_cpu"]
    assert forms and all(form.rows16 == cpu_int4.own_layout() for form in forms)  # gift_quant's op where it is fast
    assert out.shape == (2, 22) and torch.equal(out[:, :10], prompt)
    # Decode rows run a few-row int4 kernel (torch's in bf16, 8 significant bits, for float32 models too;
    # gift_quant's op with int16 activations); the full-sequence eager forward runs the dense float32 path:
    # near-ties within those roundings may go either way.
    assert_greedy(model, out, 10, tol=0.01)


def test_compiled_tokens_on_torch_s_int4_kernel(packed, monkeypatch):
    """The same on torch's int4 kernel, which linears keep where gift_quant's op has no vector loop (the test above
    runs whichever form this CPU gives them)."""
    monkeypatch.setattr(cpu_int4, "own_layout", lambda: False)
    model = load(packed, torch.bfloat16)
    prompt = ids(2, 10)
    out = CompiledDecoder(model).generate(prompt, 12, stop_at_eos=False)
    forms = [m._fast[1] for m in model.modules() if getattr(m, "kernel_used", "") == "int4_cpu"]
    assert forms and not any(form.rows16 for form in forms)
    assert_greedy(model, out, 10, tol=0.01)


def test_one_decoder_serves_other_batch_and_cache_sizes(packed):
    model = load(packed, torch.float32)
    decoder = CompiledDecoder(model)
    for batch, prompt_len, new in ((2, 10, 4), (1, 10, 4), (1, 120, 12)):  # the last one needs a 256-slot cache
        prompt = torch.randint(0, 128, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        out = decoder.generate(prompt, new, stop_at_eos=False)
        assert out.shape == (batch, prompt_len + new)
        assert_greedy(model, out, prompt_len, tol=0.01)
    assert sorted(key[:2] for key in decoder.caches) == [(MIN_CACHE_LEN, 1), (MIN_CACHE_LEN, 2), (256, 1)]


def test_eos_stops_rows_and_pads_them_as_generate_does(packed):
    model = load(packed, torch.float32)
    decoder = CompiledDecoder(model, compile=False)  # the loop's rules; the compiled step is the test above
    prompt = ids(2, 10)
    free = decoder.generate(prompt, 8, stop_at_eos=False)
    row0 = free[0, 10:].tolist()
    first = next(j for j in range(1, 8) if row0[j] not in row0[:j])  # a token row 0 first emits after its first
    eos, pad = row0[first], 0 if row0[first] else 1
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    out = decoder.generate(prompt, 8)

    def stop(row: list[int]) -> int:  # sequence length when this row alone would stop
        return 10 + (row.index(eos) + 1 if eos in row else 8)

    stops = [stop(row0), stop(free[1, 10:].tolist())]
    assert stops[0] == 10 + first + 1 and out.shape[1] == max(stops)
    for r, end in enumerate(stops):
        assert torch.equal(out[r, :end], free[r, :end]) and (out[r, end:] == pad).all()


def test_decoders_of_different_models_keep_their_own_graphs(packed):
    """The compiled step skips the guards that tell two models apart, so each decoder compiles its own: a second
    decoder (here on a model whose linears run the reference path instead of the int4 kernel, then the two
    alternating) must not run the first one's graph."""
    models = [load(packed, torch.float32), load(packed, torch.float32)]
    set_kernel(models[1], "reference")
    decoders = [CompiledDecoder(m) for m in models]
    prompt = ids(1, 10)
    for model, decoder in [*zip(models, decoders), *zip(models, decoders)]:
        out = decoder.generate(prompt, 6, stop_at_eos=False)
        assert_greedy(model, out, 10, tol=0.01)


def test_the_lm_head_ops_run_inside_a_compiled_graph():
    """gift_quant's lm_head ops (tests/test_cpu_rows.py) in a compiled graph, as in the decoder's step: their fake
    shapes let torch.compile trace them, and the graph gives eager's results. (Here, not in the portable file:
    Inductor's code does not build under an emulated ATEN_CPU_CAPABILITY.)"""
    assert cpu_rows.load() is None
    x8, w8, s8 = case(2, 100)
    x4, packed, scales, _ = case4(2, 100, 32)

    def logits(a, b):
        return cpu_rows.rows_mm(a, w8, s8) + 1, cpu_rows.rows_mm4(b, packed, scales, 32) * 2

    y8, y4 = torch.compile(logits, fullgraph=True)(x8, x4)
    assert torch.equal(y8, cpu_rows.rows_mm(x8, w8, s8) + 1)
    assert torch.equal(y4, cpu_rows.rows_mm4(x4, packed, scales, 32) * 2)


def test_a_model_changed_after_compiling_is_refused(packed):
    """The step checks neither module guards nor input sizes (per token, they cost more than they catch): a tensor
    the model holds with other strides than when the step was compiled (the same values, every other element of a
    wider buffer) would be read with the old ones. The decoder refuses it at the next call instead."""
    model = load(packed, torch.float32)
    decoder = CompiledDecoder(model)
    prompt = ids(1, 10)
    before = decoder.generate(prompt, 4, stop_at_eos=False)
    norm = model.model.norm
    norm.weight = torch.nn.Parameter(torch.stack([norm.weight.data, norm.weight.data], dim=1)[:, 0])
    assert norm.weight.stride() == (2,)
    changed = r"model changed since this decoder compiled.*\('model.norm', '_parameters'\)"
    with pytest.raises(RuntimeError, match=changed):
        decoder.generate(prompt, 4, stop_at_eos=False)
    assert torch.equal(CompiledDecoder(model).generate(prompt, 4, stop_at_eos=False), before)
