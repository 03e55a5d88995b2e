"""Precision plan benchmark: FP16 layers, mAP with intervals and ONNX Runtime latency per task-loss budget.

The synthetic CenterPoint-Pillar is quantized W8A8 with the paper's first stage (max-min ranges over
active sites: the recipe that loses most, so FP16 layers have something to buy back) once per
calibration draw; one sensitivity measurement per draw then serves every budget, each budget's plan
is found on held-out calibration frames, and the planned model is evaluated on the val frames. Every
row reports the difference to FP32 with its 95% bootstrap interval (val frames resampled, calibration
draws resampled). Latency: the exported dense network (``dense.onnx``, Q/DQ) of draw 0 under ONNX
Runtime's CPU provider, median of repeated runs on this machine, next to the float file
(``dense.fp32.onnx``); CPU INT8 kernels say little about TensorRT, the docs give the trtexec flags.

    python tools/benchmark_precision_plan.py [--budgets 1 0.3 0.1 0.03] [--seeds 0 1 2] [--val-frames 1000]
                                            [--out benchmarks/precision_plan.json]

Writes ``benchmarks/precision_plan.{json,md}``; rows are appended as they finish (a killed run resumes).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from machine import describe_machine
from mmengine.config import Config
from mmengine.registry import init_default_scope

import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.batches import call_model
from lidar_ptq.export.runtime import median_latency_ms, ort_session
from lidar_ptq.lidar.precision_plan import (
    apply_precision_plan,
    measure_sensitivity,
    own_quantizers,
    plan_precision,
    rank_layers,
)
from lidar_ptq.lidar.range_search import task_loss
from lidar_ptq.lidar.recipes import recipe_from_dict
from lidar_ptq.lidar.tgpl import TaskGuidedPositiveLoss
from lidar_ptq.mmdet3d.adapter import DetectorAdapter
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate_saving_matches
from lidar_ptq.mmdet3d.export import export_detector
from lidar_ptq.mmdet3d.intervals import MatchTable, bootstrap_map_file
from lidar_ptq.mmdet3d.ptq import build_float_model, quantize_detector
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data
from lidar_ptq.quant.quantizer import QuantMode, temporary_quant_mode
from lidar_ptq.stats import paired_interval, resample_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/synthetic/centerpoint_pillar_synthetic.py"
CHECKPOINT = ROOT / "benchmarks/models/centerpoint_pillar_synthetic.pth"
MODEL = "centerpoint_pillar_synthetic"
# the paper's first stage: sparse max-min ranges, nothing else
RECIPE = {"method": "lidar_ptq", "w_bits": 8, "a_bits": 8, "equalize_inputs": False, "bias_correction": False,
          "range_search": False, "tgpl": False, "adaptive_rounding": False, "guards": False}
BOOTSTRAP_RESAMPLES = 1000


def build_model(cfg: Config) -> torch.nn.Module:
    return build_float_model(cfg, CHECKPOINT)


def pillar_val_loader(val_frames: int) -> tuple[Config, Any]:
    """The synthetic pillar model's config and a loader of its first ``val_frames`` val frames (generated
    first if the data set has fewer), with mmdet3d's registries in scope."""
    logging.basicConfig(level=logging.WARNING)
    init_default_scope("mmdet3d")
    cfg = Config.fromfile(str(CONFIG))
    ensure_synthetic_data(cfg, at_least={"val": val_frames})
    return cfg, build_test_loader(cfg, val_frames)


def frames_path(out: Path, name: str) -> Path:
    return out.parent / "frames" / out.stem / f"{name}.npz"


def evaluate(model: torch.nn.Module, loader: Any, cfg: Config, out: Path, name: str) -> float:
    """mAP on the val frames; the per-frame matches are kept for the intervals."""
    return float(evaluate_saving_matches(model, loader, cfg.test_evaluator, frames_path(out, name))["det/mAP"])


