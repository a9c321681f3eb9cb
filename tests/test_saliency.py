"""GIFT-SW sensitivity presets against brute-force float64 loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gift_quant.saliency import ChannelNorms, num_salient, quant_error, select_salient, sensitivity

ROWS, COLS = 6, 10
INF = math.inf


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64)
    w[:, 3] *= 5
    x = torch.randn(2, 9, COLS, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, COLS, dtype=torch.float64)
    return w, x


def brute_quant_error(w: torch.Tensor, bits: int, grid: int = 100, max_shrink: float = 0.8) -> list[list[float]]:
    """Per row: symmetric clip α = p·max|w| with the first p minimising Σ (w − q)², then D = w − q."""
    maxq = 2**bits - 1
    zero = (maxq + 1) / 2
    out = []
    for row in w.tolist():
        amax = max(abs(v) for v in row) or 1.0
        best, best_d = INF, None
        for i in range(int(max_shrink * grid)):
            scale = 2 * (1 - i / grid) * amax / maxq
            d = [v - scale * (min(max(round(v / scale) + zero, 0), maxq) - zero) for v in row]
            err = sum(e * e for e in d)
            if err < best:
                best, best_d = err, d
        out.append(best_d)
    return out


def column_norm(d: list[list[float]], j: int, tau: float) -> float:
    col = [abs(row[j]) for row in d]
    return max(col) if tau == INF else sum(c**tau for c in col) ** (1 / tau)


def norms_of(x: torch.Tensor) -> tuple[list[float], list[float]]:
    tokens = x.reshape(-1, COLS).tolist()
    linf = [max(abs(t[j]) for t in tokens) for j in range(COLS)]
    l2 = [math.sqrt(sum(t[j] ** 2 for t in tokens)) for j in range(COLS)]
    return linf, l2


def test_channel_norms_match_loops() -> None:
    _, x = data()
    norms = ChannelNorms(COLS)
    norms.add_batch(x[0])
    norms.add_batch(x[1:].float())
    linf, l2 = norms_of(x)
    assert torch.allclose(norms.linf.double(), torch.tensor(linf, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(norms.l2.double(), torch.tensor(l2, dtype=torch.float64), rtol=1e-6)
    with pytest.raises(RuntimeError):
        _ = ChannelNorms(COLS).linf


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_error_matches_brute_force_grid_search(bits: int) -> None:
    w, _ = data(bits)
    expected = torch.tensor(brute_quant_error(w, bits), dtype=torch.float64)
    assert torch.allclose(quant_error(w, bits), expected, rtol=0, atol=1e-12)


def test_gift_preset_is_linf_times_linf() -> None:
    w, x = data(1)
    linf, l2 = norms_of(x)
    d = brute_quant_error(w, 3)
    s = sensitivity(w, 3, x_linf=torch.tensor(linf), x_l2=torch.tensor(l2))
    expected = [column_norm(d, j, INF) * linf[j] for j in range(COLS)]
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_quik_preset_is_activation_max_alone() -> None:
    w, x = data(2)
    linf, l2 = norms_of(x)
    s = sensitivity(w, 4, x_linf=torch.tensor(linf), x_l2=torch.tensor(l2), metric="quik")
    assert torch.allclose(s, torch.tensor(linf, dtype=torch.float64), rtol=1e-6)


def test_owq_preset_is_hessian_diag_times_squared_error() -> None:
    w, x = data(3)
    linf, l2 = norms_of(x)
    tokens = x.reshape(-1, COLS).tolist()
    h_diag = [2 / len(tokens) * sum(t[j] ** 2 for t in tokens) for j in range(COLS)]
    d = brute_quant_error(w, 2)
    kwargs = dict(x_linf=torch.tensor(linf), x_l2=torch.tensor(l2), metric="owq")
    s = sensitivity(w, 2, h_diag=torch.tensor(h_diag), **kwargs)
    expected = [h_diag[j] * column_norm(d, j, 2) ** 2 for j in range(COLS)]
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    # Without diag(H) the proportional ‖X_j‖₂² is used: same ranking, scores off by the constant 2/n.
    s_fallback = sensitivity(w, 2, **kwargs)
    assert torch.allclose(s_fallback * 2 / len(tokens), s, rtol=1e-6)


@pytest.mark.parametrize("tau,rho,gamma", list(itertools.product([1, 2, INF], [2, INF], [0.5, 1, 2])))
def test_custom_metric_matches_formula(tau: float, rho: float, gamma: float) -> None:
    w, x = data(4)
    linf, l2 = norms_of(x)
    d = brute_quant_error(w, 3)
    s = sensitivity(w, 3, x_linf=torch.tensor(linf), x_l2=torch.tensor(l2), metric="custom", tau=tau, rho=rho,
                    gamma=gamma)
    act = linf if rho == INF else l2
    expected = [column_norm(d, j, tau) * act[j] ** gamma for j in range(COLS)]
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_bad_metric_arguments_raise() -> None:
    w, x = data()
    kw = dict(x_linf=torch.ones(COLS), x_l2=torch.ones(COLS))
    with pytest.raises(ValueError, match="custom"):
        sensitivity(w, 3, metric="custom", tau=3, **kw)
    with pytest.raises(ValueError, match="fixed by"):
        sensitivity(w, 3, metric="gift", tau=2, **kw)
    with pytest.raises(ValueError, match="unknown metric"):
        sensitivity(w, 3, metric="awq", **kw)


def test_select_salient_top_k_with_deterministic_ties() -> None:
    scores = torch.tensor([1.0, 5.0, 3.0, 5.0, 0.5, 3.0, 3.0, INF])
    brute = sorted(sorted(range(len(scores)), key=lambda j: (-scores[j].item(), j))[:4])
    idx = select_salient(scores, 4)
    assert idx.dtype == torch.int64 and idx.tolist() == brute == [1, 2, 3, 7]
    assert select_salient(scores, 0).numel() == 0
    assert torch.equal(select_salient(scores.flip(0), 4), torch.tensor([0, 1, 4, 6]))  # ties still → lower index
    with pytest.raises(ValueError):
        select_salient(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError):
        select_salient(scores, 9)


def test_num_salient() -> None:
    assert num_salient(576, None, None) == 0
    assert num_salient(576, 16, None) == 16
    assert num_salient(576, None, 0.01) == 6
    assert num_salient(100, None, 1.0) == 100
    for bad in [(576, 600, None), (576, None, 1.5), (576, 4, 0.1), (576, -1, None)]:
        with pytest.raises(ValueError):
            num_salient(*bad)
