"""Per-index results of a resumable pass (quantized layers, reconstructed blocks) as safetensors files.

The files are valid only under one fingerprint (of everything that decides them); a different fingerprint, or
``resume: false``, removes them — only them, never anything else in the folder. Each file carries the sha256 of its
tensors, so a truncated, garbled or altered file is recomputed with a warning instead of failing or being trusted.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .distributed import is_main, rank
from .fingerprint import tensor_bytes
from .io_utils import write_text

log = logging.getLogger(__name__)

DIGEST_KEY = "sha256"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(f"{key}:{tensors[key].dtype}:{tuple(tensors[key].shape)}".encode())
        h.update(tensor_bytes(tensors[key]))
    return h.hexdigest()


class ResultStore:
    def __init__(self, folder: Path, fingerprint: str, resume: bool, prefix: str) -> None:
        self.folder, self.prefix = Path(folder), prefix
        self.loaded = 0  # results taken from disk by this run
        stamp = self.folder / "fingerprint.txt"
        try:
            same = stamp.is_file() and stamp.read_text() == fingerprint
        except (OSError, UnicodeDecodeError):
            same = False
        if not is_main():  # several processes: rank 0 saved the results, this rank only reads them
            if not same:
                raise RuntimeError(f"rank {rank()}: the {prefix} results rank 0 saved in {self.folder} were made "
                                   f"from other inputs than this rank's (its model, data or settings differ)")
            return
        if self.folder.exists() and (not resume or not same):
            saved = list(self.folder.glob(f"{prefix}_*.safetensors"))
            if saved:
                log.info("%s: %s; starting over", prefix, "resume disabled" if not resume else
                         "model, data or settings changed since the saved results")
            for p in saved:  # only what this class writes: the folder may hold anything else
                p.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(stamp, fingerprint)

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}_{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        """Whether a result for ``index`` is on disk (it may still fail its checksum when loaded)."""
        return self._path(index).is_file()

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The saved tensors and metadata of ``index``, or None when absent or damaged (logged)."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("%s: saved result %s is unreadable (%s); computing it again", self.prefix, path, err)
            return None
        if metadata.pop(DIGEST_KEY, None) != _digest(tensors):
            log.warning("%s: saved result %s fails its checksum; computing it again", self.prefix, path)
            return None
        self.loaded += 1
        return tensors, metadata

    def save(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if not is_main():
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        tmp = self._path(index).with_suffix(".tmp")
        save_file(tensors, tmp, metadata={**metadata, DIGEST_KEY: _digest(tensors)})
        tmp.replace(self._path(index))
