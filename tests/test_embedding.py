"""The quantized embedding and lm_head of a packed export (gift_quant/embedding.py and its use in export/loading).

Oracles: the closed-form error bound of a round-to-nearest symmetric grid (|w − ŵ| ≤ scale/2, in float64), brute-
force nibble packing, and the in-memory model with the same embedding quantization applied (a reload must compute
its logits bit for bit: the same float32 products, the same matmuls).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_export import ids, logits, quantize, read_tensors, refresh_manifest, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from gift_quant.checkpoint import CheckpointError
from gift_quant import cpu_rows
from gift_quant import embedding as embedding_module
from gift_quant.embedding import (
    QuantizedEmbedding,
    QuantizedLMHead,
    dequantize_rows,
    pack_nibbles,
    quantize_rows,
    unpack_nibbles,
)
from gift_quant.export import COMPONENTS, export_dense, export_packed, size_report
from gift_quant.hf_quantizer import load_quantized

V, H = 128, 64  # the tiny Llama's vocabulary and hidden size


def weights(rows: int = 40, cols: int = 70, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 2, rows).unsqueeze(1)  # 8 decades of row scale
    w[3] = 0.0  # an all-zero row (padding tokens)
    w[5, 7] = 1e-3  # a row with a single non-zero
    return w


# ---------------------------------------------------------------- the grids, against closed forms


def test_int8_rows_are_within_half_a_scale_and_use_the_full_range():
    w = weights()
    q, s = quantize_rows(w, "int8")
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float16 and s.shape == (40, 1)
    s64, w64 = s.double(), w.double()
    absmax = w64.abs().amax(1, keepdim=True)
    # The scale is the smallest fp16 ≥ absmax/127: no code needs clamping.
    assert (s64 >= absmax / 127).all()
    below = torch.nextafter(s, torch.tensor(0.0, dtype=torch.float16)).double()
    assert ((below < absmax / 127) | (s64 == 0)).all()
    err = (w64 - q.double() * s64).abs()
    assert (err <= s64 / 2).all()
    # A normal fp16 scale is within 2⁻¹⁰ of absmax/127, so the largest weight gets code ±127 (tiny rows with
    # subnormal scales get a coarser grid, still within the bound).
    normal = s.squeeze(1) >= 2.0**-14
    assert normal.sum() > 20 and q.abs().max() <= 127 and (q[normal].abs().amax(1) == 127).all()
    assert (q[3] == 0).all() and s[3] == 0
    # Dequantized in float32: code × fp16 scale is exact (7 + 11 significant bits).
    assert torch.equal(dequantize_rows(q, s, "int8", 70).double(), q.double() * s64)


@pytest.mark.parametrize("cols,group", [(70, 32), (64, 32), (9, 4)])
def test_int4_groups_are_within_half_a_scale(cols, group):
    w = weights(cols=cols)
    q, s = quantize_rows(w, "int4", group)
    n_groups = math.ceil(cols / group)
    assert q.dtype == torch.uint8 and q.shape == (40, math.ceil(cols / 2)) and s.shape == (40, n_groups)
    codes = unpack_nibbles(q, cols).double()
    assert codes.abs().max() <= 7
    col_scale = s.double().repeat_interleave(group, dim=1)[:, :cols]  # the last group may be shorter
    w64 = w.double()
    assert ((w64 - codes * col_scale).abs() <= col_scale / 2).all()
    for g in range(n_groups):  # the smallest fp16 scale ≥ absmax/7 of each group
        absmax = w64[:, g * group:(g + 1) * group].abs().amax(1)
        assert (s[:, g].double() >= absmax / 7).all()
    assert torch.equal(dequantize_rows(q, s, "int4", cols, group).double(), codes * col_scale)


def test_nibble_packing_brute_force():
    codes = torch.randint(-8, 8, (5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_nibbles(codes)
    for r in range(5):
        for c in range(7):
            byte = int(packed[r, c // 2])
            assert (byte >> (4 * (c % 2))) & 0xF == int(codes[r, c]) + 8
    assert torch.equal(unpack_nibbles(packed, 7), codes)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 16)])
def test_gathered_rows_equal_the_dequantized_matrix(fmt, group):
    emb = torch.nn.Embedding(V, H)
    q = QuantizedEmbedding.from_embedding(emb, fmt, group)
    x = ids()
    assert torch.equal(q(x), torch.nn.functional.embedding(x, q.dequantized()))
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and q(x).dtype == torch.bfloat16  # the stored grid is not re-rounded
    assert torch.equal(q(x), torch.nn.functional.embedding(x, q.dequantized(torch.float32)).bfloat16())


# ---------------------------------------------------------------- export and reload


def with_embedding(model, fmt: str, group: int | None = None):
    """The in-memory model with its embedding (and untied lm_head) replaced by the dequantized grid values."""
    with torch.no_grad():
        heads = [model.model.embed_tokens.weight]
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            heads.append(model.lm_head.weight)
        for w in heads:
            w.copy_(dequantize_rows(*quantize_rows(w, fmt, group), fmt, H, group))
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_reload_computes_the_in_memory_logits_bit_for_bit(tmp_path, tie, fmt, group):
    model = quantize(tiny_llama(tie=tie))
    out = tmp_path / "packed"
    export_packed(model, tiny_tokenizer(), out, quant_info={}, embedding=fmt, embedding_group_size=group)
    tensors = read_tensors(out)
    names = {k for k in tensors if k.startswith(("model.embed_tokens.", "lm_head."))}
    if tie:  # one tensor pair for both
        assert names == {"model.embed_tokens.qweight", "model.embed_tokens.scales"}
    else:
        assert names == {f"{m}.{s}" for m in ("model.embed_tokens", "lm_head") for s in ("qweight", "scales")}
        assert not torch.equal(tensors["lm_head.qweight"], tensors["model.embed_tokens.qweight"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["embedding"] == {"format": fmt, "group_size": group, "module": "model.embed_tokens",
                               "lm_head": "lm_head", "tied": tie, "shape": [V, H]}
    reloaded = load_quantized(out, dtype=torch.float32, kernel="reference")
    emb, head = reloaded.model.embed_tokens, reloaded.lm_head
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLMHead)
    assert (head.tied_to is emb) == tie and head.kernel == "reference"  # load_quantized's kernel, the exact path
    x = ids()
    assert torch.equal(logits(reloaded, x), logits(with_embedding(model, fmt, group), x))


def test_int8_export_is_smaller_by_the_closed_form(tmp_path):
    model = quantize(tiny_llama(tie=True))
    export_packed(model, None, tmp_path / "fp16", quant_info={})
    export_packed(model, None, tmp_path / "int8", quant_info={}, embedding="int8")
    fp16, int8 = size_report(tmp_path / "fp16"), size_report(tmp_path / "int8")
    assert fp16["bytes_by_component"]["embedding"] == 2 * V * H
    assert int8["bytes_by_component"]["embedding"] == V * H + 2 * V  # int8 codes + one fp16 scale per row
    assert int8["fp16_bytes"] == fp16["fp16_bytes"]  # the same model in fp16
    assert int8["bytes_by_component"]["lm_head"] == fp16["bytes_by_component"]["lm_head"] == 0  # tied


def test_a_checkpoint_without_the_embedding_field_loads_as_before(tmp_path):
    model = quantize(tiny_llama(tie=True))
    out = tmp_path / "old"
    export_packed(model, None, out, quant_info={})  # embedding=None: the format before the field existed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "embedding" not in qc
    reloaded = load_quantized(out, dtype=torch.float32, kernel="reference")
    assert type(reloaded.model.embed_tokens) is torch.nn.Embedding
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    x = ids()
    assert torch.equal(logits(reloaded, x), logits(model, x))


def test_from_pretrained_generate_and_bfloat16(tmp_path):
    model = quantize(tiny_llama(tie=True))
    out = tmp_path / "packed"
    export_packed(model, tiny_tokenizer(), out, quant_info={}, embedding="int8")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
    assert loaded.get_output_embeddings().tied_to is loaded.get_input_embeddings()
    ref = with_embedding(model, "int8")
    prompt, kwargs = ids(1, 4), dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(loaded.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))
    loaded.to(torch.bfloat16)
    emb = loaded.get_input_embeddings()
    assert emb.scales.dtype == torch.float16 and emb.qweight.dtype == torch.int8
    assert loaded(ids()).logits.dtype == torch.bfloat16


def test_reexport_keeps_the_tensors_and_dense_export_dequantizes(tmp_path):
    model = quantize(tiny_llama(tie=True))
    export_packed(model, None, tmp_path / "a", quant_info={}, embedding="int4", embedding_group_size=16)
    reloaded = load_quantized(tmp_path / "a", dtype=torch.float32, kernel="reference")
    export_packed(reloaded, None, tmp_path / "b", quant_info=reloaded.gift_quant_config)  # None: keep int4
    first, second = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    export_dense(reloaded, None, tmp_path / "dense", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # tied again, stored once
    assert torch.equal(dense.model.embed_tokens.weight, reloaded.model.embed_tokens.dequantized())
    x = ids()
    torch.testing.assert_close(logits(dense, x), logits(reloaded, x), rtol=0, atol=1e-5)  # summation order only


def test_a_record_disagreeing_with_the_tensors_is_rejected(tmp_path):
    model = quantize(tiny_llama(tie=True))
    out = tmp_path / "packed"
    export_packed(model, None, out, quant_info={}, embedding="int8")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["embedding"].update(format="int4", group_size=32)
    (out / "config.json").write_text(json.dumps(config))
    refresh_manifest(out)
    with pytest.raises(CheckpointError, match="embed_tokens.qweight"):
        load_quantized(out)
    config["quantization_config"]["embedding"]["format"] = "int3"
    (out / "config.json").write_text(json.dumps(config))
    refresh_manifest(out)
    with pytest.raises(CheckpointError, match="embedding is malformed"):
        load_quantized(out)


# ---------------------------------------------------------------- the size report


@pytest.mark.parametrize("tie,fmt", [(True, "int8"), (False, "int4"), (False, "float16")])
def test_size_components_sum_to_the_file(tmp_path, tie, fmt):
    model = quantize(tiny_llama(tie=tie))
    out = tmp_path / "packed"
    export_packed(model, None, out, quant_info={}, embedding=fmt, embedding_group_size=32)
    on_disk = size_report(out)
    parts = on_disk["bytes_by_component"]
    assert set(parts) == set(COMPONENTS)
    assert sum(parts.values()) + on_disk["header_bytes"] == (out / "model.safetensors").stat().st_size
    assert 0 < on_disk["header_bytes"] < 16384  # the safetensors JSON header
    tensors = read_tensors(out)
    def nbytes(prefix: str) -> int:
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))

    assert parts["embedding"] == nbytes("model.embed_tokens.")
    assert parts["lm_head"] == (0 if tie else nbytes("lm_head."))
    assert parts["linear_codes"] + parts["linear_salient"] + parts["linear_scales_zeros"] == on_disk["quantized_bytes"]
    assert parts["other"] == nbytes("model.norm.") + sum(nbytes(f"model.layers.{i}.") for i in range(2)) - (
        on_disk["quantized_bytes"])  # the norms
    # The in-memory estimate counts the same tensors.
    assert size_report(model, embedding=fmt, embedding_group_size=32)["bytes_by_component"] == parts


STAGE_RECIPE = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 2}
  - quantize: {method: rtn, bits: 4}
  - export: {verify: float32}
"""


