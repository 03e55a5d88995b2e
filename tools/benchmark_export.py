"""Export benchmark: ONNX Runtime latency of the INT8 Q/DQ network vs FP32, and what the export keeps.

1. Latency (CPU, ONNX Runtime, batch 1): the dense network (SECOND backbone, SECONDFPN neck, CenterHead)
   of mmdet3d's nuScenes CenterPoint-Pillar config on its 512x512 BEV grid; random weights and a BEV
   canvas with 3% occupied cells (latency does not depend on the values), max-min W8A8. FP32 ONNX vs the
   INT8 file in both forms: ``tensorrt`` (what trtexec gets) and ``onnxruntime`` (post-ReLU uint8, see
   lidar_ptq/export/onnx_qdq.py), each against the PyTorch fake-quant model.
2. Fidelity on the trained synthetic models: mAP of PyTorch INT8 (max-min W8A8) and of the same model
   run from its exported files (ONNX Runtime for dense parts, the libspconv reader for the sparse
   backbone) on the validation frames.

    python tools/benchmark_export.py [--runs 10] [--threads N] [--val-frames 100] [--skip-latency]
                                     [--skip-fidelity]
Writes benchmarks/export.json and benchmarks/export.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from machine import describe_machine
from mmengine.config import Config
from mmengine.registry import init_default_scope

import lidar_ptq
import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.export.onnx_qdq import export_onnx
from lidar_ptq.export.runtime import median_latency_ms, ort_session
from lidar_ptq.export.verify import layerwise_agreement
from lidar_ptq.lidar.recipes import recipe_from_dict
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.deployed import deployed_parts
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate
from lidar_ptq.mmdet3d.export import DenseNetwork, export_detector
from lidar_ptq.mmdet3d.ptq import build_float_model, prepare, quantize_detector
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data

ROOT = Path(__file__).resolve().parents[1]
NUS_PILLAR = ROOT / "configs/nuscenes/centerpoint_pillar02_nus_lidar_ptq.py"
SYNTHETIC = {"pillar": ROOT / "configs/synthetic/centerpoint_pillar_synthetic.py",
             "voxel": ROOT / "configs/synthetic/centerpoint_voxel_synthetic.py"}
MAXMIN = {"method": "maxmin", "w_bits": 8, "a_bits": 8}


def bev_canvas(channels: int, size: int, occupied: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(1, channels, size, size)
    mask = torch.rand(size, size, generator=g) < occupied
    canvas[0, :, mask] = torch.rand(channels, int(mask.sum()), generator=g) * 4
    return canvas


def latency_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> tuple[float, list[np.ndarray]]:
    outputs = sess.run(None, feeds)
    return median_latency_ms(sess, feeds, runs), outputs


def latency_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mmdet3d.registry import MODELS
    cfg = Config.fromfile(str(NUS_PILLAR))
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    adapter = prepare(model, recipe_from_dict(MAXMIN))
    dense = DenseNetwork(adapter).eval()
    size = cfg.model.pts_middle_encoder.output_shape[0]
    channels = cfg.model.pts_middle_encoder.in_channels
    lidar_ptq.calibrate(dense, [bev_canvas(channels, size, 0.03, s) for s in range(4)], progress=False)
    bev = bev_canvas(channels, size, 0.03, 99)
    with torch.no_grad():
        reference = [t.numpy() for t in dense(bev)]
    name = f"centerpoint_pillar02_nus dense {size}x{size}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8_ort.onnx",
                 "int8_tensorrt_graph": Path(tmp) / "int8_trt.onnx"}
        outputs = [f"out{i}" for i in range(len(reference))]
        export_onnx(dense, (bev,), files["fp32"], ["bev"], outputs, quantized=False)
        export_onnx(dense, (bev,), files["int8"], ["bev"], outputs, target="onnxruntime")
        export_onnx(dense, (bev,), files["int8_tensorrt_graph"], ["bev"], outputs, target="tensorrt")
        fp32_ms = None
        for method, path in files.items():
            start = time.perf_counter()
            ms, got = latency_ms(ort_session(path, threads=args.threads), {"bev": bev.numpy()}, args.runs)
            fp32_ms = ms if method == "fp32" else fp32_ms
            rows.append({"model": name, "method": method, "w_bits": 32 if method == "fp32" else 8,
                         "a_bits": 32 if method == "fp32" else 8, "metric": "latency_ms", "value": ms,
                         "fp32": fp32_ms, "seconds": time.perf_counter() - start,
                         "file_mb": round(path.stat().st_size / 2 ** 20, 2)})
            if method != "fp32":
                worst = max(float(np.abs(g - r).max() / (np.abs(r).max() / 127)) for g, r in zip(got, reference))
                layerwise = layerwise_agreement(dense, (bev,), path, ["bev"])
                for metric, value in (("output_max_diff_int8_steps", worst),
                                      ("layerwise_max_code_diff", layerwise["max_code_diff"]),
                                      ("layerwise_differing_code_share", layerwise["differing_code_share"])):
                    rows.append({"model": name, "method": method, "w_bits": 8, "a_bits": 8, "metric": metric,
                                 "value": value, "fp32": None, "seconds": 0.0})
            print(f"{name} {method}: {ms:.1f} ms", flush=True)
    return rows


def fidelity_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for kind, config in SYNTHETIC.items():
        cfg = Config.fromfile(str(config))
        ensure_synthetic_data(cfg)
        checkpoint = ROOT / "benchmarks" / "models" / f"centerpoint_{kind}_synthetic.pth"
        model = build_float_model(cfg, checkpoint)
        loader = build_test_loader(cfg, args.val_frames)
        start = time.perf_counter()
        fp32 = evaluate(model, loader, cfg.test_evaluator)["det/mAP"]
        batches = collect_batches(model, build_calibration_loader(cfg, args.calib_frames, args.seed), progress=False)
        quantize_detector(model, batches, recipe_from_dict({**MAXMIN, "calib_frames": args.calib_frames}))
        int8 = evaluate(model, loader, cfg.test_evaluator)["det/mAP"]
        name = f"centerpoint_{kind}_synthetic"
        rows.append({"model": name, "method": "int8_pytorch", "w_bits": 8, "a_bits": 8, "metric": "mAP",
                     "value": int8, "fp32": fp32, "seconds": time.perf_counter() - start})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            manifest = export_detector(model, batches[0], Path(tmp) / "export")
            with deployed_parts(model, Path(tmp) / "export"):
                deployed = evaluate(model, loader, cfg.test_evaluator)["det/mAP"]
        rows.append({"model": name, "method": "int8_exported", "w_bits": 8, "a_bits": 8, "metric": "mAP",
                     "value": deployed, "fp32": fp32, "seconds": time.perf_counter() - start,
                     "runtime": "onnxruntime (dense) + lidar_ptq.export.sparse_check (sparse)",
                     "verification": manifest["verification"]})
        print(f"{name}: fp32 {100 * fp32:.2f}, PyTorch INT8 {100 * int8:.2f}, exported INT8 {100 * deployed:.2f}",
              flush=True)
    return rows


def write(result: dict[str, Any], out: Path) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    tmp.replace(out)
    meta = result["meta"]
    lines = ["# Export benchmark", "", f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}, "
             f"{meta['threads']} intra-op threads, median of {meta['runs']} runs after 2 warm-up runs.", ""]
    lat = [r for r in result["rows"] if r["metric"] == "latency_ms"]
    if lat:
        lines += ["## Latency: dense network of the nuScenes CenterPoint-Pillar (512x512 BEV, batch 1)", "",
                  "| file | latency ms | vs FP32 | file MB | layer by layer vs PyTorch: max code diff / "
                  "codes differing | outputs vs PyTorch: max diff (int8 steps) |", "|---|---|---|---|---|---|"]
        for r in lat:
            fid = {f["metric"]: f["value"] for f in result["rows"] if f["method"] == r["method"]
                   and f["model"] == r["model"] and f["metric"] != "latency_ms"}
            layer = (f"{fid['layerwise_max_code_diff']:.0f} / {100 * fid['layerwise_differing_code_share']:.4f}%"
                     if fid else "-")
            whole = f"{fid['output_max_diff_int8_steps']:.2f}" if fid else "-"
            lines.append(f"| {r['method']} | {r['value']:.1f} | {r['value'] / r['fp32']:.2f}x | {r['file_mb']} | "
                         f"{layer} | {whole} |")
        lines += ["", "`int8` is the `onnxruntime`-target file (post-ReLU activations as uint8, same scale), "
                  "`int8_tensorrt_graph` the TensorRT file run by ONNX Runtime (Relu before an int8 "
                  "QuantizeLinear blocks ONNX Runtime's QLinearConv fusion; TensorRT fuses it). Layer by layer: "
                  "each quantizer's codes from ONNX Runtime's reference kernels against PyTorch's on the same input "
                  "(lidar_ptq/export/verify.py); whole outputs: ONNX Runtime's optimized kernels, where float "
                  "rounding differences flip codes that then propagate (see docs/deploy_jetson.md).", ""]
    fid = [r for r in result["rows"] if r["metric"] == "mAP"]
    if fid:
        lines += [f"## Fidelity: synthetic models, max-min W8A8, {meta['val_frames']} validation frames", "",
                  "| model | FP32 mAP | PyTorch INT8 mAP | exported INT8 mAP |", "|---|---|---|---|"]
        for model in sorted({r["model"] for r in fid}):
            rs = {r["method"]: r for r in fid if r["model"] == model}
            lines.append(f"| {model} | {100 * rs['int8_pytorch']['fp32']:.2f} | "
                         f"{100 * rs['int8_pytorch']['value']:.2f} | {100 * rs['int8_exported']['value']:.2f} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--val-frames", type=int, default=100)
    parser.add_argument("--calib-frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "export.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    init_default_scope("mmdet3d")
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    meta = {**describe_machine(), "onnxruntime": ort.__version__, "threads": args.threads, "runs": args.runs,
            "val_frames": args.val_frames, "calib_frames": args.calib_frames, "seed": args.seed}
    rows = []
    rows += latency_rows(args) if not args.skip_latency else [r for r in previous["rows"]
                                                               if r["metric"] != "mAP"]
    rows += fidelity_rows(args) if not args.skip_fidelity else [r for r in previous["rows"] if r["metric"] == "mAP"]
    write({"meta": meta, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
