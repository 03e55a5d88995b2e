"""Evaluate a detector on a config's test set in-process (no Runner), for benchmarks that
quantize the same model many times."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mmengine.evaluator import Evaluator
from mmengine.runner import Runner

from ..errors import CalibrationDataError
from .intervals import match_frames
from .metrics import CenterDistanceMAP


def build_test_loader(cfg: Any, frames: int | None = None) -> Any:
    """The config's test dataloader, on its first ``frames`` frames (all when None), no workers."""
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg["num_workers"], loader_cfg["persistent_workers"] = 0, False
    if frames is not None:
        loader_cfg["dataset"] = {**loader_cfg["dataset"], "indices": frames}
    loader = Runner.build_dataloader(loader_cfg)
    if frames is not None and len(loader.dataset) < frames:  # mmengine silently keeps what there is
        raise CalibrationDataError(f"the test set holds {len(loader.dataset)} frames but {frames} were asked for: "
                                   "ask for fewer, or generate more (synthetic data: "
                                   "python -m lidar_ptq.sim.dataset --val N)")
    return loader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, evaluator_cfg: Any) -> dict[str, float]:
    """Run ``model.test_step`` over ``loader`` and score it with the configured evaluator."""
    return evaluate_frames(model, loader, evaluator_cfg)[0]


@torch.no_grad()
def evaluate_frames(model: torch.nn.Module, loader: Any, evaluator_cfg: Any) -> tuple[dict[str, float], list[Any]]:
    """``evaluate`` plus the per-frame records of its ``CenterDistanceMAP`` (ground truth and predictions
    of every frame, in loader order; [] without that metric), for intervals over frames."""
    evaluator = Evaluator(evaluator_cfg)
    evaluator.dataset_meta = loader.dataset.metainfo
    model.eval()
    for data in loader:
        evaluator.process(data_samples=model.test_step(data), data_batch=data)
    frames = [list(m.results) for m in evaluator.metrics if isinstance(m, CenterDistanceMAP)]
    return evaluator.evaluate(len(loader.dataset)), frames[0] if frames else []


def evaluate_saving_matches(model: torch.nn.Module, loader: Any, evaluator_cfg: Any, path: Path) -> dict[str, float]:
    """``evaluate``, and every detection's match on every frame saved to ``path`` (a ``MatchTable``), so
    benchmark rows can later be compared by paired bootstrap intervals."""
    metrics, frames = evaluate_frames(model, loader, evaluator_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    match_frames(frames, list(loader.dataset.metainfo["classes"])).save(path)
    return metrics
