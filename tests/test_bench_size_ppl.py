"""tools/bench_size_ppl.py and tools/llamacpp_side.py: the pure parts (no llama.cpp, no model runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import import_tool

bench_size_ppl = import_tool("bench_size_ppl")
llamacpp_side = import_tool("llamacpp_side")


def test_window_nll_is_float64_cross_entropy_of_the_next_token():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((300, 50)) * 4).astype(np.float32)
    ids = rng.integers(0, 50, 300)
    expected = F.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]), reduction="sum")
    assert llamacpp_side.window_nll(logits, ids, chunk=64) == pytest.approx(expected.item(), rel=1e-12)


def test_linear_bits_counts_only_the_blocks_linears():
    q4_0 = lambda n: n // 32 * 18  # noqa: E731  (a Q4_0 block: 32 weights in 18 bytes)
    tensors = [("token_embd.weight", 576 * 49152, 576 * 49152 // 32 * 34),  # Q8_0, not a block linear
               ("blk.0.attn_norm.weight", 576, 4 * 576),
               ("blk.0.attn_q.weight", 576 * 576, q4_0(576 * 576)),
               ("blk.0.ffn_down.weight", 1536 * 576, q4_0(1536 * 576)),
               ("blk.1.ffn_up.weight", 576 * 1536, 2 * 576 * 1536)]  # F16
    n4, n16 = 576 * 576 + 1536 * 576, 576 * 1536
    assert llamacpp_side.linear_bits(tensors) == pytest.approx((4.5 * n4 + 16 * n16) / (n4 + n16))


@pytest.mark.parametrize("heads", [9, 3])
def test_gguf_order_inverts_transformers_gguf_reader(heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(1).standard_normal((heads * 64, 576)).astype(np.float32)
    hf = LlamaTensorProcessor()._reverse_permute_weights(w, heads, heads)  # what the fp checkpoint holds
    assert np.array_equal(bench_size_ppl.gguf_order(torch.from_numpy(hf), heads).numpy(), w)


def test_hf_names_of_every_llama_tensor():
    assert bench_size_ppl.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert bench_size_ppl.hf_name("output_norm.weight") == "model.norm.weight"
    assert bench_size_ppl.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert bench_size_ppl.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"


def test_rivals_at_equal_size():
    llama = [{"label": "a", "bytes": 90, "ppl": 26.0}, {"label": "b", "bytes": 98, "ppl": 21.0},
             {"label": "c", "bytes": 88, "ppl": 29.5}]
    assert bench_size_ppl.best_below(95, llama)["label"] == "a"
    assert bench_size_ppl.best_below(88, llama)["label"] == "c"  # equal size counts
    assert bench_size_ppl.best_below(80, llama) is None
    assert bench_size_ppl.smallest_as_good(27.0, llama)["label"] == "a"
    assert bench_size_ppl.smallest_as_good(20.0, llama) is None


def test_windows_passed_on_are_the_windows_perplexity_cuts_again():
    """The tool gives perplexity() its windows joined back into one row: they must be cut into the same windows."""
    ids = torch.randint(0, 49152, (1, 10_000), generator=torch.Generator().manual_seed(0))
    w = bench_size_ppl._windows(ids, 2048, 3, None)
    assert w.shape == (3, 2048) and torch.equal(w.reshape(-1), ids[0, : 3 * 2048])
    assert torch.equal(bench_size_ppl._windows(w.reshape(1, -1), 2048, 3, None), w)


def test_table_names_the_rivals_of_gift_quant_points_only():
    points = {"llama.cpp Q4_0": {"kind": "llama.cpp", "bytes": 91.7e6, "ppl": 26.15, "linear_bits": 4.5,
                                 "embedding_type": "Q8_0"},
              "llama.cpp Q2_K": {"kind": "llama.cpp", "bytes": 88.2e6, "ppl": 29.49, "linear_bits": 3.2,
                                 "embedding_type": "Q8_0"},
              "g": {"kind": "gift_quant", "bytes": 90.0e6, "ppl": 28.0, "linear_bits": 4.36, "embedding_type": "int8"}}
    rows = {line.split(" | ")[0][2:]: line for line in bench_size_ppl.table(points, 100e6, 200e6).splitlines()[2:]}
    assert "llama.cpp Q2_K: 29.49 at 88.2 MB (-1.49 ppl, +1.8 MB)" in rows["g"]  # best no larger
    assert "llama.cpp Q4_0: 26.15 at 91.7 MB (+1.85 ppl, -1.7 MB)" in rows["g"]  # smallest no worse
    assert "| 0.900x | 0.450x |" in rows["g"] and rows["llama.cpp Q4_0"].endswith("|  |  |")


def test_decode_ratios_are_taken_per_round_so_a_drifting_load_cancels(monkeypatch):
    import argparse

    import bench_decode

    calls, load = [], iter([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])  # the machine slows down each round

    def gift(export, args, threads, label):
        calls.append(export + ("+compiled" if label.endswith(bench_decode.COMPILED) else ""))
        return 20.0 * next(load)

    def llama(args, threads):
        calls.append("llama")
        f = next(load)
        return {"llama.cpp Q4_0": {"decode_tok_s": 40.0 * f, "bytes": 91_700_000},
                "llama.cpp Q2_K": {"decode_tok_s": 50.0 * f, "bytes": 88_200_000}}

    monkeypatch.setattr(bench_decode, "measure_gift", gift)
    monkeypatch.setattr(bench_decode, "measure_llamacpp", llama)
    args = argparse.Namespace(rounds=3)
    b = "b" + bench_decode.COMPILED  # the same export timed through the compiled decoder
    out = bench_decode.bench_threads(args, {"a": "A", b: "A"}, threads=1)
    # Every other round reversed.
    assert calls == ["llama", "A", "A+compiled", "A+compiled", "A", "llama", "llama", "A", "A+compiled"]
    assert out["ratios"]["a / llama.cpp Q4_0"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    assert out["ratios"][f"{b} / llama.cpp Q2_K"]["median"] == pytest.approx(0.4)
    assert out["tok_s"]["a"] == {"median": 10.0, "min": 5.0, "max": 20.0, "n": 3}
    assert out["llamacpp_bytes"] == {"llama.cpp Q4_0": 91_700_000, "llama.cpp Q2_K": 88_200_000}
    doc = {"bytes": {**out["llamacpp_bytes"], "a": 89.4e6, b: 89.4e6}, "by_threads": [out]}
    text = bench_decode.table(doc)
    assert "| a | 89.4 | 10.0 (5.0–20.0) |" in text and "| a / llama.cpp Q4_0 | 0.50x (0.50–0.50) |" in text


def test_front_reads_the_target_size_by_size():
    """Each span between two points' sizes compares the best of each side no larger than the span's start."""
    points = {"llama.cpp Q2_K": {"kind": "llama.cpp", "bytes": 88e6, "ppl": 29.5},
              "llama.cpp Q4_1": {"kind": "llama.cpp", "bytes": 98e6, "ppl": 21.1},
              "g3": {"kind": "gift_quant", "bytes": 76_345_679, "ppl": 27.4},  # counts from exactly its size
              "g4": {"kind": "gift_quant", "bytes": 89e6, "ppl": 23.3},
              "fp": {"kind": "fp", "ppl": 21.0}}
    rows = bench_size_ppl.front(points, 60, 140).splitlines()[2:]
    assert rows == ["| 60.0–76.3 | none | none | no gift_quant point |",
                    "| 76.3–88.0 | g3 (27.40) | none | no llama.cpp type (gift_quant alone) |",
                    "| 88.0–89.0 | g3 (27.40) | llama.cpp Q2_K (29.50) | gift_quant by 2.10 |",
                    "| 89.0–98.0 | g4 (23.30) | llama.cpp Q2_K (29.50) | gift_quant by 6.20 |",
                    "| 98.0–140.0 | g4 (23.30) | llama.cpp Q4_1 (21.10) | **llama.cpp by 2.20** |"]


def test_header_tensors_agree_with_gguf_py(tmp_path):
    """The header-only reader (for types gguf-py does not know) gives gguf-py's tensors, sizes and types."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.name", "x" * 7)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc"])
    w.add_uint32("general.alignment", 64)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    q = quantize(rng.standard_normal((32, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = llamacpp_side.header_tensors(path)
    want = [(t.name, int(t.n_elements), int(t.n_bytes), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors]
    assert [(n, e, k) for n, e, _, k in header] == [(n, e, k) for n, e, _, k in want]
    padded = {name: -(-b // 64) * 64 for name, _, b, _ in want}  # each tensor padded to the file's alignment
    assert {name: b for name, _, b, _ in header} == padded
    rows, types, embedding = llamacpp_side.tensor_table(path)
    assert (types, embedding) == ({"Q4_0": 1}, "F32")
    assert llamacpp_side.linear_bits([(n, e, b) for n, e, b, _ in header]) == pytest.approx(4.5)
