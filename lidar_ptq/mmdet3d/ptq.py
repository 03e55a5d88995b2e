"""Quantize an mmdet3d detector with a PTQ recipe; save, reload and describe the result.

Shared by the ``LidarPTQHook`` (quantize inside any mmdet3d test/val run) and
the ``PTQLoop`` (float eval -> quantize -> save -> quantized eval) behind
``tools/quantize.py``; neither adds an algorithm of its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LidarPTQError
from ..lidar.anchor_loss import AnchorPositiveLoss, is_anchor_output
from ..lidar.config import PTQRecipe
from ..lidar.pipeline import LidarPTQReport, run_ptq
from ..lidar.precision_plan import PrecisionPlan
from ..lidar.recipes import load_recipe
from ..lidar.stage_log import StageLog
from ..quant.fold import fold_batchnorms
from ..quant.model import format_summary, iter_quantizers, quant_summary, quantize
from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import FakeQuantizer
from .adapter import DetectorAdapter, DetectorBatch, has_heatmap_outputs, unwrap_model

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class CheckpointMismatchError(LidarPTQError, RuntimeError):
    """A checkpoint's keys or shapes do not fit the model built from the config."""


@dataclass
class DetectorPTQResult:
    recipe: PTQRecipe
    report: LidarPTQReport
    seconds: float
    tgpl: bool
    unquantized: list[str]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantizer) for m in unwrap_model(model).modules())


