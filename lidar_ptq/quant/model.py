"""The model-level functions: quantize, calibrate, switch modes, summarise.

Every stage is a plain function over a torch model, so the reconstruction, the LiDAR
pipeline and the mmdet3d integration (or any other driver) only call these; the
package exports them as ``lidar_ptq.quantize`` and so on.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import nn
from tqdm import tqdm

from ..batches import call_model
from . import attention as _attention  # noqa: F401  (registers the attention twin)
from .config import ConfigLike, load_quant_config
from .integrations import load_integrations
from .modules import QUANT_MODULES, QuantModuleMixin
from .quantizer import FakeQuantizer, QuantMode

logger = logging.getLogger(__name__)

ForwardLoop = Union[Callable[[nn.Module], Any], Iterable[Any]]


def quantize(model: nn.Module, config: ConfigLike = None) -> nn.Module:
    """Swap every supported layer of ``model`` for its fake-quant twin, in place.

    ``config`` holds the defaults and per-module overrides (see
    ``lidar_ptq.quant.config``). Quantizers start uncalibrated; call
    ``calibrate`` next. Returns the model for chaining.
    """
    cfg = load_quant_config(config)
    load_integrations(model)
    if isinstance(model, QuantModuleMixin):
        raise ValueError("the model is already quantized")
    swapped = 0
    # children before parents: a twin that has quantizable children (a residual block) is cloned
    # from a parent whose children are already swapped
    for parent_name, parent in reversed(list(model.named_modules())):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            twin_cls = QUANT_MODULES.get(type(child))
            if twin_cls is None:
                continue
            plan = cfg.plan_for(full_name)
            if not plan.enable:
                logger.info("keeping %s in float (config override)", full_name)
                continue
            setattr(parent, child_name, twin_cls.from_float(child, plan.weight, plan.input, plan.roles))
            swapped += 1
    if swapped == 0:
        logger.warning("quantize(): no supported layer found (supported: %s)",
                       ", ".join(t.__name__ for t in QUANT_MODULES))
    name_quantizers(model)
    return model


def name_quantizers(model: nn.Module) -> None:
    """Give each quantizer its module path, so errors and summaries name it."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            module.name = name


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            yield name, module


def set_quant_mode(model: nn.Module, mode: Union[str, QuantMode]) -> None:
    """Switch every quantizer of ``model``: ``"float"``, ``"calibrate"`` or ``"quantize"``."""
    mode = QuantMode(mode)
    for _, quantizer in iter_quantizers(model):
        quantizer.mode = mode


def _run_forward_loop(model: nn.Module, forward_loop: ForwardLoop, progress: bool) -> None:
    if callable(forward_loop):
        forward_loop(model)
        return
    total = len(forward_loop) if hasattr(forward_loop, "__len__") else None
    for batch in tqdm(forward_loop, total=total, desc="calibrate", unit="batch", disable=not progress):
        call_model(model, batch)


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop: ForwardLoop | None = None, progress: bool = True) -> list[str]:
    """Run calibration data through ``model`` and set every quantizer's range.

    ``forward_loop`` is either ``fn(model)`` that runs the data itself, or an
    iterable of batches (tensor, tuple of args, or dict of kwargs; a progress
    bar is shown unless ``progress=False``). Weight
    ranges need no data. Leaves the model in quantize mode and returns the
    names of activation quantizers that saw no data (they stay uncalibrated).
    """
    was_training = model.training
    model.eval()
    set_quant_mode(model, QuantMode.CALIBRATE)
    try:
        if forward_loop is not None:
            _run_forward_loop(model, forward_loop, progress)
        for module in model.modules():
            if isinstance(module, QuantModuleMixin):
                module.calibrate_weight()
        missing = [name for name, q in iter_quantizers(model) if q.enabled and not q.finish_calibration()]
    finally:
        for _, quantizer in iter_quantizers(model):  # a failed run leaves no half-collected statistics
            quantizer.observer = None
        set_quant_mode(model, QuantMode.QUANTIZE)
        model.train(was_training)
    if missing:
        logger.warning("%d quantizer(s) saw no calibration data and stay uncalibrated: %s",
                       len(missing), ", ".join(missing))
    return missing


def quant_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer: name, bits, granularity, observer and range."""
    rows = []
    for name, q in iter_quantizers(model):
        row: dict[str, Any] = {
            "name": name, "enabled": q.enabled, "bits": q.spec.bits,
            "format": f"{'int' if q.spec.signed else 'uint'}{q.spec.bits} {'sym' if q.spec.symmetric else 'asym'}",
            "granularity": "per-tensor" if q.channel_axis is None else f"per-channel(axis={q.channel_axis})",
            "observer": q.spec.observer, "calibrated": q.calibrated, "range": "-",
        }
        if q.enabled and q.calibrated:
            amax = q.amax().reshape(-1)
            row["range"] = (f"amax={amax.item():.4g}" if amax.numel() == 1
                            else f"amax in [{amax.min().item():.4g}, {amax.max().item():.4g}] x{amax.numel()}")
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Render ``quant_summary`` rows as a fixed-width text table."""
    columns = ["name", "enabled", "format", "granularity", "observer", "calibrated", "range"]
    table = [columns] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    enabled = sum(1 for r in rows if r["enabled"])
    lines.append(f"{len(rows)} quantizers, {enabled} enabled, "
                 f"{sum(1 for r in rows if r['enabled'] and r['calibrated'])} calibrated")
    return "\n".join(lines)
