"""Perplexity against an independent float64 computation."""

from __future__ import annotations

import math

import torch

from conftest import tiny_llama
from gift_quant.evaluate import perplexity


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """float64, one window at a time, log-softmax by hand, summed over every predicted token."""
    m = tiny_llama().to(torch.float64)
    m.load_state_dict(model.state_dict())
    total, count = 0.0, 0
    flat = ids.view(-1)
    for w in range(min(flat.numel() // seq_len, max_windows)):
        x = flat[w * seq_len : (w + 1) * seq_len]
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
