"""Empirical bias correction: give each quantized layer back the output mean its float twin has.

Rounding weights and activations shifts the mean of a layer's output, and on a BEV map the
shift is systematic: empty pillars far outnumber objects, and after the first conv+BN+ReLU
every empty site holds the same small per-channel value, which a per-tensor INT8 step
(sized for object activations about 100x larger) rounds the same way everywhere. The next
layer sees that as a constant input error over the whole map. Subtracting the measured
per-channel mean error from the layer's bias removes it exactly at empty sites and on
average elsewhere, costs nothing at inference (only biases change) and keeps the export
symmetric INT8 (Nagel et al., "Data-Free Quantization", 2019, empirical variant; Finkelstein
et al., 2019). Layers are corrected one at a time in execution order, each measured with all
earlier layers quantized and already corrected, so shifts do not compound.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..batches import call_model
from ..lockstep import Arrival, Lane, Lockstep
from .modules import QuantModuleMixin
from .quantizer import QuantMode, temporary_quant_mode

logger = logging.getLogger(__name__)


def _output_features(output: Any) -> torch.Tensor | None:
    """The dense feature tensor of a layer's output (a sparse tensor's ``features``), None for others."""
    features = getattr(output, "features", output)
    return features if isinstance(features, torch.Tensor) else None


def correctable_layers(model: nn.Module, patterns: Sequence[str] = ("*",)) -> dict[str, QuantModuleMixin]:
    """Quantized layers matching ``patterns`` that have a per-channel bias to correct."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantModuleMixin) and isinstance(getattr(m, "bias", None), torch.Tensor)
            and m.bias.dim() == 1 and (m.weight_quantizer.enabled or m.input_quantizer.enabled)
            and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def _channel_sums(module: QuantModuleMixin, output: Any) -> tuple[torch.Tensor, int] | None:
    """Per-output-channel sum (float64) and row count of a layer's output; None for non-tensor outputs."""
    features = _output_features(output)
    if features is None:
        return None
    axis = module.feature_axis % features.dim()
    flat = features.detach().movedim(axis, -1).reshape(-1, features.shape[axis]).double()
    return flat.sum(0), flat.shape[0]


@dataclass
class ChannelMeans:
    """Per-output-channel means of some layers over a set of batches, and how they ran.

    ``order`` is the execution order (first call), ``calls`` the number of calls per batch: a layer
    called exactly once in every batch is corrected in lockstep, others at the end of a pass."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    calls: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, sums: torch.Tensor, count: int) -> None:
        self.sums[name] = self.sums[name] + sums if name in self.sums else sums
        self.counts[name] = self.counts.get(name, 0) + count
        if name not in self.order:
            self.order.append(name)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / max(self.counts[name], 1) for name, total in self.sums.items()}


@torch.no_grad()
def channel_means(model: nn.Module, layers: dict[str, QuantModuleMixin], data: Sequence[Any],
                  mode: QuantMode = QuantMode.FLOAT) -> ChannelMeans:
    """One pass over ``data`` in ``mode``: each layer's per-channel output mean, order and call counts."""
    stats = ChannelMeans()
    batch_calls: dict[str, int] = {}

    def record(module: QuantModuleMixin, output: Any, name: str) -> None:
        measured = _channel_sums(module, output)
        if measured is not None:
            batch_calls[name] = batch_calls.get(name, 0) + 1
            stats.add(name, *measured)

    handles = [m.register_forward_hook(lambda mod, args, out, _n=name: record(mod, out, _n))
               for name, m in layers.items()]
    try:
        with temporary_quant_mode(model, mode):
            for index, batch in enumerate(data):
                batch_calls.clear()
                call_model(model, batch)
                for name in set(batch_calls) | set(stats.calls):
                    stats.calls.setdefault(name, [0] * index).append(batch_calls.get(name, 0))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _lockstep_pass(model: nn.Module, layers: dict[str, QuantModuleMixin], data: Sequence[Any],
                   correct: Callable[[str, torch.Tensor, int], None], bar: Any,
                   measure: tuple[str, QuantModuleMixin] | None = None) -> list[tuple[torch.Tensor, int]]:
    """One quantized pass of every batch in lockstep (``lidar_ptq.lockstep``): at each layer's output
    the sums of all batches give its correction, then every batch recomputes the layer with it. So each
    layer is measured with every earlier one corrected, as with a pass per layer. The ``measure`` layer
    (one called several times per forward) is only measured, over all its calls; returns its sums."""
    def meet(name: str, module: nn.Module, arrivals: list[Arrival]) -> range:
        sums = [_channel_sums(module, a.output) for a in arrivals]
        if any(s is None for s in sums):
            raise TypeError(f"bias correction of {name}: its output is not a tensor")
        correct(name, sum(s[0] for s in sums), sum(s[1] for s in sums))
        bar.update(1)
        return range(len(arrivals))

    step = Lockstep(model, [Lane(batch, QuantMode.QUANTIZE) for batch in data], layers, meet)
    measured: list[list[tuple[torch.Tensor, int]]] = [[] for _ in data]
    handles = []
    if measure is not None:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            lane, sums = step.current_lane(), _channel_sums(module, output)
            if lane is not None and sums is not None:
                measured[lane].append(sums)
        handles.append(measure[1].register_forward_hook(record))
    try:
        step.run()
    finally:
        for handle in handles:
            handle.remove()
    return [pair for per_batch in measured for pair in per_batch]  # in batch order: deterministic sums


