"""Greedy decoding with a static KV cache and a compiled one-token step.

On the CPU a decode step of a small model is mostly per-operator overhead, not arithmetic: eager transformers runs
a few thousand small operators per token, and ``generate`` adds its own per-token work (logits processors, stopping
criteria, input preparation). :class:`CompiledDecoder` keeps the KV cache at a fixed shape (transformers'
``StaticCache``), compiles the one-token forward plus its argmax once per cache size (``torch.compile``, Inductor),
and runs a bare loop around it. Prefill runs eagerly (many rows: the packed linears' dense path, float32 accuracy).

A static cache attends over all its slots, used or not, so its size follows the request: prompt + new tokens
rounded up to a power of two (at least ``MIN_CACHE_LEN``); each new size compiles once. Attention runs as
transformers' ``eager`` implementation (matmul and softmax, which Inductor fuses): for a one-row query CPU SDPA's
flash kernel cost ≈ 0.5 ms a call, 4x the whole matmul form, at 512 slots.

The compiled step skips Dynamo's guards on the model's modules (``skip_guard_on_all_nn_modules_unsafe``: checking
them costs milliseconds per token) and Inductor's checks of each input's and each external kernel's output's shape
and strides (``size_asserts``: about a thousand a token, ~5 % of a SmolLM2 step), so it does not notice changes to
the model (which kernel form a linear has, its shapes, moves): make a new decoder after moving, reloading or editing
the model. What those checks caught on the inputs is checked once per ``generate`` call instead: the shape, strides,
dtype and device of every tensor the model's modules hold (parameters, buffers, and the tensors and modules inside
their attributes: kernel forms) must be those the step was compiled with, else a RuntimeError says to make a new
decoder; the kernels' outputs must have the layouts their fake implementations trace (tests/test_cpu_rows.py checks
gift_quant's ops). Each decoder compiles a code object of its own (Dynamo caches per code object: two decoders
sharing one would run one model's graph on the other), and each of its cache and batch sizes is one more compiled
entry of it; Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) before running it eagerly.
``cpp_wrapper=True`` has Inductor write the step's wrapper in C++ (compiled apart from the kernels, so the first call
stays near the Python wrapper's compile time); on SmolLM2 it decoded no faster than the Python wrapper on a quiet
machine (docs/size_perplexity.md), so it is off by default.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator

import torch
from torch import nn

MIN_CACHE_LEN = 128


def cache_len(tokens: int) -> int:
    """The static cache's size for ``tokens`` positions: the next power of two, at least ``MIN_CACHE_LEN``."""
    return max(MIN_CACHE_LEN, 1 << max(tokens - 1, 0).bit_length())


def _own_code(method):
    """``method`` bound to a copy of its code object. Dynamo keeps its compiled graphs per code object, and the
    step skips the guards that would tell two models apart: without a code object of its own, a second decoder would
    run the first one's graph (its structure, dtypes and kernel forms) on another model."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


def _tensors(value: object, depth: int = 3) -> Iterator[torch.Tensor]:
    """The tensors in a module attribute: itself, or inside dicts, tuples, lists, dataclasses (a CPU kernel form) and
    modules kept there (a CUDA kernel's layer)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, nn.Module):
        yield from value.parameters()
        yield from value.buffers()
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth - 1)
    elif depth and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth - 1)
    elif depth and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name), depth - 1)


