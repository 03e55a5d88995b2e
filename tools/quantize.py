"""Quantize an mmdet3d LiDAR detector post-training and evaluate it against the float model.

    python tools/quantize.py CONFIG CHECKPOINT [--recipe Q] [--work-dir W] [--calib-frames N]
                             [--recipe-options k=v ...] [--cfg-options k=v ...]
                             [--launcher none|pytorch|slurm] [--skip-float-eval] [--seed S]
                             [--export [DIR]] [--sparse-fp16 PATTERN ...] [--fp16-budget F]

CONFIG: a project config (configs/...), a stock mmdet3d config path, or
``mmdet3d::centerpoint/<name>.py``. Q: a recipe JSON (configs/quant/ptq/*.json)
or a method name (lidar_ptq, maxmin, entropy, percentile, brecq, qdrop); default
configs/quant/ptq/lidar_ptq_w8a8.json. Writes W/metrics.json (fp32 and int8 side by side),
W/quantized.pth (reloads without calibration: LidarPTQHook(quantized_checkpoint=...)),
W/quant_params.json (every quantizer's bits, scale/amax, granularity).
--fp16-budget F plans the layers that deploy in FP16: the fewest that bring the task loss on held-out
calibration frames to F x the all-INT8 model's (docs/precision_plan.md); the plan is in metrics.json and
quant_params.json, and the export keeps those layers out of INT8.
--export also writes the deployment files (tools/export.py; default DIR: W/export).
Multi-GPU: ``torchrun --nproc_per_node=8 tools/quantize.py CONFIG CKPT --launcher pytorch``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.hub import get_config
from mmengine.runner import Runner

from lidar_ptq.errors import ConfigError, run_reporting_user_errors
from lidar_ptq.lidar.recipes import resolve_recipe
from lidar_ptq.mmdet3d.calibration import single_pass_pipeline
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data

log = logging.getLogger("lidar_ptq.quantize")
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quant" / "ptq" / "lidar_ptq_w8a8.json"


def load_config(path: str) -> Config:
    """A config file, or ``package::relative/path.py`` inside an installed OpenMMLab package."""
    if "::" in path:
        try:
            return get_config(path)
        except Exception as err:  # mmengine raises several types for a bad package path
            raise FileNotFoundError(f"cannot load {path!r}: {err}. Example: "
                                    "mmdet3d::centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py"
                                    ) from err
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} does not exist (a file path, or mmdet3d::<dir>/<name>.py for a "
                                "config shipped with mmdet3d)")
    return Config.fromfile(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="float checkpoint of the model in CONFIG")
    parser.add_argument("--recipe", help="recipe JSON or method name (default: the config's "
                        "LidarPTQHook recipe, else configs/quant/ptq/lidar_ptq_w8a8.json)")
    parser.add_argument("--recipe-options", nargs="+", action=DictAction, default={},
                        help="recipe overrides, e.g. w_bits=4 ranges.frames=8 recon.iterations=500")
    parser.add_argument("--work-dir", help="default: work_dirs/ptq/<config name>")
    parser.add_argument("--calib-frames", type=int, help="calibration frames (default: the recipe's, 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration frames; seeds reconstruction")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override settings of CONFIG, as in mmdet3d's tools")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--skip-float-eval", action="store_true", help="evaluate only the quantized model")
    parser.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                        help="also export for deployment (ONNX Q/DQ, libspconv, TensorRT caches); default W/export")
    parser.add_argument("--sparse-fp16", nargs="*", default=[], metavar="PATTERN",
                        help="with --export: sparse layers kept in FP16 on libspconv, e.g. '*conv_input*'")
    parser.add_argument("--fp16-budget", type=float, metavar="F",
                        help="keep the fewest layers in FP16 that bring the held-out task loss to F x the all-INT8 "
                             "loss (e.g. 0.3); default: every layer INT8")
    parser.add_argument("--verbose", action="store_true",
                        help="log everything (mmengine's config and hooks, every quantizer); default: progress bars, "
                             "warnings and a short summary")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def is_ptq_hook(hook: dict) -> bool:
    """``LidarPTQHook`` by its registry name or its import path (``lidar_ptq.mmdet3d.LidarPTQHook``)."""
    return str(hook.get("type", "")).split(".")[-1] == "LidarPTQHook"


def take_hook_settings(cfg: Config) -> dict:
    """Remove LidarPTQHook entries (the PTQ loop quantizes instead; both would quantize twice) and
    return their settings, which serve as defaults for --recipe / --calib-frames."""
    hooks = list(cfg.get("custom_hooks", []))
    ptq_hooks = [h for h in hooks if is_ptq_hook(h)]
    cfg.custom_hooks = [h for h in hooks if not is_ptq_hook(h)]
    return dict(ptq_hooks[-1]) if ptq_hooks else {}


def build_cfg(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    cfg.merge_from_dict(args.cfg_options)
    hook = take_hook_settings(cfg)
    if args.recipe is None:
        args.recipe = hook.get("recipe", str(DEFAULT_RECIPE))
    if args.calib_frames is None:
        args.calib_frames = hook.get("calib_frames")
    if cfg.get("model") is None or cfg.get("test_dataloader") is None or cfg.get("test_evaluator") is None:
        raise ConfigError(f"{args.config} is not a complete mmdet3d config (needs model, test_dataloader and "
                          "test_evaluator); pass a detector config, not a dataset or schedule base")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    for key in ("test_dataloader", "val_dataloader"):  # the float and quantized evaluations run one pass
        dataset = (cfg.get(key) or {}).get("dataset") or {}
        if dataset.get("pipeline") is not None:
            dataset["pipeline"] = single_pass_pipeline(dataset["pipeline"])
    options = dict(args.recipe_options)
    if args.fp16_budget is not None:
        options["fp16_budget"] = args.fp16_budget
    recipe = resolve_recipe(args.recipe, args.calib_frames, options)  # fail fast on a bad recipe
    if recipe.recon is not None:
        options.setdefault("recon.seed", args.seed)
    cfg.work_dir = args.work_dir or str(Path("work_dirs") / "ptq" / Path(args.config.split("::")[-1]).stem)
    cfg.launcher = args.launcher
    cfg.log_level = "INFO" if args.verbose else "WARNING"  # mmengine's config/hook dump
    cfg.load_from = None  # the PTQ loop loads the checkpoint strictly itself
    cfg.test_cfg = dict(type="PTQLoop", recipe=recipe.source, checkpoint=args.checkpoint,
                        calib_frames=args.calib_frames, seed=args.seed,
                        recipe_options=options, evaluate_float=not args.skip_float_eval,
                        export_dir=None if args.export is None else (args.export or str(Path(cfg.work_dir) / "export")),
                        export_sparse_fp16=args.sparse_fp16)
    cfg.setdefault("custom_imports", dict(imports=[], allow_failed_imports=False))
    imports = list(cfg.custom_imports.get("imports", []))
    if "lidar_ptq.mmdet3d" not in imports:
        cfg.custom_imports["imports"] = [*imports, "lidar_ptq.mmdet3d"]
    return cfg


def metrics_table(metrics: dict, per_threshold: bool = False) -> str:
    """FP32 against the quantized model; per-class AP and mAP (each matching threshold too with
    ``per_threshold``; metrics.json always has them)."""
    kinds = ("fp32", metrics.get("precision", "quantized"))
    keys = sorted(k for k in set(metrics.get(kinds[0], {})) | set(metrics.get(kinds[1], {}))
                  if per_threshold or "@" not in k)
    rows = [f"| metric | {kinds[0]} | {kinds[1]} |", "|---|---|---|"]
    for key in keys:
        values = [metrics.get(kind, {}).get(key) for kind in kinds]
        rows.append(f"| {key} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
    return "\n".join(rows)


def stage_line(stages: list[dict]) -> str:
    """Seconds per PTQ stage, in the order they ran (a stage that ran more than once is summed)."""
    seconds: dict[str, float] = {}
    for row in stages:
        seconds[row["stage"]] = seconds.get(row["stage"], 0.0) + float(row["seconds"])
    return "seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())


def check_checkpoint(cfg: Config, path: str) -> None:
    """Build the float model and load ``path`` strictly: a checkpoint of another model fails in seconds,
    before the datasets are built and the float model is evaluated."""
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.utils import import_modules_from_strings

    from lidar_ptq.mmdet3d.ptq import load_float_checkpoint

    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get("default_scope", "mmdet3d"))
    load_float_checkpoint(MODELS.build(cfg.model), path)


def run(args: argparse.Namespace) -> int:
    cfg = build_cfg(args)
    check_checkpoint(cfg, args.checkpoint)
    ensure_synthetic_data(cfg)
    runner = Runner.from_cfg(cfg)
    runner.test()
    metrics = runner.test_loop.metrics
    print(metrics_table(metrics, per_threshold=args.verbose))
    print(stage_line(metrics.get("stages", [])))
    plan = metrics.get("precision_plan")
    if plan:
        print(f"precision plan (budget {plan['budget']:g} x the all-INT8 task loss): {len(plan['fp16_layers'])} of "
              f"{len(plan['layers'])} layers in FP16, held-out task loss {plan['loss_int8']:.4g} -> {plan['loss']:.4g}"
              + (f": {', '.join(plan['fp16_layers'][:6])}" if plan["fp16_layers"] else "")
              + (f" (+{len(plan['fp16_layers']) - 6} more in metrics.json)" if len(plan["fp16_layers"]) > 6 else ""))
    if not any(metrics.get(kind) for kind in ("fp32", metrics.get("precision"))):
        print("note: the evaluator returned no metric (with format_only=True it only writes result files); "
              "evaluate with format_only=False and ground truth to compare FP32 and the quantized model")
    plot = Path(cfg.work_dir) / "bev_fp32_vs_int8.png"
    print(f"results in {cfg.work_dir}: metrics.json, quantized.pth, quant_params.json"
          + (f", {plot.name} (bird's-eye view of one frame)" if plot.is_file() else "")
          + (f"; deployment files in {cfg.test_cfg.export_dir}" if cfg.test_cfg.get("export_dir") else ""))
    json.dumps(metrics, default=float)  # fail here, not in a consumer, if something is not serialisable
    return 0


def main(argv: list[str] | None = None) -> int:
    """Expected user errors end with one line and exit code 2; ``--debug`` shows their traceback."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:  # mmdet3d's own deprecation notes; --verbose shows them
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mmdet3d\.|mmcv\.|mmengine\.|torch\.")
    return run_reporting_user_errors(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