def test_the_export_stage_reports_sizes_by_component(tiny_run):
    rc, out = tiny_run(STAGE_RECIPE)
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    (size,) = [r for r in rows if r["stage"] == "export" and r["metric"] == "checkpoint_mb"]
    file_bytes = (out / "packed" / "model.safetensors").stat().st_size
    assert size["bytes"] == file_bytes == sum(size["bytes_by_component"].values()) + size["header_bytes"]
    assert size["source"] == "fp16" and size["size_ratio_vs_source"] == size["size_ratio_vs_fp16"]
    qc = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["embedding"]["format"] == "int8"  # the stage's default
    assert "embedding 0.01, lm_head 0.01" in (out / "report.md").read_text()  # 128·64 codes + 128 scales each


def test_sizes_are_compared_with_the_source_gguf(tiny_run, tmp_path):
    gguf = tmp_path / "source.gguf"
    gguf.write_bytes(b"\0" * 100_000)  # only its size is read: the tiny model stands in for its conversion
    rc, out = tiny_run(STAGE_RECIPE.replace("{name: tiny}", f"{{name: {gguf}}}"))
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    (size,) = [r for r in rows if r["stage"] == "export" and r["metric"] == "checkpoint_mb"]
    assert size["source"] == str(gguf) and size["source_bytes"] == 100_000
    assert size["size_ratio_vs_source"] == round(size["bytes"] / 100_000, 4)
    assert "× the source GGUF source.gguf" in (out / "report.md").read_text()


