"""Task-guided search of the clipping ranges, at the cost of one calibration pass plus the judging.

Every candidate rule (max-min, Lp searches, percentiles, over active or all sites) differs from
the recipe's quant config only in its observers. So one calibration pass feeds each quantizer's
tensor to one observer per distinct rule (``_FanOut``), each candidate's ranges are read off
those observers, and candidates are judged by loading their ranges into the one quantized model
in turn: no model copy, no recalibration per candidate. A candidate's score is its task loss
against the float outputs, or, with bias correction, the better of that and its loss after a
correction measured on the same frames (the correction reorders the rules). The caller bounds the
judging frames, so the search's cost does not grow with the calibration set.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..batches import call_model
from ..quant.bias_correction import channel_means, correct_biases, correctable_layers, drop_bias_shifts
from ..quant.config import QuantConfig, load_quant_config
from ..quant.model import iter_quantizers
from ..quant.modules import QuantModuleMixin
from ..quant.observers import Observer, build_observer
from ..quant.quantizer import QuantMode, temporary_quant_mode
from ..quant.spec import QuantSpec
from .occupancy import OccupancyMask

logger = logging.getLogger(__name__)

_OBSERVER_FIELDS = ("observer", "observer_kwargs")
_ROLE_OF = {"weight_quantizer": "weight", "softmax_quantizer": "softmax", "q_quantizer": "attention",
            "k_quantizer": "attention", "v_quantizer": "attention"}  # anything else reads the input spec


def _spec_key(spec: QuantSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, default=str)


def _source_spec(config: QuantConfig, quantizer_name: str) -> QuantSpec:
    """The spec ``quantize`` gave (or would give) this quantizer under ``config``."""
    owner, _, attribute = quantizer_name.rpartition(".")
    plan = config.plan_for(owner)
    role = _ROLE_OF.get(attribute, "input")
    return {"weight": plan.weight, "input": plan.input}.get(role) or plan.roles[role]


def candidate_specs(model: nn.Module, base: Mapping[str, Any], candidates: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, dict[str, QuantSpec]]:
    """Each candidate's spec for every enabled quantizer of ``model`` (quantized with ``base``).

    A candidate may change only the observers: anything else (bits, granularity, which layers are
    quantized) would need another model, so it is an error naming the quantizer."""
    base_cfg = load_quant_config(dict(base))
    quantizers = [(n, q) for n, q in iter_quantizers(model) if q.enabled]
    specs: dict[str, dict[str, QuantSpec]] = {}
    for name, candidate in candidates.items():
        cfg = load_quant_config(dict(candidate))
        specs[name] = {}
        for qname, quantizer in quantizers:
            before, after = _source_spec(base_cfg, qname), _source_spec(cfg, qname)
            strip = {f: getattr(before, f) for f in _OBSERVER_FIELDS}
            if after.updated(strip) != before or not cfg.plan_for(qname.rpartition(".")[0]).enable:
                raise ValueError(f"range candidate {name!r} changes more than the observers of {qname} "
                                 "(bits, granularity or enable): candidates of one search may differ only in "
                                 "their observers")
            specs[name][qname] = quantizer.spec.updated({f: getattr(after, f) for f in _OBSERVER_FIELDS})
    return specs


class _FanOut:
    """Stands in for a quantizer's observer: every tensor goes to one observer per distinct rule. Only
    sparse observers receive the active-site mask (an all-site rule must see every site). Rules that
    record the same thing (Lp searches with different p share their samples, percentiles their
    histogram) record it once: the first of them observes, the others adopt its record."""

    def __init__(self, observers: dict[str, Observer]) -> None:
        self.observers = observers
        self.sparse = any(o.sparse for o in observers.values())
        self.num_observed = 0
        recorders: dict[tuple, Observer] = {}
        self.followers: list[tuple[Observer, Observer]] = []
        for observer in observers.values():
            key = observer.record_key()
            if key is not None and key in recorders:
                self.followers.append((observer, recorders[key]))
            elif key is not None:
                recorders[key] = observer
        following = {id(f) for f, _ in self.followers}
        self.recorders = [o for o in observers.values() if id(o) not in following]

    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.num_observed += 1
        for observer in self.recorders:
            observer.observe(x, mask if observer.sparse else None)
        for follower, recorder in self.followers:
            follower.adopt_record(recorder)


@dataclass
class CandidateRanges:
    """Every candidate's (spec, scale, zero point) per quantizer, from one statistics pass."""

    specs: dict[str, dict[str, QuantSpec]]
    params: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # spec key -> quantizer -> (scale, zp)
    uncalibrated: list[str]

    def apply(self, model: nn.Module, candidate: str) -> None:
        """Load ``candidate``'s ranges (and observer names, for summaries) into the model's quantizers."""
        specs = self.specs[candidate]
        for qname, quantizer in iter_quantizers(model):
            if qname not in specs:
                continue
            quantizer.spec = specs[qname]
            params = self.params[_spec_key(specs[qname])].get(qname)
            if params is not None:
                quantizer._assign(params[0].clone(), params[1].clone())