def _segments(order: list[str], calls: dict[str, list[int]]) -> list[tuple[list[str], str | None]]:
    """Execution order cut after every layer not called exactly once per batch: (layers met in lockstep,
    then the layer measured over all its calls in the same pass, or None)."""
    segments: list[tuple[list[str], str | None]] = [([], None)]
    for name in order:
        if all(c == 1 for c in calls[name]):
            segments[-1][0].append(name)
        else:
            segments[-1] = (segments[-1][0], name)
            segments.append(([], None))
    return [seg for seg in segments if seg[0] or seg[1]]


def fold_bias_shifts(model: nn.Module) -> int:
    """Add every layer's pending ``bias_shift`` into its bias (what an engine runs); returns how many."""
    folded = 0
    for module in model.modules():
        shift = module._buffers.pop("bias_shift", None) if isinstance(module, QuantModuleMixin) else None
        if shift is not None:
            with torch.no_grad():
                module.bias.add_(shift.to(module.bias.dtype))
            folded += 1
    return folded


def drop_bias_shifts(model: nn.Module) -> None:
    """Undo a correction that was not folded yet."""
    for module in model.modules():
        if isinstance(module, QuantModuleMixin):
            module._buffers.pop("bias_shift", None)


def _add_shift(layer: QuantModuleMixin, name: str, error: torch.Tensor) -> float:
    """Subtract a measured mean error from the layer's pending ``bias_shift``; returns its largest entry."""
    error = error.to(layer.bias.dtype)
    if not torch.isfinite(error).all():
        raise FloatingPointError(f"bias correction of {name}: the quantized output mean is not finite; "
                                 "check the calibration (uncalibrated or zero-range quantizers)")
    if "bias_shift" not in layer._buffers:
        layer.register_buffer("bias_shift", torch.zeros_like(layer.bias.detach()))
    layer.bias_shift.sub_(error.to(layer.bias.device))
    return float(error.abs().max())


def frame_groups(data: Sequence[Any], frames: Callable[[Any], int], max_frames: int) -> list[list[Any]]:
    """Consecutive groups of batches holding at most ``max_frames`` frames each (at least one batch)."""
    groups: list[list[Any]] = [[]]
    held = 0
    for batch in data:
        n = frames(batch)
        if groups[-1] and held + n > max_frames:
            groups.append([])
            held = 0
        groups[-1].append(batch)
        held += n
    return groups


def correct_biases(model: nn.Module, data: Iterable[Any], patterns: Sequence[str] = ("*",),
                   progress: bool = True, fold: bool = True, reference: ChannelMeans | None = None,
                   group_frames: int = 16, frames: Callable[[Any], int] = lambda batch: 1) -> dict[str, float]:
    """Correct the bias of every quantized layer matching ``patterns`` (after calibration).

    Returns each corrected layer's largest absolute change, for the report. One float pass gives the
    reference means (``reference`` passes them in, e.g. shared by several range candidates, when the
    data is one group); then one lockstep quantized pass (``lidar_ptq.lockstep``) corrects the layers in
    execution order, each measured with the earlier ones corrected: two passes in all, whatever the
    depth. Batches go through the lockstep in groups of at most ``group_frames`` frames (``frames``
    counts a batch's), which bounds memory; a later group refines each correction by its own residual
    error, weighted by its share of the frames seen so far (with one group the result is that of a
    separate pass per layer). The corrections are kept as ``bias_shift`` buffers that only quantized
    forwards add, so a later stage (reconstruction) still sees the float model in FLOAT mode; ``fold``
    adds them into the biases at the end (``fold_bias_shifts``).
    """
    data = list(data)
    if not data:
        raise ValueError("bias correction needs calibration data; pass at least one batch")
    layers = correctable_layers(model, patterns)
    if not layers:
        logger.info("bias correction: no quantized layer with a bias matches %s", list(patterns))
        return {}
    groups = frame_groups(data, frames, group_frames)
    if reference is not None and len(groups) > 1:
        raise ValueError("a shared float reference serves one lockstep group: raise group_frames or drop it")
    changes: dict[str, float] = {}
    order: list[str] = []  # execution order over every group
    seen = 0
    bar = tqdm(total=len(layers) * len(groups), desc="bias correction", unit="layer", disable=not progress)
    try:
        for group in groups:
            ref = reference if reference is not None else channel_means(model, layers, group, QuantMode.FLOAT)
            order += [name for name in ref.order if name not in order]
            count = sum(frames(b) for b in group)
            weight = count / (seen + count)  # later groups: a running mean of the corrections
            target = ref.means()

            def correct(name: str, sums: torch.Tensor, rows: int, _w: float = weight,
                        _target: dict[str, torch.Tensor] = target) -> None:
                error = (sums / max(rows, 1) - _target[name]) * _w
                changes[name] = max(changes.get(name, 0.0), _add_shift(layers[name], name, error))

            # a layer called more than once per forward needs all its calls measured before it can be
            # corrected: the pass ends there and the layers after it go through the next one
            for lockstep, measured in _segments(ref.order, ref.calls):
                pairs = _lockstep_pass(model, {n: layers[n] for n in lockstep}, group, correct, bar,
                                       (measured, layers[measured]) if measured else None)
                if measured is not None:
                    correct(measured, sum(p[0] for p in pairs), sum(p[1] for p in pairs))
                    bar.update(1)
            bar.update(len(layers) - len(ref.order))
            seen += count
    finally:
        bar.close()
    skipped = sorted(set(layers) - set(order))
    if skipped:
        logger.info("bias correction: %d layer(s) never ran or return no tensor, left as is: %s",
                    len(skipped), skipped[:5])
    changes = {name: changes[name] for name in order if name in changes}
    if fold:
        fold_bias_shifts(model)
    return changes