def onnx_latency_ms(path: Path, repeats: int = 20) -> float:
    """Median wall time of one run of ``path`` under ONNX Runtime's CPU provider (zeros of its input shape)."""
    feeds = {}
    for value in onnx.load(str(path)).graph.input:
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = np.zeros(shape, dtype=np.float32)
    return median_latency_ms(ort_session(path, threads=torch.get_num_threads()), feeds, repeats, warmup=3)


def dense_latency(model: torch.nn.Module, plan: Any, batch: Any) -> dict[str, float]:
    """Latency of the dense network exported with ``plan`` applied (Q/DQ file) and of its float file."""
    planned = copy.deepcopy(model)
    apply_precision_plan(DetectorAdapter(planned), plan)
    with tempfile.TemporaryDirectory() as folder:
        export_detector(planned, batch, Path(folder) / "export", verify=False)
        return {"latency_ms": onnx_latency_ms(Path(folder) / "export" / "dense.onnx"),
                "fp32_latency_ms": onnx_latency_ms(Path(folder) / "export" / "dense.fp32.onnx")}


@dataclass
class Draw:
    """One calibration draw, quantized: the first half of its batches measures the layers, the rest is
    held out; ``outputs`` are the float outputs of every batch."""
    model: torch.nn.Module
    adapter: DetectorAdapter
    batches: list[Any]
    outputs: list[Any]
    sensitivity: dict[str, dict[str, float]]
    ptq_seconds: float
    sensitivity_seconds: float

    @property
    def half(self) -> int:
        return len(self.batches) // 2

    def fp16_quantizers(self, names: list[str]) -> list[Any]:
        modules = dict(self.adapter.named_modules())
        return own_quantizers(*(modules[n] for n in names))


def quantized_draw(seed: int, cfg: Config, args: argparse.Namespace) -> Draw:
    """One calibration draw quantized, its float outputs and the layers' sensitivity."""
    model = build_model(cfg)
    batches = collect_batches(model, build_calibration_loader(cfg, args.calib_frames, seed), progress=False)
    start = time.perf_counter()
    quantize_detector(model, batches, recipe_from_dict({**RECIPE, "calib_frames": args.calib_frames}))
    ptq_seconds = time.perf_counter() - start
    adapter, half = DetectorAdapter(model), len(batches) // 2
    with torch.no_grad(), temporary_quant_mode(adapter, QuantMode.FLOAT):
        outputs = [call_model(adapter, b) for b in batches]
    start = time.perf_counter()
    sensitivity, _ = measure_sensitivity(adapter, batches[:half], outputs[:half], TaskGuidedPositiveLoss())
    return Draw(model, adapter, batches, outputs, sensitivity, ptq_seconds, time.perf_counter() - start)


def loss_curve(draw: Draw) -> list[float]:
    """Held-out task loss with the first k layers of the sensitivity ranking in FP16, k = 0..layers: what the
    bisection searches (it measures about log2(layers) of these points)."""
    ranking, half = rank_layers(draw.sensitivity), draw.half
    return [task_loss(draw.adapter, draw.batches[half:], draw.outputs[half:], TaskGuidedPositiveLoss(),
                      float_modules=draw.fp16_quantizers(ranking[:k])) for k in range(len(ranking) + 1)]


