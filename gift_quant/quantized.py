"""The result of quantizing one linear: integer codes on the non-salient columns plus fp salient columns.

This record is what the quantize stage produces and what recover, export and evaluate consume. Conventions follow
GPTQ: ``W[:, j] ≈ scales[:, g_idx[j]] * (codes[:, j] - zeros[:, g_idx[j]])``. Salient columns carry the code equal to
their zero point, so the quantized part is exactly 0 there, and their real values live in ``salient_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # (out, in) uint8, values in [0, 2**bits - 1]
    scales: torch.Tensor  # (out, n_groups) float32, quantization step Δ
    zeros: torch.Tensor  # (out, n_groups) float32 holding integers in [0, 2**bits - 1]
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    salient_idx: torch.Tensor  # (k,) int64, sorted ascending
    salient_weight: torch.Tensor  # (out, k) float32, fp columns kept out of quantization
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def quantized_part(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized low-bit weight with the salient columns exactly zero."""
        g = self.g_idx.long()
        return (self.scales[:, g] * (self.codes.to(torch.float32) - self.zeros[:, g])).to(dtype)

    def step_per_weight(self) -> torch.Tensor:
        """Δ of every weight entry (out, in): its row's (or row-group's) quantization step."""
        return self.scales[:, self.g_idx.long()]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full fake-quant weight: quantized part plus the salient columns written back."""
        w = self.quantized_part(torch.float32)
        w[:, self.salient_idx] = self.salient_weight.to(torch.float32)
        return w.to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        out["meta"] = torch.tensor([self.bits, self.group_size, int(self.sym)], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "QuantizedWeight":
        bits, group_size, sym = (int(v) for v in sd["meta"].tolist())
        tensors = {k: v for k, v in sd.items() if k != "meta"}
        return cls(**tensors, bits=bits, group_size=group_size, sym=bool(sym))
