"""Stage `quantize`: GPTQ or RTN on every target linear, layer by layer, with fp salient columns.

Each finished layer is saved under `<output_dir>/quantize/` together with a fingerprint of everything that decides the
result (model, calibration windows, settings); a rerun with the same fingerprint continues after the last finished
layer, a different one starts over. Afterwards every target linear is a `MixedPrecisionLinear` (fake-quant in eval
mode), ready for `evaluate`, `recover` and `export`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import ResultStore
from .architectures import architecture, decoder_layers, target_linears
from .calibrate import capture_layer0_inputs, linear_groups, observe, run_layer
from .config import QuantizeConfig, SelectConfig
from .distributed import is_main
from .fingerprint import fingerprint
from .errors import NonFiniteError, UserError
from .gptq import GPTQ
from .io_utils import write_csv
from .layers import MixedPrecisionLinear, replace_linears
from .quantized import QuantizedWeight
from .quantizer import QuantSpec, rtn
from .saliency import ChannelNorms
from .state import Quantization
from .select import choose_salient

log = logging.getLogger(__name__)

LOG_FIELDS = ["layer", "module", "method", "bits", "group_size", "salient", "gptq_loss", "damp", "tokens", "seconds"]


def quant_spec(cfg: QuantizeConfig) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse, grid=cfg.grid,
                     max_shrink=cfg.max_shrink, norm=cfg.norm)


def as_mixed_precision(qw: QuantizedWeight, bias: torch.Tensor | None) -> MixedPrecisionLinear:
    return MixedPrecisionLinear.from_quantized(qw, bias)  # no noise: training stages set their own


@dataclass
class LinearStats:
    """What one linear's calibration inputs leave behind: GPTQ's Hessian and the per-channel norms."""

    gptq: GPTQ | None
    norms: ChannelNorms
    tokens: int = 0

    def clone(self) -> "LinearStats":
        return LinearStats(self.gptq.clone() if self.gptq is not None else None, self.norms.clone(), self.tokens)

    def add(self, x: torch.Tensor) -> None:
        if self.gptq is not None:
            self.gptq.add_batch(x)
        self.norms.add_batch(x)
        self.tokens += x.numel() // x.shape[-1]


@dataclass
class LinearQuantizer:
    """The per-linear *how*: turns one nn.Linear plus its statistics into a QuantizedWeight and a log row."""

    cfg: QuantizeConfig
    select: SelectConfig | None
    fixed_salient: dict[str, torch.Tensor] = field(default_factory=dict)  # chosen earlier (Pre-GIFT-SW)
    solver: type[GPTQ] = GPTQ  # benchmarks plug the reference implementation in here

    @property
    def spec(self) -> QuantSpec:
        return quant_spec(self.cfg)

    def new_stats(self, linear: nn.Linear) -> LinearStats:
        gptq = self.solver(linear.in_features) if self.cfg.method == "gptq" else None
        return LinearStats(gptq, ChannelNorms(linear.in_features))

    def __call__(self, name: str, linear: nn.Linear, stats: LinearStats | None) -> tuple[QuantizedWeight, dict]:
        start = time.perf_counter()
        weight = linear.weight.detach()
        salient = self.fixed_salient.get(name)
        if salient is None and stats is not None:
            h_diag = torch.diagonal(stats.gptq.H).clone() if stats.gptq is not None else None
            salient = choose_salient(name, weight, self.cfg.bits, self.select, x_linf=stats.norms.linf,
                                     x_l2=stats.norms.l2, h_diag=h_diag)
        salient = salient if salient is not None else torch.empty(0, dtype=torch.int64)
        row = {"module": name, "method": self.cfg.method, "bits": self.cfg.bits, "group_size": self.cfg.group_size,
               "salient": int(salient.numel()), "gptq_loss": "", "damp": "", "tokens": stats.tokens if stats else 0}
        try:
            if self.cfg.method == "gptq":
                res = stats.gptq.quantize(weight, self.spec, salient.to(weight.device), block_size=self.cfg.block_size,
                                          percdamp=self.cfg.percdamp, act_order=self.cfg.act_order,
                                          static_groups=self.cfg.static_groups)
                qw = res.weight
                row.update(gptq_loss=f"{res.loss:.6g}", damp=res.damp)
            else:
                qw = rtn(weight, self.spec, salient.to(weight.device))
        except (ValueError, RuntimeError) as e:  # a group size that does not fit, non-finite inputs, a broken H
            raise UserError(f"{name}: {e}") from e
        if not (torch.isfinite(qw.scales).all() and torch.isfinite(qw.salient_weight).all()):
            raise NonFiniteError(f"{name}: quantization produced NaN or Inf (scales or salient columns)")
        row["seconds"] = round(time.perf_counter() - start, 3)
        return _to_cpu(qw), row


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    sd = {k: v.cpu() for k, v in qw.state_dict().items()}
    return QuantizedWeight.from_state_dict(sd)


class LayerCheckpoints(ResultStore):
    """The quantized layers on disk: each layer's records and log rows, valid only under one fingerprint."""

    def __init__(self, folder: Path, fingerprint: str, resume: bool):
        super().__init__(folder, fingerprint, resume, prefix="layer")

    def load_layer(self, index: int) -> tuple[dict[str, QuantizedWeight], list[dict]] | None:
        saved = self.load(index)
        if saved is None:
            return None
        tensors, metadata = saved
        names = dict.fromkeys(k.rsplit("/", 1)[0] for k in tensors)
        records = {n: QuantizedWeight.from_state_dict({k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                                                       if k.rsplit("/", 1)[0] == n}) for n in names}
        return records, json.loads(metadata["rows"])

    def save_layer(self, index: int, records: dict[str, QuantizedWeight], rows: list[dict]) -> None:
        tensors = {f"{n}/{k}": v for n, qw in records.items() for k, v in qw.state_dict().items()}
        self.save(index, tensors, {"rows": json.dumps(rows)})


