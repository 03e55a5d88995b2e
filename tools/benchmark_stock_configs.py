"""Generality matrix: mmdet3d's stock LiDAR detector configs through tools/quantize.py --export.

For each config: seeded random weights (no pretrained models are reachable), the real frame of
../shared/data matching its dataset (the nuScenes sweep or the KITTI frame) as calibration and test
frame (Waymo configs, whose data is not here, read the nuScenes sweep through their own test pipeline:
its five columns stand in for Waymo's x, y, z, intensity, elongation), the default LiDAR-PTQ recipe at a
tiny budget (one frame, two clipping rules, one reconstruction iteration per unit), and ``--export``
with verification. Each row records what was quantized and what stayed float (by layer type), which
task-guided stages ran, the export files and their verification, the wall time, or the one-line error
the tool ended with. Every config runs in its own process (mmengine cannot load two ``mmdet3d::``
configs in one).

    python tools/benchmark_stock_configs.py [--only NAME ...] [--out benchmarks/stock_configs.json]

Writes ``benchmarks/stock_configs.{json,md}``; rows are appended as they finish (a killed run resumes).
Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FRAMES = {"nus": (DATA / "nuscenes_demo", "nuscenes_demo_infos.pkl"),
          "kitti": (DATA / "kitti_demo", "kitti_demo_infos.pkl")}
FRAMES["waymo"] = FRAMES["nus"]  # no Waymo frame is reachable: the nuScenes sweep, read by the Waymo pipeline
CONFIGS = {  # row name -> (mmdet3d config, frame)
    "centerpoint-pillar-nus": ("centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py", "nus"),
    "centerpoint-voxel-nus": ("centerpoint/centerpoint_voxel01_second_secfpn_8xb4-cyclic-20e_nus-3d.py", "nus"),
    "centerpoint-voxel-circlenms-nus": (
        "centerpoint/centerpoint_voxel01_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py", "nus"),
    "centerpoint-voxel-dcn-nus": (
        "centerpoint/centerpoint_voxel01_second_secfpn_head-dcn-circlenms_8xb4-cyclic-20e_nus-3d.py", "nus"),
    "pointpillars-fpn-nus": ("pointpillars/pointpillars_hv_fpn_sbn-all_8xb4-2x_nus-3d.py", "nus"),
    "ssn-nus": ("ssn/ssn_hv_secfpn_sbn-all_16xb2-2x_nus-3d.py", "nus"),
    "pointpillars-kitti": ("pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py", "kitti"),
    "second-kitti": ("second/second_hv_secfpn_8xb6-80e_kitti-3d-3class.py", "kitti"),
    "parta2-kitti": ("parta2/parta2_hv_secfpn_8xb2-cyclic-80e_kitti-3d-3class.py", "kitti"),
    "mvxnet-kitti": ("mvxnet/mvxnet_fpn_dv_second_secfpn_8xb2-80e_kitti-3d-3class.py", "kitti"),
    # Waymo: the full-data configs build the same models as these D5 (every fifth frame) ones
    "pointpillars-waymo": ("pointpillars/pointpillars_hv_secfpn_sbn-all_16xb2-2x_waymoD5-3d-3class.py", "waymo"),
    "pointpillars-waymo-car": ("pointpillars/pointpillars_hv_secfpn_sbn-all_16xb2-2x_waymoD5-3d-car.py", "waymo"),
    "second-waymo": ("second/second_hv_secfpn_sbn-all_16xb2-2x_waymoD5-3d-3class.py", "waymo"),
}
TINY_BUDGET = ["--calib-frames", "1", "--recipe-options", "recon.iterations=1", "ranges.rules=[maxmin,lp4]"]


def prepare(name: str, work: Path) -> tuple[Path, Path]:
    """The stock config pointed at the real frame (calibration = test frame, the project's metric) and a
    seeded random checkpoint of its model; returns (config path, checkpoint path)."""
    import torch
    from mmdet3d.registry import MODELS
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    config, frame = CONFIGS[name]
    folder, infos = FRAMES[frame]
    cfg = get_config(f"mmdet3d::{config}")
    test = cfg.test_dataloader
    while "dataset" in test.dataset:  # wrappers (RepeatDataset, CBGS) around the real dataset
        test.dataset = test.dataset.dataset
    test.dataset.update(data_root=f"{folder}/", ann_file=infos, data_prefix=dict(pts=""), test_mode=True)
    if frame == "waymo":
        test.dataset = waymo_pipeline_on_nuscenes_sweep(test.dataset)
    test.update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader = test
    cfg.val_dataloader = test
    classes = list(cfg.get("class_names", []))
    if frame == "waymo":
        classes = [WAYMO_AS_NUSCENES[name] for name in classes]
    cfg.test_evaluator = dict(type="CenterDistanceMAP", classes=classes or None)
    cfg.val_evaluator = cfg.test_evaluator
    path = work / f"{name}.py"
    Config(cfg.to_dict()).dump(str(path))
    init_default_scope("mmdet3d")
    torch.manual_seed(0)
    checkpoint = work / f"{name}.pth"
    torch.save({"state_dict": MODELS.build(cfg.model).state_dict()}, checkpoint)
    return path, checkpoint


# Waymo's classes under the nuScenes names of the sweep's annotations (the dataset maps labels by name)
WAYMO_AS_NUSCENES = {"Car": "car", "Pedestrian": "pedestrian", "Cyclist": "bicycle"}


def waymo_pipeline_on_nuscenes_sweep(dataset: Any) -> dict[str, Any]:
    """A Waymo test dataset turned into one that reads the nuScenes sweep (its info format) through the
    Waymo test pipeline; the sweep file has 5 columns where Waymo's have 6 (the 6th is not used); the
    head's classes keep their order under the sweep's nuScenes names."""
    pipeline = [dict(step, load_dim=5) if step["type"] == "LoadPointsFromFile" else step
                for step in dataset["pipeline"]]
    return dict(type="NuScenesDataset", data_root=dataset["data_root"], ann_file=dataset["ann_file"],
                data_prefix=dict(pts="", sweeps=""), test_mode=True, pipeline=pipeline,
                modality=dict(use_lidar=True, use_camera=False), box_type_3d="LiDAR",
                metainfo=dict(classes=[WAYMO_AS_NUSCENES[name] for name in dataset["metainfo"]["classes"]]))


def layer_types(names: list[str]) -> dict[str, int]:
    """``"a.b (Type)"`` entries counted by type."""
    return dict(Counter(n.rsplit("(", 1)[-1].rstrip(")") for n in names))


def summarize_run(name: str, work: Path, seconds: float, returncode: int, stderr: str) -> dict[str, Any]:
    config, frame = CONFIGS[name]
    row: dict[str, Any] = {"name": name, "config": config, "frame": frame, "seconds": round(seconds, 1)}
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if returncode != 0:
        tail = stderr.strip().splitlines()[-1:] if stderr.strip() else ["(no output)"]
        row.update(status="refused" if errors else "crashed", message=(errors or tail)[-1][:400])
        if not errors:  # where it crashed, for the report
            row["traceback_tail"] = [line for line in stderr.splitlines() if line.startswith("  File ")][-4:]
        return row
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    params = json.loads((work / "out" / "quant_params.json").read_text())["quantizers"]
    quantized = sorted({p["name"].rsplit(".", 1)[0] for p in params if p["name"].endswith("weight_quantizer")})
    row.update(status="ok", quantized_layers=len(quantized), float_layers=layer_types(metrics["unquantized_layers"]),
               tgpl=metrics["tgpl"], range_search=sorted(metrics["range_search"]),
               bias_correction_guarded=bool({"before", "after"} & set(metrics["bias_correction"])),
               reconstruction_guarded=bool({"before", "after"} & set(metrics["reconstruction"])))
    manifest_path = work / "out" / "export" / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        dense = manifest["verification"].get("dense", {})
        boxes = dense.get("reference_kernels", {}).get("detections", {})
        layerwise = dense.get("layerwise", {})
        row.update(export_files=sorted(manifest["files"]),
                   layerwise_max_code_diff=layerwise.get("max_code_diff"),
                   boxes=(f"{boxes['matched_within_10cm']}/{boxes['boxes_pytorch']}" if boxes.get("compared")
                          else f"not compared: {boxes.get('reason', '-')}"))
    return row


def run_one(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"stock_{name}_") as tmp:
        work = Path(tmp)
        prep = subprocess.run([sys.executable, __file__, "--prepare", name, str(work)], capture_output=True,
                              text=True)
        if prep.returncode != 0:
            return {"name": name, "config": CONFIGS[name][0], "frame": CONFIGS[name][1], "status": "not built",
                    "message": (prep.stderr.strip().splitlines() or ["?"])[-1][:400]}
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "quantize.py"), str(work / f"{name}.py"),
                              str(work / f"{name}.pth"), "--work-dir", str(work / "out"), "--export", *TINY_BUDGET],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return summarize_run(name, work, time.perf_counter() - start, run.returncode, run.stderr)


def write_report(rows: list[dict[str, Any]], out: Path, note: str = "") -> None:
    out.write_text(json.dumps({"meta": {"command": "python tools/benchmark_stock_configs.py",
                                        "budget": " ".join(TINY_BUDGET), "weights": "seeded random (torch seed 0)",
                                        **describe_machine(load=False), "note": note},
                               "rows": rows}, indent=1))
    lines = ["# Stock mmdet3d LiDAR configs through tools/quantize.py --export", "",
             "Seeded random weights; one real frame (calibration and test); default LiDAR-PTQ recipe with "
             f"`{' '.join(TINY_BUDGET)}`. Frame `waymo`: no Waymo frame is reachable, so the Waymo configs read "
             "the nuScenes sweep through their own test pipeline (its 5 columns stand in for x, y, z, intensity, "
             f"elongation). Command: `python tools/benchmark_stock_configs.py`. {note}".rstrip(), "",
             "| config | frame | result | quantized layers | kept float (type: count) | TGPL | range search | "
             "guards (BC / recon) | export files | boxes ONNX vs PyTorch | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            where = r.get("traceback_tail", [])[-2:-1]  # the package's own frame above torch's
            where = f" (at {where[0].strip()})" if where else ""
            lines.append(f"| `{r['config']}` | {r['frame']} | {r['status']}: {r.get('message', '')}{where} "
                         f"| - | - | - | - | - | - | - | {r.get('seconds', '-')} |")
            continue
        floats = ", ".join(f"{k}: {v}" for k, v in r["float_layers"].items()) or "none"
        lines.append(f"| `{r['config']}` | {r['frame']} | ok | {r['quantized_layers']} | {floats} | "
                     f"{'yes' if r['tgpl'] else 'no'} | {', '.join(r['range_search']) or 'no'} | "
                     f"{'yes' if r['bias_correction_guarded'] else 'no'} / "
                     f"{'yes' if r['reconstruction_guarded'] else 'no'} | "
                     f"{', '.join(r.get('export_files', [])) or '-'} | {r.get('boxes', '-')} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="these rows only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "stock_configs.json")
    parser.add_argument("--note", help="a sentence for the report (e.g. the machine load); kept in the JSON")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    parser.add_argument("--prepare", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare[0], Path(args.prepare[1]))
        return 0
    if not all(folder.is_dir() for folder, _ in FRAMES.values()):
        print(f"error: the real frames are not in {DATA} (see its README)", file=sys.stderr)
        return 2
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"meta": {}, "rows": []}
    rows, note = previous["rows"], args.note if args.note is not None else previous["meta"].get("note", "")
    if args.report_only:
        write_report(rows, args.out, note)
        return 0
    done = {r["name"] for r in rows}
    for name in args.only or list(CONFIGS):
        if name in done and not args.only:
            continue
        print(f"{name} ...", flush=True)
        row = run_one(name)
        print(f"{name}: {row['status']} {row.get('message', '')} ({row.get('seconds', '-')} s)", flush=True)
        rows = [r for r in rows if r["name"] != name] + [row]
        write_report(rows, args.out, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
