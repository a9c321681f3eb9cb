"""What each recovery method is, said once and without torch: the recipe's validation, ``--dry-run``'s estimate, the
stages and the export read these specs; ``methods.py`` gives each spec its behaviour (one class per method).

| method      | trains                                                                  | noise | packable | exports |
|-------------|-------------------------------------------------------------------------|-------|----------|---------|
| gift_sw     | salient columns (+ scales with ``train_scales``)                        | yes   | yes      | yes     |
| salient_ft  | salient columns (+ scales with ``train_scales``)                        | no    | yes      | yes     |
| scales_only | quantization scales (+ zero points if asymmetric), codes fixed          | no    | yes      | yes     |
| ste         | latent weights from their GPTQ codes' cell centres, fixed grid (straight-through) | no | no  | yes     |
| ste_lsq     | the same and the step sizes (LSQ)                                       | no    | no       | yes     |
| qat_fp      | latent weights from the fp weights on their RTN grid, step sizes (LLM-QAT-style QAT) | no | no | yes  |
| block_ap    | every weight from its code's cell centre, step sizes, zero points, salient columns (EfficientQAT's Block-AP in ``reconstruct``) | no | no | yes |
| lora        | LoRA adapters beside the frozen quantized linears (peft)                | no    | no       | no      |
| none        | nothing: the quantized model as it is (a comparison row)                | no    | no       | yes     |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trains: str  # in words, for reports
    noise: bool = False  # GIFT-SW noise on the frozen part while training
    salient: bool = False  # the salient columns train (``train_scales`` may add the step sizes)
    packable: bool = False  # trains beside a frozen low-bit part that ``frozen: packed`` can keep bit-packed
    latent_bytes: int = 0  # > 0: every weight trains as a latent value; bytes autograd keeps per latent weight
    learns_scales: bool = False  # the step sizes train by definition
    zero_points: bool = True  # where the step sizes train, an asymmetric grid's zero points train with them
    exportable: bool = True  # the result is a quantized model the packed format holds
    blockwise: bool = True  # usable by block-wise reconstruction (trains only tensors inside the blocks)
    needs_fp_weights: bool = False  # latents start from the weights before quantization
    trains_nothing: bool = False
    adapters: bool = False  # adds LoRA adapters

    @property
    def latent(self) -> bool:
        return self.latent_bytes > 0


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("gift_sw", "salient columns, noise on the frozen part", noise=True, salient=True,
               packable=True),
    MethodSpec("salient_ft", "salient columns", salient=True, packable=True),
    MethodSpec("scales_only", "quantization scales (codes fixed)", learns_scales=True, packable=True),
    MethodSpec("ste", "latent weights from their codes' cell centres (straight-through)", latent_bytes=8,
               blockwise=False),
    MethodSpec("ste_lsq", "latent weights from their codes' cell centres and step sizes (LSQ)", latent_bytes=12,
               learns_scales=True, zero_points=False, blockwise=False),
    MethodSpec("qat_fp", "latent weights from the fp weights on their RTN grid, step sizes (LSQ; LLM-QAT-style "
               "QAT, step 0 is RTN)", latent_bytes=12, learns_scales=True, zero_points=False, blockwise=False,
               needs_fp_weights=True),
    MethodSpec("block_ap", "every weight through the quantizer from its code's cell centre, step sizes (and zero "
               "points), salient columns", latent_bytes=12, learns_scales=True),
    MethodSpec("lora", "LoRA adapters (rank matched to gift_sw's parameter count); unmerged, so not exportable",
               exportable=False, blockwise=False, adapters=True),
    MethodSpec("none", "nothing (the quantized model as it is)", trains_nothing=True),
)}


def names(**flags: bool) -> tuple[str, ...]:
    """The methods whose specs have every given attribute at the given value, in the table's order."""
    return tuple(n for n, s in METHOD_SPECS.items() if all(getattr(s, k) == v for k, v in flags.items()))


def scales_train(method: str, train_scales: bool) -> bool:
    """Whether ``method``'s step sizes train: by definition (``learns_scales``), or added to the salient columns by
    ``train_scales`` (which other methods ignore); read by the estimate, reconstruct's report and the benchmark, and
    checked against the trainer's parameters (tests/test_recover.py)."""
    spec = METHOD_SPECS[method]
    return spec.learns_scales or (train_scales and spec.salient)