def quantize_model(model, quantizer: LinearQuantizer, windows: torch.Tensor | None, *, device: torch.device,
                   true_sequential: bool = True, batch_size: int = 8, checkpoints: LayerCheckpoints | None = None,
                   stop_after: int | None = None) -> list[dict]:
    """Quantize every target linear of `model` in place; returns the per-module log rows.

    Without calibration windows (RTN with no salient columns) weights are quantized directly, without data.
    `stop_after` ends the pass after that layer (used to test resuming).
    """
    arch = architecture(model)
    targets = target_linears(model, quantizer.cfg.targets)
    layers = decoder_layers(model)
    if windows is None:
        return _quantize_without_data(model, quantizer, targets)
    # A layer's inputs are needed only to quantize it: a run that resumes every layer computes no activations.
    pending = [i for i in range(len(layers)) if not (checkpoints and checkpoints.has(i))]
    if not pending:
        log.info("quantize: every layer is saved in %s; loading them, no activations computed", checkpoints.folder)
    chunks, at = None, 0  # the calibration activations at the input of layer `at`
    rows: list[dict] = []
    for index, layer in enumerate(tqdm(layers, desc=f"quantize ({quantizer.cfg.method}, {quantizer.cfg.bits}-bit)")):
        prefix = arch.block_prefix(index)
        home = next(layer.parameters()).device
        layer.to(device)
        saved = checkpoints.load_layer(index) if checkpoints else None
        if saved is not None:
            records, layer_rows = saved
            replace_linears(layer, {n[len(prefix):]: qw for n, qw in records.items()}, as_mixed_precision)
        else:
            if chunks is None or at != index:
                chunks, at = _inputs_of(model, layers, index, windows, device, batch_size), index
            groups = arch.groups if true_sequential else None
            records, layer_rows = _quantize_layer(layer, chunks, quantizer, targets, prefix, groups)
            for r in layer_rows:
                r["layer"] = index
            if checkpoints:
                checkpoints.save_layer(index, records, layer_rows)
        rows += layer_rows
        if chunks is not None and at == index and any(i > index for i in pending):
            with torch.no_grad():
                chunks, at = run_layer(layer, chunks), index + 1
        layer.to(home)
        if stop_after is not None and index >= stop_after:
            break
    return rows


