"""Input-channel equalization (SmoothQuant-style) for layers whose input channels differ in range.

A per-tensor INT8 scale serves all input channels of a layer. CenterPoint's pillar
encoder feeds its first linear layer absolute coordinates (+-38 m), intensity
(0-255) and sub-pillar offsets (+-0.16 m) at once: one scale fit for the coordinates
rounds the offsets away. Dividing each input channel by s_c and multiplying the
weight's matching input column by s_c leaves the float layer unchanged, while the
quantizer now sees balanced channels:

    s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha),  normalised so that max(s) = 1

(Xiao et al., SmoothQuant, 2023). alpha = 1 equalizes activations fully and moves
all imbalance into the weight (per-output-channel scales do not see column
imbalance); alpha = 0.75 was best on the synthetic pillar model. The division is
part of the layer (``input_channel_scale``), so it is saved with the checkpoint
and exported as one elementwise ``Div`` before the QuantizeLinear.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterable

import torch
from torch import nn

from ..batches import StopForward, run_batches
from .modules import QuantModuleMixin
from .quantizer import QuantMode, temporary_quant_mode

logger = logging.getLogger(__name__)


def equalizable_layers(model: nn.Module, patterns: Iterable[str]) -> dict[str, QuantModuleMixin]:
    """Fake-quant layers whose names match any pattern and whose input can be equalized."""
    patterns = list(patterns)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantModuleMixin) and m.weight_in_axis is not None and m.input_quantizer.enabled
            and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


@torch.no_grad()
def input_channel_absmax(model: nn.Module, layers: dict[str, QuantModuleMixin], data: Iterable[Any]
                         ) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each layer's input over ``data``, run in float mode."""
    absmax: dict[str, torch.Tensor] = {}

    def hook(module: QuantModuleMixin, args: tuple, name: str) -> None:
        x = module.prescale_input(args[0]).detach()
        dims = [d for d in range(x.dim()) if d != module.feature_axis % x.dim()]
        value = x.abs().amax(dim=dims).float()
        absmax[name] = value if name not in absmax else torch.maximum(absmax[name], value)

    handles = [m.register_forward_pre_hook(lambda mod, args, _n=name: hook(mod, args, _n))
               for name, m in layers.items()]
    enclosing = _enclosing_module(model, layers)
    if enclosing is not model:  # the rest of the model cannot change these statistics
        handles.append(enclosing.register_forward_hook(lambda *_: _stop()))
    try:  # the statistics are of the float model (and uncalibrated quantizers cannot run)
        with temporary_quant_mode(model, QuantMode.FLOAT):
            run_batches(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return absmax


def _enclosing_module(model: nn.Module, layers: dict[str, QuantModuleMixin]) -> nn.Module:
    """The deepest module holding every one of ``layers`` (``model`` itself when only it does)."""
    paths = [name.split(".") for name in layers]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return model.get_submodule(".".join(common)) if common else model


def _stop() -> None:
    raise StopForward


@torch.no_grad()
def equalize_layer(layer: QuantModuleMixin, absmax: torch.Tensor, alpha: float = 0.75) -> torch.Tensor:
    """Fold per-channel factors into ``layer`` (weight columns and ``input_channel_scale``); returns s."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"equalization alpha must be in [0, 1], got {alpha}")
    weight = layer.float_weight
    axis = layer.weight_in_axis % weight.dim()
    reduce = [d for d in range(weight.dim()) if d != axis]
    wmax = weight.detach().abs().amax(dim=reduce).float()
    if wmax.numel() != absmax.numel():
        raise ValueError(f"input statistics have {absmax.numel()} channels, the weight {wmax.numel()} "
                         "(grouped convolutions are not equalized)")
    s = absmax.clamp(min=1e-6).pow(alpha) / wmax.clamp(min=1e-6).pow(1 - alpha)
    s = (s / s.max()).clamp(min=1e-4).to(weight.device)
    previous = layer._buffers.get("input_channel_scale")
    shape = [1] * weight.dim()
    shape[axis] = -1
    weight.mul_(s.reshape(shape).to(weight.dtype))
    layer.register_buffer("input_channel_scale", s if previous is None else previous * s)
    return s


def equalize_inputs(model: nn.Module, patterns: Iterable[str], data: Iterable[Any], alpha: float = 0.75
                    ) -> dict[str, list[float]]:
    """Equalize the input channels of every quantized layer matching ``patterns`` (before calibration)."""
    data = list(data)
    layers = equalizable_layers(model, patterns)
    if not layers:
        logger.info("input equalization: no layer matches %s", list(patterns))
        return {}
    absmax = input_channel_absmax(model, layers, data)
    scales = {}
    for name, layer in layers.items():
        if name not in absmax:
            logger.warning("input equalization: %s saw no data; left as is", name)
            continue
        scales[name] = equalize_layer(layer, absmax[name], alpha).tolist()
        logger.info("equalized the input channels of %s (factors %.3g..%.3g)", name, min(scales[name]),
                    max(scales[name]))
    return scales
