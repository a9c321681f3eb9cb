"""The recovery methods' behaviour: one small class per method, saying how its model is put in trainable form and how it
ends. What each method *is* (what it trains, its noise, whether it packs, exports or runs block-wise) is its
:class:`~gift_quant.method_specs.MethodSpec`, read through ``method.spec``.

Every method starts from the quantized model (``MixedPrecisionLinear`` layers, everything else frozen) and declares
its trainable tensors by setting ``requires_grad`` explicitly; the loss (next-token, distillation or both), the data
and the budget are the recipe's and the same for every method. ``METHODS`` is the registry the recover, compare and
reconstruct stages and the export read.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import block_norm_weights
from .config import RecoverMethod
from .method_specs import METHOD_SPECS, MethodSpec
from .layers import CodeLatentLinear, MixedPrecisionLinear, STELinear, mixed_linears, swap_module
from .noise import NO_NOISE, NoiseSpec
from .quantizer import QuantSpec, rtn

FpWeights = Callable[[str], torch.Tensor]  # module name -> the full-precision weight it was quantized from


@dataclass(frozen=True)
class Training:
    """The settings a method's ``prepare`` reads (the rest of the recipe is the trainer's business)."""

    noise: NoiseSpec = NO_NOISE
    train_scales: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    seed: int = 0
    master_fp32: bool = False  # trainable tensors in float32 under a half-precision model (bf16 autocast)


class RecoveryMethod:
    name: str = ""

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.name]

    def __getattr__(self, attr: str):  # noise, exportable, blockwise, trains, ...: the spec's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.spec, attr)

    def prepare(self, model: nn.Module, setup: Training, fp_weights: FpWeights | None = None) -> int:
        """Put ``model`` (its quantized linears) in trainable form in place; returns the trainable count."""
        layers = mixed_linears(model)
        if not layers:
            raise ValueError("no quantized linears to train: run the quantize stage first")
        model.requires_grad_(False)
        self._prepare(model, layers, setup, fp_weights)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if setup.master_fp32:
            for p in trainable:
                p.data = p.data.float()
        return sum(p.numel() for p in trainable)

    def _prepare(self, model: nn.Module, layers: dict[str, MixedPrecisionLinear], setup: Training,
                 fp_weights: FpWeights | None) -> None:
        raise NotImplementedError

    def finish(self, model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
        """Back to evaluation form, in place: everything frozen, eval mode. Returns what the report adds."""
        for m in mixed_linears(model).values():
            m.salient_weight.data = m.salient_weight.data.to(dtype)
            m.refresh()
        model.requires_grad_(False)
        model.eval()
        return {}


def _train_scales(layer: MixedPrecisionLinear) -> None:
    layer.scales.requires_grad_(True)
    layer.zeros.requires_grad_(not layer.sym)  # integer zero points train through a straight-through rounding


class NoRecovery(RecoveryMethod):
    name = "none"

    def _prepare(self, model, layers, setup, fp_weights):
        pass


class SalientFT(RecoveryMethod):
    name = "salient_ft"

    def _prepare(self, model, layers, setup, fp_weights):
        for m in layers.values():
            m.set_noise(setup.noise if self.spec.noise else NO_NOISE)
            m.salient_weight.requires_grad_(True)
            if setup.train_scales:
                _train_scales(m)


class GiftSW(SalientFT):
    name = "gift_sw"


class ScalesOnly(RecoveryMethod):
    name = "scales_only"

    def _prepare(self, model, layers, setup, fp_weights):
        for m in layers.values():
            m.set_noise(NO_NOISE)
            _train_scales(m)


class STE(RecoveryMethod):
    """Latent weights through the quantized model's fixed grid, from the centres of their codes' cells (step 0 is the
    quantized model)."""

    name = "ste"
    learn_scales = False

    def _prepare(self, model, layers, setup, fp_weights):
        for name, m in layers.items():
            record, start = self._start(name, m, fp_weights)
            ste = STELinear(record, m.bias, m.dtype, learn_scales=self.learn_scales, start=start)
            swap_module(model, name, ste.to(m.scales.device))

    def _start(self, name: str, m: MixedPrecisionLinear, fp_weights: FpWeights | None):
        """The record the latents train on and where they start (None: its cells' centres)."""
        return m.to_quantized_weight(), None

    def finish(self, model, dtype):
        return {**_back_to_mixed(model, STELinear, dtype), **super().finish(model, dtype)}


def _back_to_mixed(model: nn.Module, kind: type, dtype: torch.dtype) -> dict[str, int]:
    """Swap every trained ``kind`` layer for a quantized linear holding the codes it ends on; how many changed."""
    flipped = total = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, kind):
            flipped += m.flipped_codes()
            total += (m.in_features - m.num_salient) * m.out_features
            new = MixedPrecisionLinear.from_quantized(m.to_quantized_weight(), m.bias, dtype=dtype)
            swap_module(model, name, new.to(m.scales.device))
    return {"codes_flipped": flipped, "codes_total": total}


class STELSQ(STE):
    name, learn_scales = "ste_lsq", True