def load_float_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a float checkpoint strictly: a mismatch is an error listing what does not fit."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    detector = unwrap_model(model)
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing key(s): {head(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {head(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatch(es): {head(shapes)}" if shapes else ""]
        raise CheckpointMismatchError(f"checkpoint {path} does not match the model of this config ("
                                      + "; ".join(p for p in parts if p)
                                      + "): pass the config the checkpoint was trained with")
    detector.load_state_dict(state, strict=True)


def build_float_model(cfg: Any, checkpoint: str | os.PathLike) -> nn.Module:
    """The detector of an mmdet3d config with its float checkpoint loaded strictly, in eval mode."""
    from mmdet3d.registry import MODELS
    model = MODELS.build(cfg.model)
    load_float_checkpoint(model, checkpoint)
    return model.eval()


def _unquantized_layers(adapter: nn.Module) -> list[str]:
    """Layers with weights of their own that stayed float (no fake-quant twin), also where a child of
    theirs was quantized (a parent's own weight still runs in float): reported, not fatal."""
    skip = (QuantModuleMixin, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
    return [f"{name} ({type(module).__name__})" for name, module in adapter.named_modules()
            if not isinstance(module, skip) and any(True for _ in module.parameters(recurse=False))]


def folded_adapter(detector: nn.Module) -> DetectorAdapter:
    """The detector's quantizable part with its BatchNorms folded, as an engine runs it."""
    adapter = DetectorAdapter(detector)
    fold_batchnorms(adapter)
    return adapter


def prepare(detector: nn.Module, recipe: PTQRecipe) -> DetectorAdapter:
    """Fold BNs and swap in fake-quant twins (uncalibrated) for ``recipe``; returns the adapter."""
    adapter = folded_adapter(detector)
    quantize(adapter, recipe.quant)
    adapter.sync()
    return adapter


def quantize_detector(model: nn.Module, batches: list[DetectorBatch], recipe: PTQRecipe | Any = None,
                      resume_dir: str | os.PathLike | None = None, stages: StageLog | None = None
                      ) -> DetectorPTQResult:
    """Quantize ``model`` (an mmdet3d detector, possibly wrapped) in place with ``recipe``. With
    ``resume_dir`` finished stages are saved there and a rerun after a kill starts after the last one;
    ``stages`` collects per-stage time, forwards and memory (``run_ptq``)."""
    recipe = load_recipe(recipe)
    detector = unwrap_model(model)
    if is_quantized(detector):
        raise RuntimeError("the model is already quantized (a LidarPTQHook and a PTQLoop both configured?); "
                           "quantize once")
    start = time.perf_counter()
    adapter = folded_adapter(detector).eval()
    tgpl = recipe.recon is not None and recipe.recon.output_loss is not None
    if tgpl or recipe.select_loss is not None:
        with torch.no_grad():
            sample = adapter(batches[0])
        if not has_heatmap_outputs(sample):
            recipe, tgpl = _without_heatmaps(recipe, sample, type(adapter.head).__name__), False
    occupancy = adapter.occupancy_source if recipe.sparse_calibration else None
    report = run_ptq(adapter, batches, recipe, occupancy_source=occupancy,
                     resume_dir=os.fspath(resume_dir) if resume_dir is not None else None, stages=stages)
    adapter.sync()
    unquantized = _unquantized_layers(adapter)
    if unquantized:
        log.warning("%d layer(s) with weights have no fake-quant twin and stay float: %s", len(unquantized),
                    ", ".join(unquantized))
    if report.uncalibrated:
        log.warning("quantizers that saw no calibration data: %s", ", ".join(report.uncalibrated))
    log.info("quantized with %s on %d frames in %.1f s\n%s", recipe.name, report.frames,
             time.perf_counter() - start, format_summary(quant_summary(adapter)))
    # the report's recipe: the one that ran, with the FP16 layers of a precision plan in its quant config
    return DetectorPTQResult(report.recipe, report, time.perf_counter() - start, tgpl, unquantized)


def _without_heatmaps(recipe: PTQRecipe, sample: Any, head: str) -> PTQRecipe:
    """The recipe for a head without CenterHead heatmaps. Anchor heads: their own positives
    (``AnchorPositiveLoss``) judge the range search and guard bias correction and reconstruction, and
    reconstruction fits local losses only. Other heads: max-min ranges and unguarded stages."""
    recon = dataclasses.replace(recipe.recon, output_loss=None) if recipe.recon is not None else None
    if is_anchor_output(sample):
        log.warning("%s is an anchor head: TGPL is replaced by the loss on the anchor head's positives for the "
                    "range search and the guards; reconstruction uses local losses", head)
        select = AnchorPositiveLoss() if recipe.select_loss is not None else None
        return dataclasses.replace(recipe, recon=recon, select_loss=select)
    log.warning("%s head outputs have no heatmaps and no anchor maps: TGPL, the range search and the guards are "
                "skipped (max-min ranges; reconstruction uses local losses)", head)
    return dataclasses.replace(recipe, recon=recon, select_loss=None, range_candidates={})


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_quantized(model: nn.Module, recipe: PTQRecipe, work_dir: str | os.PathLike,
                   plan: PrecisionPlan | None = None) -> dict[str, Path]:
    """``quantized.pth`` (state dict + recipe, reloads without calibration) and ``quant_params.json``
    (every quantizer; with a precision plan, each planned layer's precision and sensitivity)."""
    detector = unwrap_model(model)
    work_dir = Path(work_dir)
    checkpoint = {"state_dict": detector.state_dict(),
                  "meta": {"lidar_ptq": {"format": FORMAT_VERSION, "recipe": recipe.source or {"method": recipe.name},
                                         "recipe_name": recipe.name, "quant": recipe.quant}}}
    paths = {"checkpoint": work_dir / "quantized.pth", "quant_params": work_dir / "quant_params.json"}
    _atomic_write(paths["checkpoint"], lambda p: torch.save(checkpoint, p))
    params = [q.quant_params() for _, q in iter_quantizers(detector)]
    for (name, _), entry in zip(iter_quantizers(detector), params):
        entry["name"] = name
        entry["granularity"] = "per-tensor" if entry["axis"] is None else f"per-channel(axis={entry['axis']})"
    content: dict[str, Any] = {"recipe": recipe.name, "quantizers": params}
    if plan is not None:
        content["precision_plan"] = plan.to_dict()
    _atomic_write(paths["quant_params"], lambda p: p.write_text(json.dumps(content, indent=1)))
    return paths


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the fake-quant detector from ``quantized.pth`` (no calibration data needed)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    meta = state.get("meta", {}).get("lidar_ptq") if isinstance(state, dict) else None
    if meta is None:
        raise CheckpointMismatchError(f"{path} is not a lidar_ptq quantized checkpoint (no meta.lidar_ptq); it may be "
                                      "a float checkpoint: quantize it with tools/quantize.py first")
    detector = unwrap_model(model)
    recipe = PTQRecipe(meta["recipe_name"], meta["quant"])
    prepare(detector, recipe)
    detector.load_state_dict(state["state_dict"], strict=True)
    return detector
