"""Perplexity, GPTQ protocol: text tokenized once, non-overlapping `seq_len` windows, NLL averaged over every
predicted token (seq_len − 1 per window)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import EvaluateConfig
from .data import evaluation_ids, load_documents, source_label


@dataclass
class Perplexity:
    value: float
    nll_sum: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: torch.device | str | None = None, progress: bool = True) -> Perplexity:
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = input_ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {input_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = input_ids.view(-1)[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    nll = 0.0
    for batch in tqdm(windows.split(batch_size), desc=f"perplexity ({n}×{seq_len})", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
    model.train(was_training)
    tokens = n * (seq_len - 1)
    return Perplexity(math.exp(nll / tokens), nll, tokens, n, seq_len, time.perf_counter() - start)


def eval_ids(state, cfg) -> torch.Tensor:
    """Tokenized evaluation text, cached in the run state (tokenizing WikiText-2 takes seconds)."""
    key = ("eval_ids", cfg.dataset, cfg.split, cfg.text_field)
    if key not in state.tokens:
        docs = load_documents(cfg, state.recipe.data.dir)
        state.tokens[key] = evaluation_ids(state.tokenizer, docs)
    return state.tokens[key]


def evaluate_stage(state, cfg: EvaluateConfig) -> Perplexity:
    """Stage `evaluate`: perplexity of the current model; recorded as `<dataset>_ppl` after the previous stage."""
    ids = eval_ids(state, cfg)
    model = state.model.to(state.device)
    result = perplexity(model, ids, cfg.seq_len, cfg.max_windows, cfg.batch_size, state.device)
    state.record("evaluate", f"{source_label(cfg.dataset)}_ppl", result.value, label=cfg.label or state.last_stage,
                 tokens=result.tokens, seq_len=cfg.seq_len, windows=result.windows, seconds=round(result.seconds, 2),
                 note=f"{cfg.dataset} perplexity over {result.windows} windows of {cfg.seq_len} tokens")
    return result
