"""gift_quant: GPTQ/RTN with fp16 salient columns and GIFT-SW noise-injection recovery for decoder-only LLMs.

Command line: ``python -m gift_quant.recipe RECIPE.yaml``. Python: the stage functions take the same config objects
as the YAML (``gift_quant.config``). Once this package is imported, ``AutoModelForCausalLM.from_pretrained`` loads
a packed export (``quant_method: gift_sw``); ``load_quantized`` wraps that call.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {"export_dense": "export", "export_packed": "export", "size_report": "export",
            "CheckpointError": "checkpoint", "load_quantized": "hf_quantizer"}
__all__ = sorted(_EXPORTS) + ["__version__"]
_REGISTRY = "transformers.quantizers.auto"


def __getattr__(name: str):
    # Lazy: `python -m gift_quant.recipe --dry-run` must not pay for importing torch and transformers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'gift_quant' has no attribute {name!r}")


def _register() -> None:
    if "gift_quant.hf_quantizer" in sys.modules:
        return  # importing it is what imported transformers' registry; it registers itself when it finishes
    from .hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers the gift_sw quantizer right after transformers' quantizer registry is imported, so that importing
    gift_quant stays free of torch and transformers yet ``from_pretrained`` always knows ``gift_sw``."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # find the real module through the other finders
        spec = importlib.util.find_spec(name)
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # as if we had never been here
        self._loader.exec_module(module)
        _register()


if _REGISTRY in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
