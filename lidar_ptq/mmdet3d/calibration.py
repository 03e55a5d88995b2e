"""Calibration frames: the config's training set through its test pipeline, N frames, seeded.

Frames are drawn without replacement from the training set (a small fraction of
it, as LiDAR-PTQ does), loaded with the *test* pipeline (no augmentation) and
voxelized by the model's own data preprocessor once; the resulting batches feed
calibration and reconstruction. Under a distributed launcher every rank loads
its share of the frames and all ranks receive all of them, so every rank
computes the same quantized model.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from mmengine.dataset import pseudo_collate
from mmengine.dist import all_gather_object, get_dist_info
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..errors import CalibrationDataError, ConfigError
from .adapter import DetectorBatch, move_to

log = logging.getLogger(__name__)
WRAPPERS = ("CBGSDataset", "RepeatDataset", "ClassBalancedDataset", "ConcatDataset")


def _base_dataset_cfg(cfg: Any) -> dict[str, Any]:
    if cfg.get("train_dataloader") is None:
        raise ConfigError("the config has no train_dataloader: calibration frames come from its training set "
                          "(add one, or pass an explicit list of calibration batches)")
    dataset = copy.deepcopy(cfg.train_dataloader.dataset)
    while dataset.get("type") in WRAPPERS and "dataset" in dataset:  # CBGS/repeat wrappers: the inner set
        dataset = dataset["dataset"]
    return dataset


def single_pass_pipeline(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pipeline`` with a one-augmentation ``MultiScaleFlipAug3D`` (scale 1, no flip) unrolled into its
    transforms, which then do the same. The wrapper turns every frame into a list of augmentations,
    which a detector's plain forward cannot take (mmdet3d runs such lists only through a TTA model);
    several augmentations are refused."""
    steps: list[dict[str, Any]] = []
    for step in pipeline:
        if step.get("type") != "MultiScaleFlipAug3D":
            steps.append(step)
            continue
        ratios = step.get("pts_scale_ratio", 1.0)
        ratios = list(ratios) if isinstance(ratios, (list, tuple)) else [ratios]
        if step.get("flip", False) or ratios != [1] or step.get("pcd_horizontal_flip") or \
                step.get("pcd_vertical_flip"):
            raise ConfigError("the test pipeline's MultiScaleFlipAug3D runs several augmentations (test-time "
                              "augmentation), which the PTQ tools do not run: set its flip=False and "
                              "pts_scale_ratio=1, or use a pipeline without it")
        steps.extend(copy.deepcopy(list(step.get("transforms", []))))
    return steps


def _test_pipeline(cfg: Any) -> list[dict[str, Any]]:
    for key in ("test_dataloader", "val_dataloader"):
        loader = cfg.get(key)
        if loader is not None and loader.get("dataset", {}).get("pipeline") is not None:
            return single_pass_pipeline(copy.deepcopy(loader["dataset"]["pipeline"]))
    if cfg.get("test_pipeline") is not None:
        return single_pass_pipeline(copy.deepcopy(cfg.test_pipeline))
    raise ConfigError("the config has no test pipeline (test_dataloader.dataset.pipeline or test_pipeline)")


def build_calibration_loader(cfg: Any, frames: int, seed: int = 0, batch_size: int = 1,
                             num_workers: int = 0) -> DataLoader:
    """A loader over ``frames`` training frames (this rank's share) with the test pipeline."""
    from mmdet3d.registry import DATASETS

    ds_cfg = _base_dataset_cfg(cfg)
    ds_cfg["pipeline"] = _test_pipeline(cfg)
    ds_cfg["test_mode"] = True  # no GT filtering or augmentation-only steps
    dataset = DATASETS.build(ds_cfg)
    if len(dataset) < frames:
        raise CalibrationDataError(f"the calibration set ({ds_cfg.get('ann_file')}) has {len(dataset)} frames but "
                                   f"{frames} were asked for: lower --calib-frames / calib_frames or use a larger set")
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=frames, replace=False))
    rank, world = get_dist_info()
    return DataLoader(Subset(dataset, indices[rank::world].tolist()), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=pseudo_collate)


def check_points(points: torch.Tensor, frame: str) -> bool:
    """NaN/Inf points are an error; an empty frame a warning (returns False: nothing to calibrate on)."""
    if not torch.isfinite(points).all():
        bad = int((~torch.isfinite(points)).any(dim=1).sum())
        raise CalibrationDataError(f"frame {frame} has {bad} point(s) with NaN/Inf values: clean the point cloud, "
                                   "or drop them in the pipeline (PointsRangeFilter removes non-finite points)")
    if points.shape[0] == 0:
        log.warning("frame %s has no points (inside the point cloud range); it is skipped", frame)
        return False
    return True


def require_points(points: torch.Tensor, frame: str) -> None:
    """An evaluated frame must have finite points and at least one (mmdet3d's detectors fail on none)."""
    if points.shape[0] == 0:
        raise CalibrationDataError(f"test frame {frame} has no points inside the point cloud range; mmdet3d's "
                                   "detectors cannot run on an empty frame: remove it from the test set")
    check_points(points, frame)


def require_batch_points(data_batch: Any) -> None:
    """``require_points`` on every frame of an mmdet3d test batch (a batch without points: nothing to check)."""
    if isinstance(data_batch, dict) and "points" in data_batch.get("inputs", {}):
        for points, sample in zip(data_batch["inputs"]["points"], data_batch["data_samples"]):
            require_points(points, frame_name(sample))


def frame_name(sample: Any) -> str:
    meta = getattr(sample, "metainfo", {}) or {}
    return str(meta.get("lidar_path", meta.get("sample_idx", "?")))


@torch.no_grad()
def collect_batches(model: Any, loader: DataLoader, progress: bool = True) -> list[DetectorBatch]:
    """Voxelize every calibration batch with the model's data preprocessor; gathered over ranks."""
    batches: list[DetectorBatch] = []
    for data in tqdm(loader, desc="calibration frames", unit="batch", disable=not progress):
        keep = [i for i, (points, sample) in enumerate(zip(data["inputs"]["points"], data["data_samples"]))
                if check_points(points, frame_name(sample))]
        if not keep:
            continue
        data = {"inputs": {k: [v[i] for i in keep] for k, v in data["inputs"].items()},
                "data_samples": [data["data_samples"][i] for i in keep]}
        out = model.data_preprocessor(data, False)
        batches.append(DetectorBatch(move_to(out["inputs"], "cpu"), out["data_samples"]))
    _, world = get_dist_info()
    if world > 1:
        gathered = all_gather_object(batches)
        batches = [b for rank_batches in gathered for b in rank_batches]
    if not batches:
        raise CalibrationDataError("every calibration frame was empty: check the dataset paths and point_cloud_range")
    return batches