class QATFromFP(STE):
    """Classic QAT in LLM-QAT's manner: the latents are the weights before quantization, on their own round-to-nearest
    grid (min-max step sizes per group, trained with LSQ); GPTQ's codes and error compensation are not used, so step 0
    is the RTN model, not the GPTQ one. The salient columns start from their fp values too."""

    name, learn_scales = "qat_fp", True

    def _start(self, name, m, fp_weights):
        if fp_weights is None:
            raise ValueError("qat_fp starts from the weights before quantization; none were given")
        fp = fp_weights(name)
        if tuple(fp.shape) != (m.out_features, m.in_features):
            raise ValueError(f"{name}: the full-precision weight has shape {tuple(fp.shape)}, the quantized "
                             f"linear {(m.out_features, m.in_features)}")
        qw = m.to_quantized_weight()
        spec = QuantSpec(bits=qw.bits, group_size=qw.group_size, sym=qw.sym)
        return rtn(fp.to(qw.scales.device), spec, qw.salient_idx), fp


class BlockAP(RecoveryMethod):
    """Every weight's code trains as a latent through the quantizer, starting at the GPTQ codes (step 0 is exactly the
    quantized model; a code changes once its latent has moved half a code), with the step sizes, the zero points when
    asymmetric and the fp salient columns (:class:`~gift_quant.layers.CodeLatentLinear`; EfficientQAT's Block-AP when
    run block-wise). ``finish`` writes the codes the latents round to back into ordinary quantized linears."""

    name = "block_ap"

    def _prepare(self, model, layers, setup, fp_weights):
        for name, m in layers.items():
            swap_module(model, name, CodeLatentLinear(m.to_quantized_weight(), m.bias, m.dtype).to(m.scales.device))

    def finish(self, model, dtype):
        return {**_back_to_mixed(model, CodeLatentLinear, dtype), **super().finish(model, dtype)}


class AdaptedLinear(nn.Module):
    """A quantized linear split for peft: its frozen part as a plain ``nn.Linear`` (``base``, which peft's public
    ``inject_adapter_in_model`` wraps with adapters) and the salient columns beside it."""

    def __init__(self, m: MixedPrecisionLinear) -> None:
        super().__init__()
        self.base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.scales.device,
                              dtype=m.dtype)
        self.base.weight = nn.Parameter(m.frozen_weight(), requires_grad=False)  # shares the dequantized tensor
        if m.bias is not None:
            self.base.bias = nn.Parameter(m.bias, requires_grad=False)
        self.register_buffer("salient_idx", m.salient_idx)
        self.register_buffer("salient_weight", m.salient_weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.salient_idx.numel():
            y = y + nn.functional.linear(x.index_select(-1, self.salient_idx), self.salient_weight.to(x.dtype))
        return y


class LoRA(RecoveryMethod):
    name = "lora"

    def _prepare(self, model, layers, setup, fp_weights):
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import set_seed

        rank = setup.lora_rank or lora_rank(model)
        for name, m in layers.items():
            swap_module(model, name, AdaptedLinear(m))
        config = LoraConfig(r=rank, lora_alpha=setup.lora_alpha or 2.0 * rank, lora_dropout=0.0,
                            target_modules=[f"{name}.base" for name in layers])
        set_seed(setup.seed)  # LoRA's A matrices are random
        inject_adapter_in_model(config, model)


def setup_of(cfg, device: torch.device, dtype: torch.dtype, noise_bits: int | None = None) -> Training:
    """What a recover, compare or reconstruct entry ``cfg`` gives its method; ``noise_bits`` is the grid the noise
    falls back to when ``cfg.noise_bits`` is unset (before quantization: the quantize stage's)."""
    noise = NoiseSpec(kind=cfg.noise, scale=cfg.noise_scale, bits=cfg.noise_bits or noise_bits, source=cfg.noise_source)
    return Training(noise=noise, train_scales=cfg.train_scales and METHOD_SPECS[cfg.method].salient,
                    lora_rank=getattr(cfg, "lora_rank", None), lora_alpha=getattr(cfg, "lora_alpha", None),
                    seed=cfg.seed, master_fp32=device.type == "cuda" and dtype != torch.float32)


def make_trainable(model: nn.Module, part: nn.Module, cfg, device: torch.device, dtype: torch.dtype,
                   fp_weights: FpWeights | None = None) -> int:
    """``cfg.method``'s trainable form of ``part`` (the whole ``model``, or one decoder block of it), with the norms
    there when ``cfg.train_norms``; returns the trainable count."""
    setup = setup_of(cfg, device, dtype)
    count = METHODS[cfg.method].prepare(part, setup, fp_weights)
    if cfg.train_norms:
        for weight in block_norm_weights(model, None if part is model else part).values():
            weight.requires_grad_(True)
            if setup.master_fp32:
                weight.data = weight.data.float()
            count += weight.numel()
    return count


def gift_params(model: nn.Module) -> int:
    """Trainable parameters of GIFT-SW on this model: out × k summed over the quantized linears."""
    return sum(m.salient_weight.numel() for m in mixed_linears(model).values())


def lora_rank(model: nn.Module) -> int:
    """The rank r whose LoRA (r·(in + out) per linear) has the parameter count closest to GIFT-SW's."""
    per_rank = sum(m.in_features + m.out_features for m in mixed_linears(model).values())
    return max(1, round(gift_params(model) / per_rank))


METHODS: dict[str, RecoveryMethod] = {m.name: m for m in (GiftSW(), SalientFT(), ScalesOnly(), STE(), STELSQ(),
                                                           QATFromFP(), BlockAP(), LoRA(), NoRecovery())}
# The recipe's names (config.RecoverMethod, kept torch-free for --dry-run) and this registry must agree.
assert set(METHODS) == set(typing.get_args(RecoverMethod)), "config.RecoverMethod and METHODS differ"