@torch.no_grad()
def collect_candidate_ranges(model: nn.Module, data: Sequence[Any], specs: dict[str, dict[str, QuantSpec]],
                             occupancy_source: str | None = None, progress: bool = True) -> CandidateRanges:
    """One calibration pass over ``data`` that serves every candidate's observers (see module doc)."""
    quantizers = dict(iter_quantizers(model))
    for qname, quantizer in quantizers.items():
        distinct = {_spec_key(s[qname]): s[qname] for s in specs.values() if qname in s}
        if distinct:
            quantizer.observer = _FanOut({key: build_observer(spec, quantizer.channel_axis, quantizer.feature_axis)
                                          for key, spec in distinct.items()})  # type: ignore[assignment]
    was_training = model.training
    model.eval()
    params: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    uncalibrated: list[str] = []
    try:
        with temporary_quant_mode(model, QuantMode.CALIBRATE), \
                (OccupancyMask(model, occupancy_source) if occupancy_source else nullcontext()):
            for batch in tqdm(data, desc="calibrate (every range rule)", unit="batch", disable=not progress):
                call_model(model, batch)
            for module in model.modules():
                if isinstance(module, QuantModuleMixin):
                    module.calibrate_weight()
        for qname, quantizer in quantizers.items():
            fan = quantizer.observer
            if not isinstance(fan, _FanOut):
                continue
            if fan.num_observed == 0:
                uncalibrated.append(qname)
                continue
            for key, observer in fan.observers.items():
                lo, hi = observer.compute_range()
                quantizer.set_range(lo, hi)
                params.setdefault(key, {})[qname] = (quantizer.scale.detach().clone(), quantizer.zero_point.clone())
    finally:
        for quantizer in quantizers.values():
            quantizer.observer = None
        model.train(was_training)
    if uncalibrated:
        logger.warning("%d quantizer(s) saw no calibration data and stay uncalibrated: %s", len(uncalibrated),
                       ", ".join(uncalibrated))
    return CandidateRanges(specs, params, uncalibrated)


def judge_candidates(model: nn.Module, ranges: CandidateRanges, data: Sequence[Any], float_outputs: Sequence[Any],
                     loss: Callable[[Any, Any, Any], torch.Tensor], bias_data: Sequence[Any] | None = None,
                     progress: bool = True) -> dict[str, float]:
    """Each candidate's task loss on ``data`` (against ``float_outputs``); with ``bias_data`` also after a
    bias correction measured there (one float reference shared by all), keeping the lower of the two."""
    reference = None
    if bias_data:
        reference = channel_means(model, correctable_layers(model), bias_data, QuantMode.FLOAT)
    per_candidate = len(data) * (2 if bias_data else 1) + (len(bias_data) if bias_data else 0)
    bar = tqdm(total=len(ranges.specs) * per_candidate, desc="range search", unit="frame-pass",
               disable=not progress)
    scores: dict[str, float] = {}
    try:
        for name in ranges.specs:
            bar.set_postfix(rule=name)
            ranges.apply(model, name)
            scores[name] = task_loss(model, data, float_outputs, loss, bar)
            if bias_data:
                correct_biases(model, bias_data, progress=False, fold=False, reference=reference,
                               group_frames=len(bias_data))
                bar.update(len(bias_data))
                scores[name] = min(scores[name], task_loss(model, data, float_outputs, loss, bar))
                drop_bias_shifts(model)
    finally:
        bar.close()
    return scores


@torch.no_grad()
def task_loss(model: nn.Module, data: Sequence[Any], float_outputs: Sequence[Any],
              loss: Callable[[Any, Any, Any], torch.Tensor], bar: Any = None,
              float_modules: Sequence[nn.Module] = ()) -> float:
    """Mean of ``loss(quantized output, float output, batch)`` over the batches; ``float_modules`` run
    in float meanwhile (the precision plan's FP16 layers)."""
    total = 0.0
    with temporary_quant_mode(model, QuantMode.QUANTIZE), temporary_quant_mode(float_modules, QuantMode.FLOAT):
        for batch, reference in zip(data, float_outputs):
            total += float(loss(call_model(model, batch), reference, batch))
            if bar is not None:
                bar.update(1)
    return total / max(len(float_outputs), 1)
