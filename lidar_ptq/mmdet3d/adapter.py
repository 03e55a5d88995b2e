"""The quantizable part of an mmdet3d LiDAR detector as one module: voxels in, head outputs out.

Voxelization (the data preprocessor) and box decoding/NMS stay outside, as in
deployment. ``MVXTwoStageDetector`` (CenterPoint) has no ``mode='tensor'`` in
mmdet3d 1.4, so the adapter calls the parts directly: the voxel encoder, the
middle encoder (pillar scatter or sparse encoder), backbone, neck and the head's
raw forward (per-task dicts of heatmap/reg/height/dim/rot/vel maps for a
CenterHead, which TGPL reads). The parts are registered under the detector's
own names and shared with it, so quantizing the adapter quantizes the detector,
quant-config patterns use the names users see in the config, and the
detector's state dict carries the quantization.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LidarPTQError

log = logging.getLogger(__name__)

LAYOUTS = {  # attribute prefix of the LiDAR branch -> how to run it
    "pts_": ("pts_voxel_encoder", "pts_middle_encoder", "pts_backbone", "pts_neck", "pts_bbox_head"),
    "": ("voxel_encoder", "middle_encoder", "backbone", "neck", "bbox_head"),
}


class UnsupportedDetectorError(LidarPTQError, TypeError):
    """The detector has no voxel/pillar LiDAR branch this adapter can run."""


@dataclass
class DetectorBatch:
    """One preprocessed calibration batch: the data preprocessor's ``inputs`` and ``data_samples``."""
    inputs: dict[str, Any]
    data_samples: list[Any]

    @property
    def num_frames(self) -> int:
        return len(self.data_samples)


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside nested dicts/lists moved to ``device`` (batches are kept on the CPU between uses)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    return obj


def unwrap_model(model: nn.Module) -> nn.Module:
    """The detector inside mmengine's (distributed) model wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _layout(detector: nn.Module) -> str:
    for prefix, parts in LAYOUTS.items():
        if all(getattr(detector, name, None) is not None for name in (parts[0], parts[1], parts[4])):
            return prefix
    raise UnsupportedDetectorError(
        f"{type(detector).__name__} has no voxel-based LiDAR branch (voxel encoder, middle encoder, bbox head "
        "under pts_* or plain names); lidar_ptq quantizes CenterPoint/VoxelNet-style detectors")


class DetectorAdapter(nn.Module):
    """``adapter(DetectorBatch)`` -> the bbox head's raw outputs."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        detector = unwrap_model(detector)
        self.prefix = _layout(detector)
        object.__setattr__(self, "detector", detector)  # not a child: module names stay the detector's
        self.part_names = [name for name in LAYOUTS[self.prefix] if getattr(detector, name, None) is not None]
        for name in self.part_names:
            self.add_module(name, getattr(detector, name))
        self.occupancy_source = LAYOUTS[self.prefix][1]  # its output is the BEV map, zero where empty

    @property
    def head(self) -> nn.Module:
        return getattr(self, LAYOUTS[self.prefix][4])

    def sync(self) -> None:
        """Point the detector at the adapter's parts again (after a part itself was replaced)."""
        for name in self.part_names:
            setattr(self.detector, name, getattr(self, name))

    def forward(self, batch: DetectorBatch) -> Any:
        metas = [sample.metainfo for sample in batch.data_samples]
        device = next(self.parameters()).device
        inputs = move_to(batch.inputs, device)
        if self.prefix == "pts_":
            feats = self.detector.extract_pts_feat(inputs["voxels"], points=inputs.get("points"),
                                                   img_feats=None, batch_input_metas=metas)
        else:
            feats = self.detector.extract_feat(inputs)
        return self.head(feats)


def has_heatmap_outputs(output: Any, key: str = "heatmap") -> bool:
    """Whether a head output holds per-task dicts with a heatmap (what TGPL needs)."""
    if isinstance(output, dict):
        return key in output
    if isinstance(output, (list, tuple)):
        return any(has_heatmap_outputs(item, key) for item in output)
    return False