def run_draw(seed: int, budgets: list[float], cfg: Config, loader: Any, args: argparse.Namespace,
             result: dict[str, Any]) -> None:
    """Quantize once, measure the layers once, then plan, evaluate (and for draw 0 time) every budget."""
    if all(any(r["seed"] == seed and r["budget"] == b for r in result["rows"]) for b in budgets):
        return
    draw = quantized_draw(seed, cfg, args)
    half = draw.half
    for budget in budgets:
        if any(r["seed"] == seed and r["budget"] == budget for r in result["rows"]):
            continue
        start = time.perf_counter()
        plan = plan_precision(draw.adapter, draw.batches[:half], draw.outputs[:half], draw.batches[half:],
                              draw.outputs[half:], TaskGuidedPositiveLoss(), budget, sensitivity=draw.sensitivity)
        plan_seconds = time.perf_counter() - start
        with temporary_quant_mode(draw.fp16_quantizers(plan.fp16_layers), QuantMode.FLOAT):
            value = evaluate(draw.model, loader, cfg, args.out, f"budget{budget:g}_seed{seed}")
        row = {"model": MODEL, "budget": budget, "seed": seed, "fp16_layers": len(plan.fp16_layers),
               "layers": len(plan.layers), "fp16_layer_names": plan.fp16_layers, "map": value,
               "held_out_loss": plan.loss, "held_out_loss_int8": plan.loss_int8, "ptq_seconds": draw.ptq_seconds,
               "sensitivity_seconds": draw.sensitivity_seconds, "plan_seconds": plan_seconds}
        if seed == args.seeds[0]:
            row.update(dense_latency(draw.model, plan, draw.batches[0]))
        result["rows"].append(row)
        write_outputs(result, args.out)
        print(f"draw {seed} budget {budget:g}: {len(plan.fp16_layers)}/{len(plan.layers)} FP16, "
              f"mAP {100 * value:.2f}", flush=True)


