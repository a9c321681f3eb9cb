"""Perplexity against an independent float64 computation."""

from __future__ import annotations

import json
import math

import torch

from conftest import char_hf_tokenizer, tiny_llama
from gift_quant.evaluate import perplexity


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int, bos: int | None = None) -> float:
    """float64, one window at a time, log-softmax by hand, summed over every predicted token; with ``bos``, each
    window is BOS and the next seq_len - 1 tokens of ``ids``."""
    m = tiny_llama().to(torch.float64)
    m.load_state_dict(model.state_dict())
    total, count = 0.0, 0
    flat = ids.view(-1)
    text = seq_len if bos is None else seq_len - 1
    for w in range(min(flat.numel() // text, max_windows)):
        x = flat[w * text : (w + 1) * text]
        x = x if bos is None else torch.cat([torch.tensor([bos]), x])
        with torch.no_grad():
            logits = m(input_ids=x[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        for t in range(seq_len - 1):
            total -= logp[t, x[t + 1]].item()
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_float64_reference():
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 128, (1, 64 * 5 + 17), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, seq_len=64, max_windows=4, progress=False)
    assert got.windows == 4 and got.tokens == 4 * 63
    assert math.isclose(got.value, reference_perplexity(model, ids, 64, 4), rel_tol=1e-5)


def test_batching_does_not_change_perplexity():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (1, 32 * 6), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, ids, seq_len=32, batch_size=1, progress=False)
    three = perplexity(model, ids, seq_len=32, batch_size=4, progress=False)
    assert one.windows == three.windows == 6
    assert math.isclose(one.value, three.value, rel_tol=1e-5)


def test_bos_windows_match_float64_reference():
    """Each window is BOS + 63 text tokens, all 63 predicted; a BOS the tokenizer put first is not doubled."""
    model = tiny_llama(seed=1)
    text = torch.randint(3, 128, (1, 63 * 4 + 5), generator=torch.Generator().manual_seed(0))
    with_bos = torch.cat([torch.tensor([[1]]), text], 1)
    got = perplexity(model, with_bos, seq_len=64, max_windows=4, progress=False, bos_id=1)
    assert got.windows == 4 and got.tokens == 4 * 63
    assert math.isclose(got.value, reference_perplexity(model, text, 64, 4, bos=1), rel_tol=1e-5)
    assert not math.isclose(got.value, perplexity(model, text, seq_len=64, max_windows=4, progress=False).value,
                            rel_tol=1e-3)  # the protocols really differ


BOS_RECIPE = """
model: {name: tiny}
stages:
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4}
  - evaluate: {dataset: EVAL, seq_len: 64, max_windows: 4, bos: true}
  - quantize: {method: rtn, bits: 4}
  - export: {verify: float32}
"""


def test_the_report_says_which_protocol_was_used(tiny_run):
    tiny_run.tokenizer = lambda: char_hf_tokenizer(bos=True)
    rc, out = tiny_run(BOS_RECIPE)
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    gptq, bos = [r for r in rows if r["stage"] == "evaluate"]
    assert (gptq["metric"], gptq["protocol"], bos["metric"], bos["protocol"]) == ("eval_ppl", "gptq", "eval_ppl_bos",
                                                                                  "bos")
    assert gptq["value"] != bos["value"] and gptq["tokens"] == bos["tokens"] == 4 * 63
    (reloaded,) = [r for r in rows if r["stage"] == "export" and r["metric"].endswith("_reloaded")]
    assert reloaded["metric"] == "eval_ppl_bos_reloaded"  # measured like the last evaluate stage
    report = (out / "report.md").read_text()
    assert "each starting with BOS" in report and "(GPTQ protocol)" in report


def test_bos_evaluation_without_a_bos_token_is_refused_before_any_work(tiny_run, capsys):
    rc, out = tiny_run(BOS_RECIPE)  # the default character tokenizer has no BOS
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs a tokenizer with a BOS token" in err, err
    assert not out.exists()
