"""How a model splits into reconstruction units.

``layer``: every fake-quant layer on its own (AdaRound). ``block``: walk the
module tree; containers (Sequential, ModuleList, ModuleDict) are looked
through, a quantized layer met on the way is its own unit, and any other module
holding quantized layers is one block (a ResNet BasicBlock, a transformer's
attention or MLP) unless it holds more than ``max_block_layers`` of them, in
which case its children are split the same way. ``names``: exactly the listed
modules, in the given order.

A unit is replayed from its captured inputs, so it must take tensors (or sparse
tensors) positionally. Detector parts often do not (a voxel encoder takes
coordinates plus metadata, an FPN neck a list of maps): ``refine_units`` runs one
batch, finds the blocks whose calls are not tensors-only and splits them into
their children.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
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


def _tensor_call(args: tuple, kwargs: dict) -> bool:
    def ok(a: Any) -> bool:
        return isinstance(a, torch.Tensor) or (hasattr(a, "features") and hasattr(a, "indices"))
    return bool(args) and all(ok(a) for a in args) and not any(isinstance(v, torch.Tensor) for v in kwargs.values())


def refine_units(units: list[Unit], run_once: Callable[[], Any], max_block_layers: int = 3) -> list[Unit]:
    """Split blocks whose calls (seen while ``run_once()`` runs the model) are not tensors-only."""
    for _ in range(16):  # each round goes one level deeper; real models settle in two or three
        bad: set[str] = set()
        handles = [u.module.register_forward_hook(
            lambda m, a, k, o, name=u.name, bad=bad: None if _tensor_call(a, k) else bad.add(name),
            with_kwargs=True)
            for u in units if not isinstance(u.module, QuantModuleMixin)]
        try:
            with torch.no_grad():
                run_once()
        finally:
            for handle in handles:
                handle.remove()
        if not bad:
            return units
        refined: list[Unit] = []
        for unit in units:
            if unit.name in bad:
                _split(unit.name, unit.module, max_block_layers, refined)  # its children, split as usual
            else:
                refined.append(unit)
        units = refined
    return units
