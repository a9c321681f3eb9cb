"""Tensors that follow a module's device moves but keep their dtype under ``model.to(dtype)``.

Quantization grids (scales, zero points), stored fp16 checkpoint values and fixed rotation matrices must not be
rounded when a model is cast to bf16 for compute: one mixin pins them, for buffers and parameters alike.
"""

from __future__ import annotations

from torch import nn


class PinnedDtype(nn.Module):
    """Subclasses list the names of their dtype-pinned buffers or parameters in ``_PINNED``."""

    _PINNED: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        pinned = {}
        for name in self._PINNED:
            for store in (self._buffers, self._parameters):
                if store.get(name) is not None:
                    pinned[name] = (store, store.pop(name))
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (store, t) in pinned.items():
                device = fn(t.detach().new_empty(0)).device  # where `fn` sends tensors, without casting this one
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(device)  # the same Parameter object: optimizers keep their reference
                    store[name] = t
                else:
                    store[name] = t.to(device)
        return self
