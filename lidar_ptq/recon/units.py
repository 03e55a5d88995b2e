"""How a model splits into reconstruction units.

``layer``: every fake-quant layer on its own (AdaRound). ``block``: walk the
module tree; containers (Sequential, ModuleList, ModuleDict) are looked
through, a quantized layer met on the way is its own unit, and any other module
holding quantized layers is one block (a ResNet BasicBlock, a transformer's
attention or MLP) unless it holds more than ``max_block_layers`` of them, in
which case its children are split the same way. ``names``: exactly the listed
modules, in the given order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import FakeQuantizer

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Unit:
    name: str
    module: nn.Module

    def quant_layers(self) -> list[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, QuantModuleMixin)]

    def activation_quantizers(self) -> list[FakeQuantizer]:
        weights = {id(m.weight_quantizer) for m in self.quant_layers()}
        return [q for q in self.module.modules() if isinstance(q, FakeQuantizer) and id(q) not in weights]


def _count_layers(module: nn.Module) -> int:
    return sum(isinstance(m, QuantModuleMixin) for m in module.modules())


def _split(name: str, module: nn.Module, max_block_layers: int, out: list[Unit]) -> None:
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        count = _count_layers(child)
        if count == 0:
            continue
        if isinstance(child, QuantModuleMixin):
            out.append(Unit(full, child))
        elif isinstance(child, CONTAINERS) or count > max_block_layers:
            _split(full, child, max_block_layers, out)
        else:
            out.append(Unit(full, child))


def find_units(model: nn.Module, granularity: str = "block", names: Sequence[str] | None = None,
               max_block_layers: int = 3) -> list[Unit]:
    """Split ``model`` into reconstruction units in forward order of definition."""
    if names:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"unit name(s) {missing} not found in the model")
        return [Unit(n, modules[n]) for n in names]
    if granularity == "layer":  # a layer nested in another (attention's out_proj) goes with its parent
        units: list[Unit] = []
        for n, m in model.named_modules():
            if isinstance(m, QuantModuleMixin) and not any(n.startswith(u.name + ".") for u in units):
                units.append(Unit(n, m))
        return units
    if granularity == "block":
        units = []
        if isinstance(model, QuantModuleMixin):
            return [Unit("", model)]
        _split("", model, max_block_layers, units)
        return units
    raise ValueError(f"unknown granularity {granularity!r}; use 'layer', 'block' or give unit names")
