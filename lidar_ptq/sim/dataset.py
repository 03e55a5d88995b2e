"""Write synthetic LiDAR frames as an mmdet3d v2 dataset (info .pkl + float32 .bin points).

Frame ``i`` of a split is drawn from its own seed (``seed``, split, ``i``), so a
killed generation resumes where it stopped (finished .bin files are kept, the
info file is written last, atomically) and any frame can be regenerated alone.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .lidar import LidarConfig, cast
from .scene import CLASSES, SceneConfig, sample_scene

log = logging.getLogger(__name__)
SPLIT_IDS = {"train": 0, "val": 1, "calib": 2}
INFO_VERSION = "1.0"


@dataclass(frozen=True)
class DatasetSpec:
    root: str
    frames: dict[str, int]
    seed: int = 0
    min_points: int = 1  # boxes with fewer LiDAR returns are not annotated (nuScenes drops empty boxes)

    def info_path(self, split: str) -> Path:
        return Path(self.root) / f"synthetic_infos_{split}.pkl"


def frame_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def make_frame(seed: int, split: str, index: int, min_points: int = 1) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Points [N, 5] and the mmdet3d instances of one frame."""
    rng = frame_rng(seed, split, index)
    scene = sample_scene(rng, SceneConfig())
    points, owner = cast(scene, rng, LidarConfig())
    counts = np.bincount(owner[owner >= 0], minlength=len(scene.boxes))
    instances = [{"bbox_3d": [float(v) for v in scene.boxes[k]], "bbox_label_3d": int(scene.labels[k]),
                  "num_lidar_pts": int(counts[k])}
                 for k in np.flatnonzero(scene.annotated) if counts[k] >= min_points]
    return points, instances


def _write_frame(args: tuple[DatasetSpec, str, int]) -> dict[str, Any]:
    spec, split, index = args
    name = f"{split}_{index:06d}.bin"
    path = Path(spec.root) / "points" / name
    points, instances = make_frame(spec.seed, split, index, spec.min_points)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        points.tofile(tmp)
        os.replace(tmp, path)
    return {"sample_idx": index, "token": f"{split}_{index:06d}",
            "lidar_points": {"num_pts_feats": 5, "lidar_path": name}, "instances": instances}


def metainfo() -> dict[str, Any]:
    return {"categories": {name: i for i, name in enumerate(CLASSES)}, "dataset": "synthetic_lidar",
            "info_version": INFO_VERSION}


def frames_in(info_path: Path) -> int:
    """How many frames an info file lists."""
    with open(info_path, "rb") as f:
        return len(pickle.load(f)["data_list"])


def generate(spec: DatasetSpec, workers: int = 0, progress: bool = True) -> dict[str, Path]:
    """Generate every split that has no info file yet, or one with fewer frames than asked (frames are
    seeded by their index, so a longer split starts with the frames of the shorter one); returns the
    info paths of the splits in ``spec``."""
    from tqdm import tqdm

    (Path(spec.root) / "points").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in spec.frames.items():
        target = spec.info_path(split)
        paths[split] = target
        if target.exists() and frames_in(target) >= count:
            continue
        jobs: Iterable[tuple[DatasetSpec, str, int]] = [(spec, split, i) for i in range(count)]
        workers = workers or min(os.cpu_count() or 1, 8)
        with ProcessPoolExecutor(workers) as pool:
            infos = list(tqdm(pool.map(_write_frame, jobs, chunksize=8), total=count, disable=not progress,
                              desc=f"synthetic {split}", unit="frame"))
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"metainfo": metainfo(), "data_list": infos}, f)
        os.replace(tmp, target)
        log.info("wrote %d %s frames to %s", count, split, target)
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Generate the synthetic LiDAR benchmark (mmdet3d v2 infos).")
    parser.add_argument("--root", default="data/synthetic_lidar")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=300)  # as configs/_base_/synthetic_lidar.py
    parser.add_argument("--calib", type=int, default=0, help="extra frames for calibration (default: none; "
                        "calibration draws from train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    frames = {"train": args.train, "val": args.val}
    if args.calib:
        frames["calib"] = args.calib
    generate(DatasetSpec(args.root, frames, args.seed), args.workers)


if __name__ == "__main__":
    main()
