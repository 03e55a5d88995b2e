"""LiDAR-PTQ in the paper's order, each stage switchable (an ablation is one flag per stage).

1. ranges from max-min, over active sites only when ``sparse_calibration`` (empty
   pillars/voxels are zeros that would otherwise dominate every statistic); with
   ``occupancy_source`` the BEV occupancy after the scatter defines the active
   sites of every dense layer (resized to its grid);
2. ``grid_search``: Lp search of each clipping range (on active sites);
3. ``tgpl``: quantization parameters optimised against the task-guided global
   positive loss on the detector output (added to the local unit loss);
4. ``adaptive_rounding``: AdaRound reconstruction of the weights.

Stages 3 and 4 are one call of the generic reconstruction core: TGPL without
adaptive rounding learns the activation step sizes with nearest rounding.
Quantizers are symmetric with zero point 0 (per-channel weights, per-tensor
activations), as TensorRT's explicit INT8 requires.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import calibrate, quantize
from ..recon.cache import is_sparse_tensor
from ..recon.engine import ReconConfig, ReconReport, reconstruct
from .occupancy import OccupancyMask
from .tgpl import TaskGuidedPositiveLoss, TGPLConfig


@dataclass
class LidarPTQConfig:
    w_bits: int = 8
    a_bits: int = 8
    sparse_calibration: bool = True
    grid_search: bool = True
    tgpl: bool = True
    adaptive_rounding: bool = True
    lp_norm: float = 2.0
    tgpl_config: TGPLConfig = field(default_factory=TGPLConfig)
    tgpl_weight: float = 1.0
    occupancy_source: str | None = None  # module whose output is the scattered BEV map (occupancy mask)
    calib_frames: int = 256              # a small fraction of the training set, as in the paper
    recon: Mapping[str, Any] = field(default_factory=dict)      # ReconConfig overrides (iterations, ...)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # quant-config overrides by module pattern

    def quant_config(self) -> dict[str, Any]:
        """The quant config dict that stages 1-2 calibrate with."""
        observer = "lp_search" if self.grid_search else "minmax"
        kwargs: dict[str, Any] = {"sparse": self.sparse_calibration}
        if self.grid_search:
            kwargs["p"] = self.lp_norm
        return {
            "weight": {"bits": self.w_bits, "per_channel": True, "symmetric": True,
                       "observer": "lp_search" if self.grid_search else "minmax",
                       "observer_kwargs": {"p": self.lp_norm} if self.grid_search else {}},
            "input": {"bits": self.a_bits, "symmetric": True, "observer": observer, "observer_kwargs": kwargs},
            "overrides": dict(self.overrides),
        }

    def recon_config(self) -> ReconConfig | None:
        """Stages 3-4 as one reconstruction config, or None when both are off."""
        if not (self.tgpl or self.adaptive_rounding):
            return None
        settings: dict[str, Any] = {"granularity": "block", "drop_prob": 1.0, "learn_act_scale": True,
                                    "rounding": "adaround" if self.adaptive_rounding else "nearest"}
        if self.tgpl:
            settings.update(output_loss=TaskGuidedPositiveLoss(self.tgpl_config), output_loss_weight=self.tgpl_weight)
        settings.update(self.recon)
        return ReconConfig(**settings)


@dataclass
class LidarPTQReport:
    config: LidarPTQConfig
    uncalibrated: list[str]
    reconstruction: ReconReport | None


def frames_in(batch: Any) -> int:
    """Number of frames in a calibration batch (tensor, SparseConvTensor, tuple or dict of them)."""
    if is_sparse_tensor(batch):
        return int(batch.batch_size)
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for item in items:
        if isinstance(item, torch.Tensor) or is_sparse_tensor(item):
            return frames_in(item)
    raise TypeError(f"cannot count frames in a calibration batch of type {type(batch).__name__}")


def take_frames(calib_data: Iterable[Any], frames: int) -> list[Any]:
    """The first batches holding ``frames`` frames; too few frames is an error, not a silent shortfall."""
    taken, count = [], 0
    for batch in calib_data:
        if count >= frames:
            break
        taken.append(batch)
        count += frames_in(batch)
    if count < frames:
        raise ValueError(f"calibration data holds {count} frames but calib_frames={frames}: pass more frames "
                         "or lower LidarPTQConfig.calib_frames")
    return taken


def run_lidar_ptq(model: nn.Module, calib_data: Iterable[Any], config: LidarPTQConfig | None = None) -> LidarPTQReport:
    """Quantize ``model`` in place with LiDAR-PTQ. ``model(batch)`` must return the detection head
    outputs (per-task dicts of heatmap/regression maps) so TGPL can read them."""
    cfg = config or LidarPTQConfig()
    data = take_frames(calib_data, cfg.calib_frames)
    quantize(model, cfg.quant_config())
    use_occupancy = cfg.occupancy_source is not None and cfg.sparse_calibration
    with OccupancyMask(model, cfg.occupancy_source) if use_occupancy else nullcontext():
        missing = calibrate(model, data)
    recon_cfg = cfg.recon_config()
    report = reconstruct(model, data, recon_cfg) if recon_cfg is not None else None
    return LidarPTQReport(cfg, missing, report)