BF16_U = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def head_and_reference(fmt: str, group: int | None, rows: int = 203, hidden: int = 64):
    """A quantized lm_head (vocabulary ``rows``, not a multiple of the kernel's blocks) and its float64 weight; seeds
    the test's random inputs too."""
    torch.manual_seed(0)
    head = QuantizedLMHead.from_linear(torch.nn.Linear(hidden, rows, bias=False), fmt, group)
    return head, head.dequantized(torch.float64)


def spy(monkeypatch, owner, name: str) -> list:
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture(params=["gift_quant", "torch"])
def int8_kernel(request, monkeypatch) -> str:
    """The few-row int8 kernel the head runs: gift_quant's op (built here: this project's machines have the C++
    compiler Inductor needs) or torch's, the fallback where the op cannot be built."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_rows, "READY", cpu_rows.READY)  # put back after the test
        monkeypatch.setattr(cpu_rows, "LINEAR_VECTORIZED", cpu_rows.LINEAR_VECTORIZED)
        monkeypatch.setattr(cpu_rows, "_tried", cpu_rows._tried)
        cpu_rows.switch_off("the test runs torch's kernel")
    else:
        assert cpu_rows.load() is None
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("most", [False, True])
def test_lm_head_decodes_on_a_few_row_kernel_within_its_rounding(monkeypatch, int8_kernel, dtype, most):
    head, w64 = head_and_reference("int8", None)
    limit = {"gift_quant": cpu_rows.MAX_ROWS, "torch": embedding_module.KERNEL_ROWS}[int8_kernel]
    assert QuantizedLMHead.kernel_rows() == limit
    n_rows = limit if most else 1
    calls = spy(monkeypatch, torch, "_weight_int8pack_mm")
    ops = spy(monkeypatch, cpu_rows, "rows_mm")
    big = torch.randn(n_rows * 64 + 1).to(dtype)
    x = big[1:].view(n_rows, 1, 64)  # a view one element in: torch's kernel gets an aligned copy
    y = head(x)
    assert (ops if int8_kernel == "gift_quant" else calls) and not (calls if int8_kernel == "gift_quant" else ops)
    assert y.dtype == dtype and y.shape == (n_rows, 1, 203)
    y64 = x.double() @ w64.T
    absdot = x.double().abs() @ w64.abs().T
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: BF16_U}[dtype]
    if int8_kernel == "gift_quant":
        # Each activation within half an int16 step (amax/32767, K = 64: one block) of its value, the integer sums
        # exact, then 3 float32 roundings (the sum to float, × step, × scale) and the output's in dtype.
        step = x.double().abs().amax(-1, keepdim=True) / 32767
        bound = step / 2 * (torch.ones_like(x.double()) @ w64.abs().T) + 4 * 2.0**-24 * absdot + u * y64.abs()
    else:
        # torch's rounds activations, scales and logits to bf16 and sums in float32 (K = 64 terms): per logit,
        # 2 roundings of the terms (x, scale) plus the sum's (64·2⁻²⁴) stay under 3u·Σ|x·w|, and u·|y| the output's.
        bound = 3 * BF16_U * absdot + BF16_U * y64.abs()
    assert ((y.double() - y64).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [16, 5])
def test_an_int4_head_decodes_on_gift_quant_s_op_or_its_chunks(monkeypatch, int8_kernel, dtype, group):
    """An even group runs the int4 op (int16 activations per group); an odd one, or no op, the chunks."""
    head, w64 = head_and_reference("int4", group)
    ops, chunks = spy(monkeypatch, cpu_rows, "rows_mm4"), spy(monkeypatch, QuantizedLMHead, "_rows")
    x = torch.randn(cpu_rows.MAX_ROWS, 64).to(dtype)
    y = head(x)
    on_op = int8_kernel == "gift_quant" and group % 2 == 0
    assert bool(ops) == on_op and bool(chunks) != on_op and y.dtype == dtype
    y64 = x.double() @ w64.T
    absdot = x.double().abs() @ w64.abs().T
    u = 2.0**-24 if dtype == torch.float32 else BF16_U
    if on_op:  # half an int16 step per activation, 4 groups summed in float32, the output's rounding
        step = x.double().abs().view(-1, 4, 16).amax(-1, keepdim=True).expand(-1, 4, 16).reshape(-1, 64) / 32767
        bound = (step / 2) @ w64.abs().T + 12 * 2.0**-24 * absdot + u * y64.abs()
    else:  # the chunks' float32 products of the weights in dtype, summed in float32
        bound = 64 * 2.0**-24 * absdot + 2 * u * absdot + u * y64.abs()
    assert ((y.double() - y64).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 16)])
def test_lm_head_chunks_are_the_whole_dequantized_matmul(monkeypatch, fmt, group, dtype):
    head, _ = head_and_reference(fmt, group)
    monkeypatch.setattr(embedding_module, "CHUNK_VALUES", 64 * 50)  # chunks of 50 rows: 4 full, 1 of 3
    calls = spy(monkeypatch, QuantizedLMHead, "_rows")
    x = torch.randn(2, embedding_module.KERNEL_ROWS + 1, 64).to(dtype)  # above the kernel's rows (int8), any (int4)
    y = head(x)
    full = torch.nn.functional.linear(x, head.dequantized(dtype))
    assert len(calls) == 5 and y.dtype == dtype
    # The same weights in dtype, summed in float32 in two orders (64 terms each), then each rounded to dtype.
    absdot = x.float().abs() @ head.dequantized().abs().T
    u = 0.0 if dtype == torch.float32 else BF16_U
    assert ((y.float() - full.float()).abs() <= 2 * 64 * 2.0**-24 * absdot + 2 * u * full.float().abs()).all()


def test_lm_head_keeps_no_dense_copy_and_its_reference_path_is_exact(int8_kernel):
    head, _ = head_and_reference("int8", None)
    for x in (torch.randn(1, 64), torch.randn(40, 64), torch.randn(3, 64, dtype=torch.float64)):
        head(x)
    # Beside its registered buffers (here: int8 codes and fp16 scales) the module holds no tensor, alone or in a tuple,
    # but, on torch's kernel, that kernel's bf16 copy of the scales (one value a row).
    kept = {k: v for k, v in vars(head).items() if isinstance(v, torch.Tensor)
            or (isinstance(v, tuple) and any(isinstance(t, torch.Tensor) for t in v))}
    if int8_kernel == "gift_quant":
        assert kept == {}
    else:
        assert list(kept) == ["_kernel_scales"]
        assert torch.equal(kept["_kernel_scales"][1], head.scales.view(-1).bfloat16())
    assert {k: v.dtype for k, v in head.state_dict().items()} == {"qweight": torch.int8, "scales": torch.float16}
    # kernel="reference" (and autograd) multiply the whole dequantized matrix, as an nn.Linear holding it does.
    x = torch.randn(3, 64)
    head.kernel = "reference"
    assert torch.equal(head(x), torch.nn.functional.linear(x, head.dequantized()))
    head.kernel = "auto"
    xg = x.clone().requires_grad_()
    y = head(xg)
    assert torch.equal(y, torch.nn.functional.linear(x, head.dequantized()))
    y.sum().backward()
    assert torch.equal(xg.grad, head.dequantized().sum(0).expand_as(x))
    first = head(x.double())
    with torch.no_grad():  # nothing cached: an in-place change shows at once
        head.qweight.neg_()
    assert torch.equal(head(x.double()), -first)