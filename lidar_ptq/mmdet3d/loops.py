"""``PTQLoop``: the test loop behind tools/quantize.py (in the spirit of mmrazor's PTQLoop).

float evaluation -> calibration frames -> quantization (any recipe) -> save
(quantized.pth, quant_params.json) -> quantized evaluation -> metrics.json with
both rows. Evaluation uses the config's own test dataloader and evaluator, so it
is distributed exactly as mmdet3d's tools/test.py is under ``--launcher``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from mmdet3d.registry import LOOPS
from mmengine.dist import is_main_process
from mmengine.runner import TestLoop
from mmengine.runner.amp import autocast

from ..lidar.config import PTQRecipe
from ..lidar.stage_log import StageLog
from .calibration import require_batch_points
from .hooks import quantize_runner_model
from .ptq import load_float_checkpoint
from .visualize import plot_bev


def precision_name(recipe: PTQRecipe) -> str:
    """``w<bits>a<bits>`` of a recipe: the key of the quantized model's metrics."""
    return f"w{recipe.quant['weight']['bits']}a{recipe.quant['input']['bits']}"


@LOOPS.register_module()
class PTQLoop(TestLoop):
    def __init__(self, runner: Any, dataloader: Any, evaluator: Any, fp16: bool = False, recipe: Any = "lidar_ptq",
                 checkpoint: str | None = None, calib_frames: int | None = None, seed: int = 0,
                 batch_size: int = 1, recipe_options: dict[str, Any] | None = None,
                 evaluate_float: bool = True, export_dir: str | None = None,
                 export_sparse_fp16: list[str] | None = None) -> None:
        super().__init__(runner, dataloader, evaluator, fp16)
        self.recipe, self.checkpoint, self.calib_frames = recipe, checkpoint, calib_frames
        self.seed, self.batch_size, self.recipe_options = seed, batch_size, recipe_options or {}
        self.evaluate_float = evaluate_float
        self.export_dir, self.export_sparse_fp16 = export_dir, list(export_sparse_fp16 or [])
        self.metrics: dict[str, Any] = {}
        self.precision = "quantized"  # "w8a8", "w4a8", ... once the recipe is known
        self.first_frame: dict[str, Any] = {}
        self.last_outputs: Any = None

    @torch.no_grad()
    def run_iter(self, idx: int, data_batch: Any) -> None:
        """TestLoop.run_iter that checks the frame's points first (NaN/Inf or an empty frame is a clear error,
        not an exception inside mmdet3d's evaluation) and keeps the outputs (for the BEV plot)."""
        require_batch_points(data_batch)
        self.runner.call_hook("before_test_iter", batch_idx=idx, data_batch=data_batch)
        with autocast(enabled=self.fp16):
            outputs = self.runner.model.test_step(data_batch)
        self.last_outputs = outputs
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook("after_test_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)

    def _evaluate(self, kind: str) -> dict[str, float]:
        self.runner.call_hook("before_test_epoch")
        self.runner.model.eval()
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch)
            if idx == 0:  # first frame kept for the BEV plot
                self.first_frame[kind] = self.last_outputs[0]
                self.first_frame["points"] = data_batch["inputs"]["points"][0].cpu().numpy()
        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        self.runner.call_hook("after_test_epoch", metrics=metrics)
        return metrics

    def run(self) -> dict[str, float]:
        if self.checkpoint is not None:  # strict: a mismatching checkpoint is an error, not a warning
            load_float_checkpoint(self.runner.model, self.checkpoint)
        self.runner.call_hook("before_test")
        results: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        if self.evaluate_float:
            start = time.perf_counter()
            results["fp32"] = self._evaluate("fp32")
            seconds["eval_fp32"] = time.perf_counter() - start
        stages = StageLog()
        result = quantize_runner_model(self.runner, self.recipe, self.calib_frames, self.seed, self.batch_size,
                                       self.recipe_options, stages=stages)
        seconds["ptq"] = result.seconds
        self.precision = precision_name(result.recipe)
        start = time.perf_counter()
        results[self.precision] = self._evaluate(self.precision)
        seconds[f"eval_{self.precision}"] = time.perf_counter() - start
        export = None
        if self.export_dir and is_main_process():
            with stages.stage("export"):
                export = self._export()
        self.metrics = {"recipe": result.recipe.name, "recipe_spec": result.recipe.source,
                        "precision": self.precision,
                        "calib_frames": result.report.frames,
                        "tgpl": result.tgpl,
                        "range_search": result.report.selection,
                        "bias_correction": {**result.report.bias_correction_loss,
                                            "layers": len(result.report.bias_corrections)},
                        "reconstruction": {**result.report.recon_loss, "kept": result.report.recon_kept},
                        "unquantized_layers": result.unquantized, "seconds": seconds,
                        "precision_plan": (result.report.precision_plan.to_dict()
                                           if result.report.precision_plan is not None else None),
                        "stages": stages.rows(), **results}
        if export is not None:
            self.metrics["export"] = {"dir": str(self.export_dir), "verification": export["verification"]}
        if is_main_process():
            self._plot()
            path = Path(self.runner.work_dir) / "metrics.json"
            tmp = path.with_name("metrics.json.tmp")
            tmp.write_text(json.dumps(self.metrics, indent=1, default=float))
            tmp.replace(path)
        self.runner.call_hook("after_test")
        return results[self.precision]

    def _export(self) -> dict[str, Any]:
        """Deployment files of the quantized model (``tools/quantize.py --export``)."""
        from .export import export_detector, sample_batch, summarize
        manifest = export_detector(self.runner.model, sample_batch(self.runner.cfg, self.runner.model, self.seed),
                                   self.export_dir, sparse_precision={p: "fp16" for p in self.export_sparse_fp16})
        self.runner.logger.info("export to %s\n%s", self.export_dir, summarize(manifest))
        return manifest

    def _plot(self) -> None:
        """``bev_fp32_vs_int8.png`` in the work dir: the first test frame, both models' detections."""
        frame, quantized = self.first_frame, self.precision
        if quantized not in frame:
            return
        detections = {k.upper(): frame[k].pred_instances_3d for k in ("fp32", quantized) if k in frame}
        gt = frame[quantized].get("eval_ann_info", {}).get("gt_bboxes_3d")
        cloud_range = self.runner.cfg.get("point_cloud_range")
        plot_bev(frame["points"], gt, detections, Path(self.runner.work_dir) / "bev_fp32_vs_int8.png",
                 extent=abs(cloud_range[0]) if cloud_range else None,
                 title=f"{Path(str(frame[quantized].metainfo.get('lidar_path', ''))).name}: FP32 vs "
                       f"{quantized.upper()}")
