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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..batches import StopForward, run_batches
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


class _ChannelMeans:
    """Running per-output-channel sums of the hooked layers' outputs (bounded memory: C numbers each)."""

    def __init__(self, layers: dict[str, QuantModuleMixin], stop_after: str | None = None) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.stop_after = stop_after
        self.handles = [m.register_forward_hook(lambda mod, args, out, _n=name: self._record(mod, out, _n))
                        for name, m in layers.items()]

    def _record(self, module: QuantModuleMixin, output: Any, name: str) -> None:
        features = _output_features(output)
        if features is None:
            return
        axis = module.feature_axis % features.dim()
        flat = features.detach().movedim(axis, -1).reshape(-1, features.shape[axis]).double()
        self.sums[name] = self.sums.get(name, 0) + flat.sum(0)
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]
        self.calls[name] = self.calls.get(name, 0) + 1
        if name not in self.order:
            self.order.append(name)
        if name == self.stop_after:
            raise StopForward

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / max(self.counts[name], 1) for name, total in self.sums.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _measure(model: nn.Module, layers: dict[str, QuantModuleMixin], data: list[Any], mode: QuantMode,
             stop_after: str | None = None) -> _ChannelMeans:
    stats = _ChannelMeans(layers, stop_after)
    try:
        with torch.no_grad(), temporary_quant_mode(model, mode):
            run_batches(model, data)
    finally:
        stats.close()
    return stats


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


def correct_biases(model: nn.Module, data: Iterable[Any], patterns: Sequence[str] = ("*",),
                   progress: bool = True, fold: bool = True) -> dict[str, float]:
    """Correct the bias of every quantized layer matching ``patterns`` (after calibration).

    Returns each corrected layer's largest absolute change, for the report. One float pass
    gives the reference means and the execution order; then one quantized pass per layer,
    stopped as soon as that layer has run. The corrections are kept as ``bias_shift`` buffers
    that only quantized forwards add, so a later stage (reconstruction) still sees the float
    model in FLOAT mode; ``fold`` adds them into the biases at the end (``fold_bias_shifts``).
    """
    data = list(data)
    if not data:
        raise ValueError("bias correction needs calibration data; pass at least one batch")
    layers = correctable_layers(model, patterns)
    if not layers:
        logger.info("bias correction: no quantized layer with a bias matches %s", list(patterns))
        return {}
    reference = _measure(model, layers, data, QuantMode.FLOAT)
    target = reference.means()
    skipped = sorted(set(layers) - set(target))
    if skipped:
        logger.info("bias correction: %d layer(s) never ran or return no tensor, left as is: %s",
                    len(skipped), skipped[:5])
    changes: dict[str, float] = {}
    for name in tqdm(reference.order, desc="bias correction", unit="layer", disable=not progress):
        layer = layers[name]
        # a layer called more than once per forward is measured over every call (no early stop)
        stop = name if reference.calls[name] == len(data) else None
        measured = _measure(model, {name: layer}, data, QuantMode.QUANTIZE, stop_after=stop).means()[name]
        error = (measured - target[name]).to(layer.bias.dtype)
        if not torch.isfinite(error).all():
            raise FloatingPointError(f"bias correction of {name}: the quantized output mean is not finite; "
                                     "check the calibration (uncalibrated or zero-range quantizers)")
        if "bias_shift" not in layer._buffers:
            layer.register_buffer("bias_shift", torch.zeros_like(layer.bias.detach()))
        layer.bias_shift.sub_(error.to(layer.bias.device))
        changes[name] = float(error.abs().max())
    if fold:
        fold_bias_shifts(model)
    return changes
