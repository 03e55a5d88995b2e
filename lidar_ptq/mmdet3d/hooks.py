"""``LidarPTQHook``: quantize ``runner.model`` inside any mmdet3d test/val run.

Add to an existing mmdet3d config::

    custom_hooks = [dict(type='lidar_ptq.mmdet3d.LidarPTQHook', recipe='lidar_ptq', calib_frames=256)]

(named by its import path, mmengine imports the plugin itself; the short name
``'LidarPTQHook'`` needs ``custom_imports = dict(imports=['lidar_ptq.mmdet3d'])``)

and run mmdet3d's own test (``Runner.from_cfg(cfg).test()``, ``tools/test.py``).
mmengine loads the checkpoint in ``load_or_resume``, *after* ``before_run``, so
the hook quantizes at ``before_test`` / ``before_val`` (the first one that
comes), when the float weights are in place. With ``quantized_checkpoint`` it
restores a saved quantized model instead of calibrating.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmdet3d.registry import HOOKS
from mmengine.hooks import Hook

from ..lidar.recipes import resolve_recipe
from ..lidar.stage_log import StageLog
from .adapter import unwrap_model
from .calibration import build_calibration_loader, collect_batches, require_batch_points
from .ptq import DetectorPTQResult, is_quantized, load_quantized, quantize_detector, save_quantized

log = logging.getLogger(__name__)


def quantize_runner_model(runner: Any, recipe: Any, calib_frames: int | None, seed: int, batch_size: int,
                          recipe_options: dict[str, Any] | None = None, save: bool = True,
                          stages: StageLog | None = None) -> DetectorPTQResult:
    """Calibration frames from the runner's config -> quantized ``runner.model`` (-> saved in work_dir).

    Finished stages are saved under ``<work_dir>/ptq_resume``: rerunning the same command after a kill
    resumes after the last finished stage (the frames are loaded again)."""
    recipe = resolve_recipe(recipe, calib_frames, recipe_options)
    stages = stages or StageLog()
    with stages.stage("frame loading"):
        loader = build_calibration_loader(runner.cfg, recipe.calib_frames, seed, batch_size)
        batches = collect_batches(unwrap_model(runner.model), loader)
    result = quantize_detector(runner.model, batches, recipe, resume_dir=Path(runner.work_dir) / "ptq_resume",
                               stages=stages)
    if save:
        paths = save_quantized(runner.model, result.recipe, runner.work_dir, result.report.precision_plan)
        runner.logger.info("saved %s and %s", paths["checkpoint"], paths["quant_params"])
    return result


@HOOKS.register_module()
class LidarPTQHook(Hook):
    """Quantize the model once, before the first test/val epoch; check every evaluated frame's points."""

    priority = "VERY_HIGH"  # before any hook that reads the model in before_test/before_val

    def __init__(self, recipe: Any = "lidar_ptq", calib_frames: int | None = None, seed: int = 0,
                 batch_size: int = 1, recipe_options: dict[str, Any] | None = None,
                 quantized_checkpoint: str | None = None, save: bool = True) -> None:
        self.recipe, self.calib_frames, self.seed, self.batch_size = recipe, calib_frames, seed, batch_size
        self.recipe_options = recipe_options or {}
        self.quantized_checkpoint = quantized_checkpoint
        self.save = save
        self.result: DetectorPTQResult | None = None

    def _quantize(self, runner: Any) -> None:
        if is_quantized(runner.model):
            return
        if self.quantized_checkpoint:
            if not Path(self.quantized_checkpoint).is_file():
                raise FileNotFoundError(f"quantized_checkpoint {self.quantized_checkpoint} does not exist")
            load_quantized(runner.model, self.quantized_checkpoint)
            runner.logger.info("restored the quantized model from %s", self.quantized_checkpoint)
            return
        self.result = quantize_runner_model(runner, self.recipe, self.calib_frames, self.seed, self.batch_size,
                                            self.recipe_options, self.save)

    def before_test(self, runner: Any) -> None:
        self._quantize(runner)

    def before_val(self, runner: Any) -> None:
        self._quantize(runner)

    def before_test_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        require_batch_points(data_batch)

    def before_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        require_batch_points(data_batch)
