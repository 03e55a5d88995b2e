"""Deployment precision plan: which layers stay FP16 so the quantized detector meets a task-loss budget.

Deployers keep the layers INT8 hurts most in FP16 (TensorRT and libspconv run mixed precision). The
plan answers "which layers, at most how many" from the task loss the range search and the guards
already use (TGPL on CenterHead, the positive loss on anchor heads), measured against the float
outputs of the calibration frames:

* sensitivity, one pass over the sensitivity frames per layer and question: the task loss with only
  that layer quantized (``alone``) and the loss removed by leaving only that layer in float with every
  other layer quantized (``gain``);
* the plan: layers ranked by the larger of ``gain`` and ``alone`` (``rank_layers``); the shortest
  prefix of that ranking whose FP16 model meets the budget on held-out calibration frames, found by
  bisection (about log2(layers) passes) and verified by measuring the chosen plan. The budget is the
  held-out task loss allowed, as a fraction of the all-INT8 model's (1: no FP16 layer needed; 0.1:
  nine tenths of INT8's task-loss error removed).

FP16 layers run in float32 in the simulation (FP16's 11-bit significand is far finer than an INT8
step); their quantizers are disabled, so the export writes no Q/DQ around them and marks sparse ones
``fp16``. Cost: 2 x layers x sensitivity frames forwards plus about log2(layers) x held-out frames.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from tqdm import tqdm

from ..errors import LidarPTQError
from ..quant.quantizer import FakeQuantizer
from .range_search import task_loss

logger = logging.getLogger(__name__)
INT8, FP16 = "int8", "fp16"
# quant-config keys whose "enable": False turns off every quantizer of a twin (extra roles follow "input")
_DISABLED = {"weight": {"enable": False}, "input": {"enable": False}}


class PrecisionBudgetError(LidarPTQError, ValueError):
    """The FP16 budget is invalid or cannot be met."""


@dataclass
class PrecisionPlan:
    """Each planned layer's precision, the measured sensitivities and the held-out task losses."""

    budget: float
    layers: dict[str, str]  # layer -> "int8" | "fp16"
    sensitivity: dict[str, dict[str, float]]  # layer -> {"alone": loss, "gain": loss removed when FP16}
    loss_int8: float  # held-out task loss, every layer INT8
    loss: float  # held-out task loss of the plan (verified)
    forwards: int = 0  # forwards of a calibration batch the plan took
    frames: dict[str, int] = field(default_factory=dict)  # frames that measured / checked it

    @property
    def fp16_layers(self) -> list[str]:
        return [name for name, precision in self.layers.items() if precision == FP16]

    def quant_overrides(self) -> dict[str, dict[str, Any]]:
        """Quant-config overrides that rebuild the plan (FP16 layers: quantizers disabled)."""
        return {name: dict(_DISABLED) for name in self.fp16_layers}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fp16_layers": self.fp16_layers}


def own_quantizers(*modules: nn.Module) -> list[FakeQuantizer]:
    """The quantizers these modules hold themselves: a residual block's add quantizer, not its convs'.
    Switching these (not the modules' subtrees) keeps a layer nested in a planned block separate."""
    return [q for module in modules for q in module.children() if isinstance(q, FakeQuantizer)]


def planned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """What the plan moves between INT8 and FP16: every module owning an enabled quantizer (a conv
    twin with its weight and input quantizers, a residual block's shared add quantizer, ...), so an
    all-FP16 plan is the float model."""
    return {name: module for name, module in model.named_modules()
            if any(q.enabled for q in own_quantizers(module))}


def rank_layers(sensitivity: dict[str, dict[str, float]]) -> list[str]:
    """Layers in the order they move to FP16: by the larger of ``gain`` (what FP16 removes with every
    other layer INT8, the start of the walk) and ``alone`` (what the layer costs with the others float,
    its end). ``gain`` alone misses layers whose error cancels another's: on the synthetic pillar model
    two backbone convs with negative gain held 5% of the INT8 task loss (docs/precision_plan.md)."""
    return sorted(sensitivity, key=lambda n: (max(sensitivity[n]["gain"], sensitivity[n]["alone"]),
                                              sensitivity[n]["alone"]), reverse=True)