@torch.no_grad()
def _inputs_of(model, layers, index: int, windows: torch.Tensor, device: torch.device, batch_size: int):
    """The calibration activations at the input of layer ``index``, through the (already quantized) layers before."""
    chunks = capture_layer0_inputs(model, windows, device, batch_size)
    for layer in layers[:index]:
        home = next(layer.parameters()).device
        chunks = run_layer(layer.to(device), chunks)
        layer.to(home)
    return chunks


@torch.no_grad()
def _quantize_layer(layer, chunks, quantizer: LinearQuantizer, targets: dict[str, nn.Linear], prefix: str, groups):
    records: dict[str, QuantizedWeight] = {}
    rows = []
    for group in linear_groups(layer, lambda n: prefix + n in targets, groups):
        stats = collect_stats(layer, chunks, group, quantizer)
        group_records = {}
        for n, linear in group.items():
            qw, row = quantizer(prefix + n, linear, stats.pop(n))
            group_records[n] = qw
            rows.append(row)
        replace_linears(layer, group_records, as_mixed_precision)
        records.update({prefix + n: qw for n, qw in group_records.items()})
    return records, rows


def collect_stats(layer, chunks, group: dict[str, nn.Linear], quantizer: LinearQuantizer) -> dict[str, LinearStats]:
    """Input statistics of each linear in `group`. Linears fed the very same tensor (q/k/v, gate/up) share one
    accumulation, copied at the end: the Hessian is the costliest part of calibration after the forwards."""
    stats: dict[str, LinearStats] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # (input tensor, name of the linear whose stats took it)

    def observer(name: str, x: torch.Tensor) -> None:
        if x is last[0]:
            alias[name] = last[1]
            return
        last[:] = [x, name]
        if name not in stats:
            stats[name] = quantizer.new_stats(group[name])
        stats[name].add(x)

    observe(layer, chunks, group, observer)
    last.clear()
    for name, owner in alias.items():
        stats[name] = stats[owner].clone()
    return stats


def _quantize_without_data(model, quantizer: LinearQuantizer, targets: dict[str, nn.Linear]) -> list[dict]:
    rows = []
    for name, linear in tqdm(targets.items(), desc=f"quantize (rtn, {quantizer.cfg.bits}-bit, no data)"):
        qw, row = quantizer(name, linear, None)
        rows.append({**row, "layer": _layer_index(name)})
        replace_linears(model, {name: qw}, as_mixed_precision)
    return rows


def _layer_index(name: str) -> int | str:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else ""


def quantize_stage(state, cfg: QuantizeConfig) -> None:
    select, calib, fixed = state.selection, state.calibration, state.fixed_salient or {}
    needs_data = cfg.method == "gptq" or (select is not None and not fixed)  # a calibrate stage ran (stages.py)
    windows = calib.windows if needs_data else None
    quantizer = LinearQuantizer(cfg, select, fixed)
    start = time.perf_counter()
    model = state.model
    stamp = fingerprint(state, cfg.model_dump(mode="json", exclude={"resume"}),
                        ([windows] if windows is not None else []) + [fixed[n] for n in sorted(fixed)])
    ckpt = LayerCheckpoints(state.output_dir / "quantize", stamp, cfg.resume)
    rows = quantize_model(model, quantizer, windows, device=state.device,
                          true_sequential=calib.config.true_sequential if calib else True,
                          batch_size=calib.config.batch_size if calib else 8, checkpoints=ckpt)
    seconds = time.perf_counter() - start
    if is_main():
        write_csv(state.output_dir / "quantize_log.csv", rows, LOG_FIELDS)
    salient = {n: m.salient_idx.cpu() for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}
    state.quantization = Quantization(cfg, stamp, salient)
    salient = sum(r["salient"] for r in rows)
    state.record("quantize", "quantized_linears", len(rows), seconds=round(seconds, 1),
                 salient_columns=salient, peak_rss_mb=_peak_rss_mb(), resumed_layers=ckpt.loaded,
                 note=f"quantize: {cfg.method} {cfg.bits}-bit, group {cfg.group_size}, "
                      f"{'sym' if cfg.sym else 'asym'}; per-module log in quantize_log.csv")


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
