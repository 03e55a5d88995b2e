"""Generate the synthetic benchmark for a config that uses it, when its info files are missing or short."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..sim.dataset import DatasetSpec, generate

log = logging.getLogger(__name__)


def ensure_synthetic_data(cfg: Any, workers: int = 0, at_least: dict[str, int] | None = None) -> bool:
    """If ``cfg`` declares ``synthetic_data`` (see configs/_base_/synthetic_lidar.py), generate the
    splits its dataloaders point at that are missing, and those named in ``at_least`` that hold fewer
    frames (a benchmark asking for more val frames). Returns whether the config uses the set."""
    settings = cfg.get("synthetic_data")
    if not settings:
        return False
    root = None
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if loader is not None and loader.get("dataset", {}).get("data_root"):
            root = loader["dataset"]["data_root"]
            break
    root = root or settings["root"]
    frames = {"train": int(settings["train"]), "val": int(settings["val"])}
    spec = DatasetSpec(str(root), frames, int(settings.get("seed", 0)))
    wanted = {split: n for split, n in frames.items() if not spec.info_path(split).exists()}
    wanted.update(at_least or {})  # generate() leaves a split that already holds this many frames alone
    if wanted:
        log.info("synthetic LiDAR data under %s: making sure of %s frames", Path(root), wanted)
        generate(replace(spec, frames=wanted), workers)
    return True