def measure_sensitivity(model: nn.Module, data: Sequence[Any], float_outputs: Sequence[Any],
                        loss: Callable[[Any, Any, Any], Any], layers: dict[str, nn.Module] | None = None
                        ) -> tuple[dict[str, dict[str, float]], float]:
    """Per layer: the task loss with only it quantized (``alone``) and the loss removed by keeping only
    it in float (``gain``); also returns the all-quantized loss. Nothing is recalibrated: quantizers are
    switched between their calibrated and float modes."""
    layers = planned_layers(model) if layers is None else layers
    with tqdm(total=(2 * len(layers) + 1) * len(data), desc="precision plan: sensitivity", unit="batch",
              leave=False) as bar:
        everything = task_loss(model, data, float_outputs, loss, bar)
        sensitivity = {}
        for name, layer in layers.items():
            others = own_quantizers(*(m for n, m in layers.items() if n != name))
            alone = task_loss(model, data, float_outputs, loss, bar, float_modules=others)
            left_out = task_loss(model, data, float_outputs, loss, bar, float_modules=own_quantizers(layer))
            sensitivity[name] = {"alone": alone, "gain": everything - left_out}
    return sensitivity, everything


def plan_precision(model: nn.Module, sensitivity_data: Sequence[Any], sensitivity_outputs: Sequence[Any],
                   held_out: Sequence[Any], held_out_outputs: Sequence[Any], loss: Callable[[Any, Any, Any], Any],
                   budget: float, sensitivity: dict[str, dict[str, float]] | None = None) -> PrecisionPlan:
    """The fewest FP16 layers (a prefix of the sensitivity ranking) that bring the held-out task loss to
    at most ``budget`` x the all-INT8 loss. The model is left as it was; ``apply_precision_plan`` applies.
    ``sensitivity`` from an earlier ``measure_sensitivity`` skips measuring again (several budgets)."""
    if not isinstance(budget, (int, float)) or not budget > 0:
        raise PrecisionBudgetError(f"fp16_budget must be a fraction > 0 of the all-INT8 task loss (e.g. 0.3), got "
                                   f"{budget!r}; 0 would keep every layer in FP16: quantize nothing instead")
    layers = planned_layers(model)
    if not layers:
        raise PrecisionBudgetError("the model has no quantized layer to plan: quantize it before planning")
    forwards = 0
    if sensitivity is None:
        sensitivity, _ = measure_sensitivity(model, sensitivity_data, sensitivity_outputs, loss, layers)
        forwards = (2 * len(layers) + 1) * len(sensitivity_data)
    ranking = rank_layers({n: sensitivity[n] for n in layers})
    measured: dict[int, float] = {}

    def held_out_loss(count: int) -> float:
        nonlocal forwards
        if count not in measured:
            fp16 = own_quantizers(*(layers[n] for n in ranking[:count]))
            measured[count] = task_loss(model, held_out, held_out_outputs, loss, float_modules=fp16)
            forwards += len(held_out)
        return measured[count]

    loss_int8 = held_out_loss(0)
    target = budget * loss_int8
    if held_out_loss(len(ranking)) > target:
        raise PrecisionBudgetError(
            f"fp16_budget={budget} cannot be met: with all {len(ranking)} layers in FP16 the held-out task loss is "
            f"{measured[len(ranking)]:.4g}, above {target:.4g} ({budget} x the all-INT8 loss {loss_int8:.4g}); "
            "raise the budget")
    low, high = 0, len(ranking)  # loss(low) > target unless low == 0 meets it; loss(high) <= target
    if loss_int8 <= target:
        high = 0
    with tqdm(desc="precision plan: budget search", unit="pass", leave=False) as bar:
        while high - low > 1:
            middle = (low + high) // 2
            if held_out_loss(middle) <= target:
                high = middle
            else:
                low = middle
            bar.update(1)
    chosen = set(ranking[:high])
    plan = PrecisionPlan(budget, {n: FP16 if n in chosen else INT8 for n in layers}, sensitivity, loss_int8,
                         held_out_loss(high), forwards)
    logger.info("precision plan: %d of %d layers in FP16 for budget %.3g (held-out task loss %.4g -> %.4g): %s",
                len(chosen), len(layers), budget, loss_int8, plan.loss, ", ".join(plan.fp16_layers) or "none")
    return plan


def apply_precision_plan(model: nn.Module, plan: PrecisionPlan) -> None:
    """Disable the quantizers of the plan's FP16 layers for good. A learned rounding and a bias
    correction of those layers are dropped: they fixed an INT8 error that no longer exists."""
    modules = dict(model.named_modules())
    for name in plan.fp16_layers:
        layer = modules[name]
        for quantizer in own_quantizers(layer):
            quantizer.spec = quantizer.spec.updated({"enable": False})
            quantizer.rounding = None
        layer._buffers.pop("bias_shift", None)
