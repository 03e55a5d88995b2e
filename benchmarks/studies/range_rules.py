"""Study: does the task loss on the calibration frames rank quantized pillar models like val mAP does?

LiDAR-PTQ picks its clipping rule, and keeps or undoes reconstruction and bias correction, by the
TGPL error on the calibration frames. This script quantizes the synthetic pillar model with every
clipping rule of the range search, over active sites (sparse) and over every site (dense), each with
and without bias correction (no reconstruction), and records per variant: val mAP, the TGPL error on
the calibration frames, and a pseudo-label mAP (the float model's detections with score >= 0.3 as
ground truth for the quantized model's, centre distance 0.5/1 m) on the same frames.

    python benchmarks/studies/range_rules.py --seeds 0 1          (about 10 min per seed on 1 CPU thread)
    python benchmarks/studies/range_rules.py --report-only        (rewrite the markdown from the JSON)

Writes benchmarks/range_rules.{json,md}; a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # the benchmark's models and configs
from benchmark_lidar import CONFIGS, ROOT  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope

import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.lidar import LidarPTQConfig
from lidar_ptq.lidar.tgpl import TaskGuidedPositiveLoss
from lidar_ptq.mmdet3d.adapter import DetectorAdapter
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate
from lidar_ptq.mmdet3d.metrics import box_record, center_distance_map
from lidar_ptq.mmdet3d.ptq import build_float_model, quantize_detector

CHECKPOINT = ROOT / "benchmarks/models/centerpoint_pillar_synthetic.pth"
RULES = ("maxmin", "lp2", "pct99.9", "pct99.99", "lp3")
PSEUDO_GT_SCORE = 0.3


def _boxes(instances: Any, keep: torch.Tensor) -> dict[str, np.ndarray]:
    return box_record(instances.bboxes_3d[keep], instances.labels_3d[keep], instances.scores_3d[keep], None)


@torch.no_grad()
def calibration_losses(quantized: DetectorAdapter, reference: DetectorAdapter, batches: list[Any],
                       float_outputs: list[Any], classes: list[str]) -> dict[str, float]:
    """TGPL and pseudo-label mAP of the quantized model against the float one on the calibration frames."""
    tgpl, frames = TaskGuidedPositiveLoss(), []
    losses = []
    for index, (batch, float_output) in enumerate(zip(batches, float_outputs)):
        output = quantized(batch)
        losses.append(float(tgpl(output, float_output, batch)))
        metas = [sample.metainfo for sample in batch.data_samples]
        pseudo = reference.head.predict_by_feat(float_output, metas)
        predicted = quantized.head.predict_by_feat(output, metas)
        for frame, (gt, pred) in enumerate(zip(pseudo, predicted)):
            frames.append({"token": f"{index}_{frame}", "gt": _boxes(gt, gt.scores_3d >= PSEUDO_GT_SCORE),
                           "pred": _boxes(pred, torch.ones_like(pred.scores_3d, dtype=torch.bool))})
    return {"tgpl": float(np.mean(losses)), "pseudo_map": center_distance_map(frames, classes, (0.5, 1.0))["mAP"]}


def run_seed(seed: int, args: argparse.Namespace, rows: list[dict[str, Any]], out: Path) -> None:
    cfg = Config.fromfile(str(CONFIGS["pillar"]))
    loader = build_test_loader(cfg, args.val_frames)
    reference = DetectorAdapter(build_float_model(cfg, CHECKPOINT))
    batches = collect_batches(reference.detector, build_calibration_loader(cfg, args.calib_frames, seed),
                              progress=False)
    with torch.no_grad():
        float_outputs = [reference(batch) for batch in batches]
    classes = list(loader.dataset.metainfo["classes"])
    done = {(r["seed"], r["sparse"], r["rule"], r["bias_correction"]) for r in rows}
    for sparse in (True, False):
        for rule in RULES:
            for bias_correction in (False, True):
                if (seed, sparse, rule, bias_correction) in done:
                    continue
                config = LidarPTQConfig(sparse_calibration=sparse, range_search=False, tgpl=False,
                                        adaptive_rounding=False, bias_correction=bias_correction,
                                        calib_frames=args.calib_frames)
                recipe = config.recipe()
                recipe.quant, recipe.select_loss = config.quant_config(rule), None  # this rule, BC unguarded
                model = build_float_model(cfg, CHECKPOINT)
                start = time.perf_counter()
                quantize_detector(model, batches, recipe)
                row = {"seed": seed, "sparse": sparse, "rule": rule, "bias_correction": bias_correction,
                       "val_map": evaluate(model, loader, cfg.test_evaluator)["det/mAP"],
                       **calibration_losses(DetectorAdapter(model), reference, batches, float_outputs, classes),
                       "seconds": time.perf_counter() - start}
                rows.append(row)
                out.write_text(json.dumps({"meta": vars_meta(args), "rows": rows}, indent=1))
                print(json.dumps(row), flush=True)


def vars_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"val_frames": args.val_frames, "calib_frames": args.calib_frames, "pseudo_gt_score": PSEUDO_GT_SCORE}


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def write_report(result: dict[str, Any], out: Path) -> None:
    rows, meta = result["rows"], result["meta"]
    lines = ["# Range rules: calibration-frame losses against val mAP (synthetic CenterPoint-Pillar, W8A8)", "",
             f"No reconstruction; first {meta['val_frames']} val frames; {meta['calib_frames']} calibration frames "
             f"per seed. TGPL: the error LiDAR-PTQ's range search and guards minimise. Pseudo mAP: the float model's "
             f"detections (score >= {meta['pseudo_gt_score']}) as ground truth for the quantized model's, on the "
             "calibration frames. Written by `benchmarks/studies/range_rules.py`.", "",
             "| seed | sites | rule | bias correction | val mAP | TGPL | pseudo mAP |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {'active' if r['sparse'] else 'all'} | {r['rule']} | "
                     f"{'yes' if r['bias_correction'] else 'no'} | {100 * r['val_map']:.2f} | {r['tgpl']:.4f} | "
                     f"{100 * r['pseudo_map']:.2f} |")
    lines += ["", "Rank correlation (Spearman) with val mAP, per seed (TGPL negated: lower is better):", "",
              "| seed | variants | TGPL, all | pseudo mAP, all | TGPL, with bias correction | pseudo mAP, with bias "
              "correction | val mAP range with bias correction |", "|---|---|---|---|---|---|---|"]
    for seed in sorted({r["seed"] for r in rows}):
        group = [r for r in rows if r["seed"] == seed]
        corrected = [r for r in group if r["bias_correction"]]
        cells = []
        for subset in (group, corrected):
            val = [r["val_map"] for r in subset]
            cells += [spearman(val, [-r["tgpl"] for r in subset]), spearman(val, [r["pseudo_map"] for r in subset])]
        span = [100 * r["val_map"] for r in corrected]
        lines.append(f"| {seed} | {len(group)} | " + " | ".join(f"{c:+.2f}" for c in cells)
                     + f" | {min(span):.2f} - {max(span):.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--val-frames", type=int, default=100)
    parser.add_argument("--calib-frames", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "range_rules.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"meta": vars_meta(args), "rows": []}
    if not args.report_only:
        logging.basicConfig(level=logging.WARNING)
        init_default_scope("mmdet3d")
        if result["meta"] != vars_meta(args):
            raise SystemExit(f"{args.out} holds a run with other settings ({result['meta']}): pass another --out")
        for seed in args.seeds:
            run_seed(seed, args, result["rows"], args.out)
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
