"""gift_quant: GPTQ/RTN with fp16 salient columns and GIFT-SW noise-injection recovery for decoder-only LLMs.

Command line: ``python -m gift_quant.recipe RECIPE.yaml``. Python: the stage functions take the same config objects
as the YAML (``gift_quant.config``); ``load_quantized`` reloads an exported checkpoint.
"""

__version__ = "0.1.0"

_EXPORTS = {"CheckpointError", "export_dense", "export_packed", "load_quantized", "size_report"}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    # Lazy: `python -m gift_quant.recipe --dry-run` must not pay for importing torch and transformers.
    if name in _EXPORTS:
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'gift_quant' has no attribute {name!r}")
