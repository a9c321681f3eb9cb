"""Perplexity, GPTQ protocol: text tokenized once, non-overlapping `seq_len` windows, NLL averaged over every
predicted token (seq_len − 1 per window).

With ``bos: true`` each window is the BOS token followed by the next seq_len − 1 text tokens, all of them predicted
(same count per window): for models trained to always see BOS first (Gemma), whose first positions are otherwise
out of distribution. Rows name the protocol, and the BOS metric has its own name (``<dataset>_ppl_bos``), so numbers
from the two protocols are never compared with each other.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .config import EvaluateConfig
from .data import evaluation_ids, load_documents, source_label
from .errors import NonFiniteError, UserError


@dataclass
class Perplexity:
    value: float
    nll_sum: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float


def _windows(input_ids: torch.Tensor, seq_len: int, max_windows: int | None, bos_id: int | None) -> torch.Tensor:
    """Non-overlapping windows of the text, each prefixed with ``bos_id`` when given (then seq_len − 1 text tokens,
    and a BOS the tokenizer put at the start of the text is dropped so that it is not doubled)."""
    ids = input_ids.view(-1)
    if bos_id is not None and ids.numel() and ids[0] == bos_id:
        ids = ids[1:]
    width = seq_len if bos_id is None else seq_len - 1
    n = ids.numel() // width if width else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * width].view(n, width)
    return windows if bos_id is None else torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], 1)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: torch.device | str | None = None, progress: bool = True,
               bos_id: int | None = None) -> Perplexity:
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = _windows(input_ids, seq_len, max_windows, bos_id)
    n = windows.shape[0]
    was_training = model.training
    model.eval()
    batches = windows.split(batch_size)
    mine = {}  # batch index -> its NLL; several processes each take a share of the batches
    for i in tqdm(distributed.my_share(len(batches)), desc=f"perplexity ({n}×{seq_len})", disable=not progress):
        batch = batches[i].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        mine[i] = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
    model.train(was_training)
    every = {i: v for share in distributed.gather(mine) for i, v in share.items()}
    nll = sum(every[i] for i in range(len(batches)))  # in batch order: the same sum whatever the process count
    if not math.isfinite(nll):
        where = first_non_finite(model, windows[:1].to(device))
        raise NonFiniteError(f"perplexity is not finite: {where or 'the logits'} produced NaN or Inf")
    tokens = n * (seq_len - 1)
    return Perplexity(ppl_of(nll / tokens), nll, tokens, n, seq_len, time.perf_counter() - start)


def ppl_of(mean_nll: float) -> float:
    """exp of a mean NLL; inf past float's range (a finite loss above ~709.8 nats), not an OverflowError."""
    return math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else math.inf


@torch.no_grad()
def first_non_finite(model, input_ids: torch.Tensor) -> str | None:
    """The first module, in the order the forward runs them, whose output holds NaN or Inf on ``input_ids``."""
    found: list[str] = []

    def hook(name):
        def fn(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def bos_token_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise UserError("evaluate with bos: true needs a tokenizer with a BOS token; this one has none (drop bos)")
    return bos


def eval_ids(state, cfg) -> torch.Tensor:
    """Tokenized evaluation text, cached in the run state (tokenizing WikiText-2 takes seconds)."""
    key = ("eval_ids", cfg.dataset, cfg.split, cfg.text_field)
    if key not in state.tokens:
        docs = load_documents(cfg, state.recipe.data.dir)
        state.tokens[key] = evaluation_ids(state.tokenizer, docs)
    return state.tokens[key]


def metric_name(cfg: EvaluateConfig) -> str:
    return f"{source_label(cfg.dataset)}_ppl" + ("_bos" if cfg.bos else "")


def measure(state, model, cfg: EvaluateConfig) -> Perplexity:
    """Perplexity of ``model`` on ``cfg``'s text with ``cfg``'s protocol."""
    bos = bos_token_id(state.tokenizer) if cfg.bos else None
    return perplexity(model, eval_ids(state, cfg), cfg.seq_len, cfg.max_windows, cfg.batch_size, state.device,
                      bos_id=bos)


def evaluate_stage(state, cfg: EvaluateConfig) -> Perplexity:
    """Stage `evaluate`: perplexity of the current model; recorded as `<dataset>_ppl` (`_ppl_bos` with BOS windows)
    after the previous stage."""
    result = measure(state, state.model.to(state.device), cfg)
    protocol = "bos" if cfg.bos else "gptq"
    state.record("evaluate", metric_name(cfg), result.value, label=cfg.label or state.last_stage, protocol=protocol,
                 tokens=result.tokens, seq_len=cfg.seq_len, windows=result.windows, seconds=round(result.seconds, 2),
                 note=f"{cfg.dataset} perplexity over {result.windows} windows of {cfg.seq_len} tokens"
                      + (", each starting with BOS" if cfg.bos else " (GPTQ protocol)"))
    return result
