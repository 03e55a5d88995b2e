"""Generate the synthetic benchmark for a config that uses it, when its info files are missing or short."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..sim.dataset import DatasetSpec, generate

log = logging.getLogger(__name__)


def ensure_synthetic_data(cfg: Any, workers: int = 0) -> bool:
    """If ``cfg`` declares ``synthetic_data`` (see configs/_base_/synthetic_lidar.py), generate the
    frames its dataloaders point at unless they exist with as many frames. Returns whether the config
    uses the set."""
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
    spec = DatasetSpec(str(root), {"train": int(settings["train"]), "val": int(settings["val"])},
                       int(settings.get("seed", 0)))
    log.debug("synthetic LiDAR data under %s: %s (missing or short splits are generated)", Path(root),
              spec.frames)
    generate(spec, workers)
    return True