def tensor_holders(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(module name, attribute) of every module attribute that holds tensors (submodules are entries of their own).
    Found once per decoder: the walk reads every attribute (configs, hooks), ~10x the cost of reading the holders."""
    return tuple((name, key) for name, module in model.named_modules() for key, value in vars(module).items()
                 if key != "_modules" and next(_tensors(value), None) is not None)


def tensor_layouts(model: nn.Module, holders: tuple[tuple[str, str], ...]) -> tuple:
    """Shape, strides, dtype and device of the tensors in ``holders`` (by name: a replaced module is read anew): what
    a compiled step that checks neither module guards nor input sizes was traced with."""
    modules = dict(model.named_modules())
    return tuple((name, key, tuple(t.shape), t.stride(), t.dtype, t.device) for name, key in holders
                 for t in _tensors(vars(modules[name]).get(key) if name in modules else None))


class CompiledDecoder:
    """``generate(input_ids, max_new_tokens)`` → the prompt followed by the greedy tokens, as
    ``model.generate(input_ids, do_sample=False, max_new_tokens=...)`` returns them: rows stop at the generation
    config's EOS ids (``stop_at_eos``) and are padded with its pad id (the first EOS id when it names none) until
    every row has stopped. Rows are prompts of one length (no attention mask: left-padded batches are not
    supported); decoding is greedy only, and the generation config's logits processors (``repetition_penalty``,
    ``suppress_tokens``, ``min_new_tokens``, ...) are not applied. The first call for a cache size compiles
    (30–110 s for a 30-layer model on one core; Inductor's cache shortens later processes' first calls); later calls
    reuse the step. ``compile=False`` runs the same loop eagerly (a reference); ``cpp_wrapper=True`` uses Inductor's
    C++ wrapper."""

    def __init__(self, model: nn.Module, compile: bool = True, cpp_wrapper: bool = False) -> None:
        self.model = model.eval()
        self.model.set_attn_implementation("eager")
        self.caches: dict[tuple, object] = {}
        self.step = self._step
        self.compiled = compile
        self._holders: tuple | None = None  # where the model's tensors are, and their layouts, as first compiled
        self._layouts: tuple | None = None
        if compile:
            skip_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # absent in older torch
            options = {"size_asserts": False}
            if skip_guards is not None:
                options["guard_filter_fn"] = skip_guards
            if cpp_wrapper:
                options.update(cpp_wrapper=True, cpp_wrapper_build_separate=True)
            self.step = torch.compile(_own_code(self._step), dynamic=False, fullgraph=True, options=options)

    def _logits_argmax(self, ids: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=cache, cache_position=position, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    def _step(self, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        return self._logits_argmax(token.view(-1, 1), position, cache)

    def _cache(self, tokens: int, ids: torch.Tensor):
        """A reset static cache for ``tokens`` positions of this batch: a StaticCache takes its batch size, dtype
        and device from its first use and keeps them."""
        from transformers import StaticCache

        key = (cache_len(tokens), ids.shape[0], ids.device, self.model.dtype)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=key[0])
        cache = self.caches[key]
        cache.reset()
        return cache

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True) -> torch.Tensor:
        if max_new_tokens < 1:
            return input_ids
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        cache = self._cache(prompt_len + max_new_tokens, input_ids)
        eos, pad = self._eos_pad(device) if stop_at_eos else (None, None)
        token = self._logits_argmax(input_ids, torch.arange(prompt_len, device=device), cache)
        if cache.get_seq_length() != prompt_len:  # a transformers that took no `cache=` would drop the context
            raise RuntimeError(f"the model did not fill the static cache ({cache.get_seq_length()} of "
                               f"{prompt_len} positions): this transformers version is not supported")
        if self.compiled:
            self._check_layouts()  # after prefill, which builds the kernel forms the step reads
        tokens = [token]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for position in range(prompt_len, prompt_len + max_new_tokens - 1):
            if eos is not None:
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            token = self.step(token, torch.tensor([position], device=device), cache)
            if eos is not None:
                token = torch.where(finished, pad, token)
            tokens.append(token)
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)

    def _check_layouts(self) -> None:
        if self._holders is None:
            self._holders = tensor_holders(self.model)
        layouts = tensor_layouts(self.model, self._holders)
        if self._layouts is None:
            self._layouts = layouts
        elif layouts != self._layouts:
            changed = next((a[:2] for a, b in zip(layouts, self._layouts) if a != b), "the number of tensors")
            raise RuntimeError(f"the model changed since this decoder compiled its step ({changed}: shape, strides, "
                               "dtype or device): make a new CompiledDecoder for it")

    def _eos_pad(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        config = self.model.generation_config
        if config.eos_token_id is None:
            return None, None
        ids = config.eos_token_id
        eos = torch.tensor([ids] if isinstance(ids, int) else list(ids), device=device)
        pad = eos[0] if config.pad_token_id is None else torch.tensor(config.pad_token_id, device=device)
        return eos, pad
