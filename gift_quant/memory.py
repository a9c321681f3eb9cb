"""The process's memory: the peak of a block of work (CUDA max allocated, else the RSS sampled in a thread), the
per-thread scratch buffers the kernels dequantize into, and handing freed heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

import torch


class PeakMemory:
    """``peak_mb`` while the block runs; ``extra_mb`` is the peak above the level at entry (what the block itself
    needed). On CPU the allocator may keep memory freed by earlier work, so a later block's ``extra_mb`` can read
    low."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.02) -> None:
        self.device, self.interval_s = torch.device(device), interval_s
        self.peak_mb = self.extra_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb, self.extra_mb = peak / 2**20, (peak - self._start) / 2**20


def trim_heap() -> None:
    """Hand the heap memory freed by the builds' temporaries back to the OS (glibc keeps it otherwise, and it would
    count as the model's resident memory); glibc's malloc_trim, elsewhere a no-op."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per thread and dtype that the many-row paths dequantize weights into (every packed linear's
    prefill, the quantized lm_head's chunks): a fresh MB-sized weight per matmul would churn the allocator (glibc
    keeps such freed blocks: ~50 MB of RSS on SmolLM2). The caller uses it before the next call for the same dtype."""
    buffers = _scratch.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