def intervals(result: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Per budget: the difference to FP32 (x100) with its bootstrap interval over frames and draws."""
    fp32_path = frames_path(out, "fp32")
    if not fp32_path.is_file():
        return {}
    weights = resample_weights(MatchTable.load(fp32_path).frames, BOOTSTRAP_RESAMPLES, seed=0)
    base = bootstrap_map_file(fp32_path, weights)
    found = {}
    for budget in sorted({r["budget"] for r in result["rows"]}, reverse=True):
        paths = [frames_path(out, f"budget{budget:g}_seed{r['seed']}") for r in result["rows"] if r["budget"] == budget]
        if paths and all(p.is_file() for p in paths):
            samples = [bootstrap_map_file(p, weights) for p in paths]
            found[f"{budget:g}"] = paired_interval(samples, [base]).as_dict()
    return found


def write_outputs(result: dict[str, Any], out: Path) -> None:
    result["intervals"] = intervals(result, out) or result.get("intervals", {})
    for row in result["rows"]:  # this draw's difference to FP32 (x100); the intervals pool the draws
        row["delta"] = round(100.0 * (row["map"] - result["meta"]["fp32_map"]), 3)
    out.write_text(json.dumps(result, indent=1))
    meta, fp32 = result["meta"], result["meta"].get("fp32_map")
    lines = ["# Deployment precision plan: FP16 layers under a task-loss budget", "",
             meta["note"], "", f"Command: `{meta['command']}`; machine: {meta['machine']}, load average (1 min) "
             f"{meta.get('load_before', float('nan')):.2f} before the run, nothing else running.", "",
             "| budget (x all-INT8 task loss) | FP16 layers (per draw) | mAP (per draw) | delta vs FP32 [95% CI] | "
             "dense ONNX Runtime CPU latency, ms (draw 0) |",
             "|---|---|---|---|---|"]
    if fp32 is not None:
        lines.append(f"| FP32 (every layer float) | all | {100 * fp32:.2f} | - | "
                     f"{meta.get('fp32_latency_ms', float('nan')):.1f} |")
    for budget in sorted({r["budget"] for r in result["rows"]}, reverse=True):
        rows = sorted((r for r in result["rows"] if r["budget"] == budget), key=lambda r: r["seed"])
        gap = result["intervals"].get(f"{budget:g}")
        cell = "-" if gap is None else (f"{gap['delta']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]"
                                        + ("" if gap["resolved"] else " (unresolved)"))
        latency = next((f"{r['latency_ms']:.1f}" for r in rows if "latency_ms" in r), "-")
        counts = " / ".join(str(r["fp16_layers"]) for r in rows)
        maps = " / ".join(f"{100 * r['map']:.2f}" for r in rows)
        lines.append(f"| {budget:g} | {counts} of {rows[0]['layers']} | {maps} | {cell} | {latency} |")
    lines += ["", "Seconds per draw (PTQ / sensitivity / plan per budget): " + "; ".join(
        f"draw {s}: {r['ptq_seconds']:.0f} / {r['sensitivity_seconds']:.0f} / "
        f"{statistics.fmean(x['plan_seconds'] for x in result['rows'] if x['seed'] == s):.0f}"
        for s, r in sorted({r["seed"]: r for r in result["rows"]}.items())), ""]
    curve = meta.get("loss_curve")
    if curve:
        losses = curve["held_out_loss"]
        points = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, len(losses) - 1]
        lines += [f"Held-out task loss (draw {curve['seed']}) with the first k layers of the sensitivity ranking in "
                  "FP16, as a fraction of the all-INT8 loss (what the bisection searches):", "",
                  "| k | " + " | ".join(str(k) for k in points if k < len(losses)) + " |",
                  "|---|" + "---|" * len([k for k in points if k < len(losses)]),
                  "| loss / all-INT8 | " + " | ".join(f"{losses[k] / losses[0]:.3f}" for k in points if k < len(losses))
                  + " |", ""]
    first = [r for r in result["rows"] if r["seed"] == min(x["seed"] for x in result["rows"])] if result["rows"] else []
    for row in sorted(first, key=lambda r: -r["budget"]):
        if row["fp16_layer_names"]:
            lines.append(f"- budget {row['budget']:g}, draw {row['seed']}: {', '.join(row['fp16_layer_names'])}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.3, 0.1, 0.03])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-frames", type=int, default=1000)
    parser.add_argument("--calib-frames", type=int, default=16, help="half measure the layers, half are held out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "precision_plan.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        write_outputs(json.loads(args.out.read_text()), args.out)
        return 0
    cfg, loader = pillar_val_loader(args.val_frames)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    result["meta"] = {**result.get("meta", {}), "val_frames": args.val_frames, "calib_frames": args.calib_frames,
                      "recipe": RECIPE, "onnxruntime": ort.__version__, **describe_machine(),
                      "command": "python tools/benchmark_precision_plan.py "
                                 f"--budgets {' '.join(f'{b:g}' for b in args.budgets)} "
                                 f"--seeds {' '.join(map(str, args.seeds))} --val-frames {args.val_frames}",
                      "note": (f"Synthetic CenterPoint-Pillar, W8A8 sparse max-min (the paper's first stage), "
                               f"{args.calib_frames} calibration frames per draw (draws "
                               f"{', '.join(map(str, args.seeds))}): the first half measures each layer's task "
                               "sensitivity, the second half is held out to choose the plan. FP16 layers run in "
                               f"float in the simulation. mAP on the first {args.val_frames} val frames "
                               "(nuScenes-style, centre distance 0.5/1/2/4 m); intervals resample val frames "
                               "and draws. Latency: the dense network's ONNX file under ONNX Runtime "
                               f"{ort.__version__}, CPU provider, batch 1, median of 20 runs.")}
    if "fp32_map" not in result["meta"] or not frames_path(args.out, "fp32").is_file():
        result["meta"]["fp32_map"] = evaluate(build_model(cfg), loader, cfg, args.out, "fp32")
    for seed in args.seeds:
        run_draw(seed, args.budgets, cfg, loader, args, result)
    if "loss_curve" not in result["meta"]:
        result["meta"]["loss_curve"] = {"seed": args.seeds[0],
                                        "held_out_loss": loss_curve(quantized_draw(args.seeds[0], cfg, args))}
    rows = [r for r in result["rows"] if "fp32_latency_ms" in r]
    if rows:
        result["meta"]["fp32_latency_ms"] = statistics.median(r["fp32_latency_ms"] for r in rows)
    write_outputs(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
