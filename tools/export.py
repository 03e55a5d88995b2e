"""Export a quantized mmdet3d detector for deployment (TensorRT + libspconv) and verify it on the CPU.

    python tools/export.py CONFIG QUANTIZED_CKPT [--out DIR] [--sparse-fp16 PATTERN ...] [--seed S]
                           [--no-verify] [--cfg-options k=v ...]

QUANTIZED_CKPT is the ``quantized.pth`` that tools/quantize.py wrote (also reachable
as ``tools/quantize.py ... --export``). DIR (default: next to the checkpoint,
``export/``) receives pillar_encoder.onnx (Pillar) or sparse_backbone.onnx (Voxel; with
voxel_encoder.onnx when the voxel encoder is learned), dense.onnx,
their float graphs + TensorRT calibration caches, and manifest.json. See
docs/deploy_jetson.md for building the engines.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmengine.config import DictAction
from mmengine.registry import init_default_scope
from quantize import load_config  # tools/ is on sys.path when this script runs

from lidar_ptq.errors import run_reporting_user_errors
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data

log = logging.getLogger("lidar_ptq.export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="quantized.pth written by tools/quantize.py")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/export)")
    parser.add_argument("--sparse-fp16", nargs="*", default=[], metavar="PATTERN",
                        help="sparse layers kept in FP16 on libspconv, e.g. '*conv_input*'")
    parser.add_argument("--seed", type=int, default=0, help="picks the training frame used to trace and verify")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime / spconv checks")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    cfg.merge_from_dict(args.cfg_options)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist (run tools/quantize.py first)")
    from mmdet3d.registry import MODELS

    import lidar_ptq.mmdet3d  # noqa: F401  (registries)
    from lidar_ptq.mmdet3d.export import export_detector, sample_batch, summarize
    from lidar_ptq.mmdet3d.ptq import load_quantized

    init_default_scope("mmdet3d")
    model = MODELS.build(cfg.model)
    load_quantized(model, args.checkpoint)  # a float checkpoint is refused here, before any frame is loaded
    ensure_synthetic_data(cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "export"
    manifest = export_detector(model.eval(), sample_batch(cfg, model, args.seed), out,
                               sparse_precision={p: "fp16" for p in args.sparse_fp16}, verify=not args.no_verify)
    print(summarize(manifest))
    print(f"export in {out} (manifest.json describes every file; docs/deploy_jetson.md builds the engines)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Expected user errors end with one line and exit code 2; ``--debug`` shows their traceback."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return run_reporting_user_errors(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
