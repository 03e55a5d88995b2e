"""Mixed precision: per-layer sensitivity and a bit allocation under an average-bit budget.

Sensitivity of a layer at b bits = the model-output MSE (against float) when only
that layer's weights are quantized to b bits. The allocation starts every layer
at the highest option and repeatedly lowers the layer whose next step costs the
least extra error per bit saved (bits weighted by parameter count), until the
parameter-weighted average meets the budget. The result is a set of config
overrides, so the mixed model goes through the same quantize/calibrate/
reconstruct path as any other.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import call_model
from ..quant.model import set_quant_mode
from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import FakeQuantizer, QuantMode


@dataclass
class BitAllocation:
    bits: dict[str, int]                  # layer name -> weight bits
    sensitivity: dict[str, dict[int, float]]
    average_bits: float
    params: dict[str, int]

    def overrides(self) -> dict[str, dict[str, Any]]:
        """Config overrides that realise this allocation (merge into a quant config)."""
        return {name: {"weight": {"bits": b}} for name, b in self.bits.items()}


def _outputs(model: nn.Module, data: Sequence[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call_model(model, batch) for batch in data]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, data: Sequence[Any], bit_options: Sequence[int] = (2, 3, 4, 8),
                      observer: str = "lp_search") -> dict[str, dict[int, float]]:
    """Output MSE per layer and weight bit-width, all other quantizers off (model must be quantized)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)}
    if not layers:
        raise RuntimeError("quantize the model before measuring sensitivity")
    set_quant_mode(model, QuantMode.FLOAT)
    reference = _outputs(model, data)
    result: dict[str, dict[int, float]] = {}
    try:
        for name, layer in layers.items():
            original = layer.weight_quantizer
            result[name] = {}
            for bits in bit_options:
                probe = FakeQuantizer(original.spec.updated({"bits": bits, "observer": observer, "enable": True}),
                                      channel_axis=original.channel_axis).to(layer.float_weight.device)
                probe.observe(layer.float_weight)
                probe.finish_calibration()
                layer.weight_quantizer = probe
                out = _outputs(model, data)
                result[name][bits] = float(sum((o - r).pow(2).mean() for o, r in zip(out, reference)) / len(out))
            layer.weight_quantizer = original
    finally:
        set_quant_mode(model, QuantMode.QUANTIZE)
    return result


def allocate_bits(model: nn.Module, sensitivity: dict[str, dict[int, float]], average_bits: float) -> BitAllocation:
    """Greedy allocation meeting a parameter-weighted average weight bit-width."""
    params = {n: m.float_weight.numel() for n, m in model.named_modules() if n in sensitivity}
    options = {n: sorted(s) for n, s in sensitivity.items()}
    bits = {n: opts[-1] for n, opts in options.items()}
    total = sum(params.values())

    def average() -> float:
        return sum(bits[n] * params[n] for n in bits) / total

    if average_bits < min(min(o) for o in options.values()):
        raise ValueError(f"average_bits={average_bits} is below the smallest bit option")
    while average() > average_bits + 1e-9:
        best, best_cost = None, float("inf")
        for n, opts in options.items():
            i = opts.index(bits[n])
            if i == 0:
                continue
            lower = opts[i - 1]
            cost = (sensitivity[n][lower] - sensitivity[n][bits[n]]) / ((bits[n] - lower) * params[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        bits[best] = options[best][options[best].index(bits[best]) - 1]
    return BitAllocation(bits, sensitivity, average(), params)
