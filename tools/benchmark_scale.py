"""Cost of LiDAR-PTQ at the size users run: time, forwards and memory per stage against calibration frames.

Models: mmdet3d's stock nuScenes CenterPoint-Pillar and -Voxel configs (``nus-pillar``, ``nus-voxel``;
seeded random weights, since cost does not depend on the weights' values) and the project's trained
synthetic models (``synthetic-pillar``, ``synthetic-voxel``). Frames for the stock models: the real
nuScenes sweep in ../shared/data, each copy turned by its own seeded yaw (distinct frames, real
geometry), or synthetic frames at nuScenes geometry when that folder is absent; the synthetic models
get their own generator's frames. Each (model, frames) run is its own process (clean peak memory) and
is appended to the JSON as it finishes, so a killed benchmark resumes.

    python tools/benchmark_scale.py [--models nus-pillar synthetic-pillar ...] [--frames 1 4 8 16 32]
                                    [--recipe configs/quant/ptq/lidar_ptq_w8a8_cpu.json] [--export]
                                    [--out benchmarks/scale.json] [--fresh | --again]

Writes ``benchmarks/scale.json`` ({"meta", "rows": [{"model", "frames", "stage", "seconds", "forwards",
"peak_rss_mb"}, ...]}, one row per stage and one ``total``), ``benchmarks/scale.md`` (tables, linearity
from 8 to 32 frames, the 256-frame projection, the cost goals) and ``benchmarks/scale.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "nuscenes_demo"
MODEL_CONFIGS = {"nus-pillar": ROOT / "configs/nuscenes/centerpoint_pillar02_nus_lidar_ptq.py",
          "nus-voxel": ROOT / "configs/nuscenes/centerpoint_voxel01_nus_lidar_ptq.py",
          "synthetic-pillar": ROOT / "configs/synthetic/centerpoint_pillar_synthetic.py",
          "synthetic-voxel": ROOT / "configs/synthetic/centerpoint_voxel_synthetic.py"}
CHECKPOINTS = {"synthetic-pillar": ROOT / "benchmarks/models/centerpoint_pillar_synthetic.pth",
               "synthetic-voxel": ROOT / "benchmarks/models/centerpoint_voxel_synthetic.pth"}
STAGES = ["frame loading", "calibration", "float outputs", "range search", "bias correction", "reconstruction",
          "guard", "freezing", "export"]
# Cost goals: total minutes at 32 calibration frames on a 2-core machine, and the memory bound.
TARGET_MINUTES = {"nus-pillar": 30, "nus-voxel": 60}
TARGET_PEAK_MB = 8192
LINEAR_SLACK = 1.25


# ----- one run (in its own process) -------------------------------------------------------------------
def load_points(model: str, frames: int, seed: int) -> tuple[list[Any], str]:
    """``frames`` point clouds [N, 5] (x, y, z, intensity, time lag) and where they came from."""
    import numpy as np
    import torch

    from lidar_ptq.sim.dataset import make_frame

    rng = np.random.default_rng(seed)
    real = DEMO / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
    clouds = []
    if model.startswith("nus") and real.is_file():
        sweep = np.fromfile(real, dtype=np.float32).reshape(-1, 5).copy()
        sweep[:, 4] = 0.0  # one key-frame sweep: time lag 0 (the 5th column of the file is the ring)
        for _ in range(frames):
            yaw = rng.uniform(-np.pi, np.pi)
            rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]], dtype=np.float32)
            cloud = sweep.copy()
            cloud[:, :2] = cloud[:, :2] @ rot.T
            clouds.append(torch.from_numpy(cloud))
        return clouds, "real nuScenes sweep (../shared/data), a seeded yaw per frame"
    for index in range(frames):
        points, _ = make_frame(seed, "calib", index)
        points = points.astype(np.float32).copy()
        points[:, 4] = 0.0
        clouds.append(torch.from_numpy(points))
    return clouds, "synthetic frames (lidar_ptq.sim, 32-beam nuScenes-like sensor)"


def point_dims(cfg: Any) -> list[int]:
    """The point columns the config's test pipeline keeps (``use_dim`` of LoadPointsFromFile)."""
    pipeline = cfg.get("test_dataloader", {}).get("dataset", {}).get("pipeline") or cfg.get("test_pipeline") or []
    for step in pipeline:
        if step.get("type") == "LoadPointsFromFile":
            use = step.get("use_dim", step.get("load_dim", 5))
            return list(range(use)) if isinstance(use, int) else list(use)
    return list(range(5))


def run_one(model_name: str, frames: int, recipe_path: str, options: dict[str, Any], seed: int, export: bool
            ) -> dict[str, Any]:
    import torch
    from mmdet3d.registry import MODELS
    from mmdet3d.structures import Box3DMode, Det3DDataSample, LiDARInstance3DBoxes
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import lidar_ptq.mmdet3d  # noqa: F401  (registries)
    from lidar_ptq.lidar.recipes import resolve_recipe
    from lidar_ptq.lidar.stage_log import StageLog
    from lidar_ptq.mmdet3d.adapter import DetectorAdapter, DetectorBatch, move_to
    from lidar_ptq.mmdet3d.export import export_detector
    from lidar_ptq.mmdet3d.ptq import load_float_checkpoint, quantize_detector

    load_before = os.getloadavg()[0]  # before this run's own work raises it
    init_default_scope("mmdet3d")
    cfg = Config.fromfile(str(MODEL_CONFIGS[model_name]))
    torch.manual_seed(seed)
    detector = MODELS.build(cfg.model)
    if model_name in CHECKPOINTS:
        load_float_checkpoint(detector, CHECKPOINTS[model_name])
    else:
        detector.init_weights()  # seeded random weights: cost does not depend on their values
    detector.eval()
    log = StageLog()
    with log.stage("frame loading"):
        clouds, source = load_points(model_name, frames, seed)
        dims = point_dims(cfg)
        clouds = [cloud[:, dims] for cloud in clouds]
        batches = []
        for index, cloud in enumerate(clouds):
            sample = Det3DDataSample(metainfo={"box_type_3d": LiDARInstance3DBoxes, "box_mode_3d": Box3DMode.LIDAR,
                                               "lidar_path": f"frame_{index}"})
            with torch.no_grad():
                out = detector.data_preprocessor({"inputs": {"points": [cloud]}, "data_samples": [sample]}, False)
            batches.append(DetectorBatch(move_to(out["inputs"], "cpu"), out["data_samples"]))
    recipe = resolve_recipe(recipe_path, calib_frames=frames, options=options)
    start = time.perf_counter()
    result = quantize_detector(detector, batches, recipe, stages=log)
    ptq_seconds = time.perf_counter() - start
    if export:
        head = DetectorAdapter(detector).head
        log.watch(head)  # one head call per full forward of the exported networks' verification
        with log.stage("export"), tempfile.TemporaryDirectory() as folder:
            export_detector(detector, batches[0], folder)
        log.close()
    layers = sum(1 for m in detector.modules() if hasattr(m, "weight_quantizer"))
    return {"rows": [{"model": model_name, "frames": frames, **row} for row in log.rows()],
            "run": {"model": model_name, "frames": frames, "quantized_layers": layers, "frame_source": source,
                    "ptq_seconds": round(ptq_seconds, 1), "range_rule": min(result.report.selection,
                                                                            key=result.report.selection.get)
                    if result.report.selection else None,
                    "load_before": load_before, "recipe_options": options,
                    "machine": describe_machine(load=False)["machine"]}}


# ----- the driver ---------------------------------------------------------------------------------------
def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * frames``."""
    n = len(points)
    if n == 1:
        return 0.0, points[0][1] / max(points[0][0], 1)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else 0.0
    return my - b * mx, b


def stage_seconds(rows: list[dict[str, Any]], model: str, stage: str) -> dict[int, float]:
    return {r["frames"]: r["seconds"] for r in rows if r["model"] == model and r["stage"] == stage}


def linearity(rows: list[dict[str, Any]], model: str, stage: str) -> float | None:
    """t(32) / (4 t(8)): 1 is linear in frames, 1.25 the allowed slack (None: not both measured, or too
    short to tell)."""
    seconds = stage_seconds(rows, model, stage)
    if 8 not in seconds or 32 not in seconds or seconds[8] < 1.0:
        return None
    return seconds[32] / (4 * seconds[8])


def projection(rows: list[dict[str, Any]], model: str, stage: str, frames: int = 256) -> float | None:
    """Seconds at ``frames`` from the linear fit over the measured frame counts (4 and up). A stage bounded
    by a frame cap (the range search's ``search_frames``, reconstruction's ``recon_frames``) costs about
    the same at any count past the cap, where a fit through noisy equal times can slope down: no stage is
    projected below its time at the largest count measured. The total is the sum of its stages."""
    if stage == "total":
        parts = [projection(rows, model, s, frames) for s in STAGES]
        return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    points = sorted((f, s) for f, s in stage_seconds(rows, model, stage).items() if f >= 4)
    if len(points) < 2:
        return None
    a, b = linear_fit(points)
    return max(a + b * frames, points[-1][1])


def machines(result: dict[str, Any]) -> list[str]:
    """The machines the runs in the file ran on (a resumed file may hold runs from more than one)."""
    return sorted({run.get("machine", result["meta"]["machine"]) for run in result["runs"]})


def render(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    models = [m for m in MODEL_CONFIGS if any(r["model"] == m for r in rows)]
    lines = ["# LiDAR-PTQ cost at full size", "",
             f"Recipe `{meta['recipe']}` (LiDAR-PTQ W8A8, CPU reconstruction budget), seed {meta['seed']}; "
             "recipe overrides, if any, are given per model. "
             f"Machine: {'; '.join(machines(result))}. Stock nuScenes models carry seeded random weights "
             "(cost does not depend on the weights' values); frames: "
             + "; ".join(sorted({r['frame_source'] for r in result['runs']})) + ".", "",
             "Forwards are calls of the whole detector (a pass a hook stops early counts as one). Peak memory is "
             "the process's resident high-water mark during the stage.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"]), ""]
    for model in models:
        frames = sorted({r["frames"] for r in rows if r["model"] == model})
        runs = {r["frames"]: r for r in result["runs"] if r["model"] == model}
        stages = [s for s in [*STAGES, "total"] if any(r["model"] == model and r["stage"] == s for r in rows)]
        layers = next(iter(runs.values()))["quantized_layers"]
        lines += [f"## {model} ({layers} quantized layers)", "",
                  "| stage | " + " | ".join(f"{f} frames: s / forwards / MB" for f in frames)
                  + " | t(32)/4t(8) | 256 frames (projected s) |",
                  "|---|" + "---|" * (len(frames) + 2)]
        for stage in stages:
            cells = []
            for f in frames:
                row = next((r for r in rows if r["model"] == model and r["frames"] == f and r["stage"] == stage), None)
                cells.append(f"{row['seconds']:.1f} / {row['forwards']} / {row['peak_rss_mb']:.0f}" if row else "-")
            ratio, projected = linearity(rows, model, stage), projection(rows, model, stage)
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{'-' if projected is None else f'{projected:.0f}'} |")
        overrides = {json.dumps(r.get("recipe_options", meta.get("recipe_options", {})), sort_keys=True)
                      for r in runs.values()}
        lines += ["", "Recipe overrides: " + ", ".join(sorted(o if o != "{}" else "none (the recipe file as shipped)"
                                                         for o in overrides)) + ".", ""]
        lines += ["Load average (1 min) before each run: "
                  + ", ".join(f"{f} frames {runs[f]['load_before']:.1f}" for f in frames if f in runs), ""]
        lines += verdicts(rows, model)
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict[str, Any]], model: str) -> list[str]:
    """The stock models' cost goals, met or missed by how much and where."""
    if model not in TARGET_MINUTES:
        return []
    total = {r["frames"]: r for r in rows if r["model"] == model and r["stage"] == "total"}
    out = [f"Cost goals (total at 32 frames, peak memory {TARGET_PEAK_MB // 1024} GB, every stage within "
           f"{LINEAR_SLACK}x of linear in frames):"]
    if 32 in total:
        minutes = total[32]["seconds"] / 60
        stages = [r for r in rows if r["model"] == model and r["frames"] == 32 and r["stage"] != "total"]
        worst = max(stages, key=lambda r: r["seconds"])
        verdict = "met" if minutes <= TARGET_MINUTES[model] else f"missed by {minutes - TARGET_MINUTES[model]:.1f} min"
        out.append(f"- total at 32 frames {minutes:.1f} min against {TARGET_MINUTES[model]} min: {verdict} "
                   f"(largest stage: {worst['stage']}, {worst['seconds'] / 60:.1f} min)")
        peak = total[32]["peak_rss_mb"]
        out.append(f"- peak memory at 32 frames {peak / 1024:.2f} GB against {TARGET_PEAK_MB / 1024:.0f} GB: "
                   + ("met" if peak <= TARGET_PEAK_MB else f"missed by {(peak - TARGET_PEAK_MB) / 1024:.2f} GB"))
    else:
        out.append("- 32 frames not measured")
    ratios = {s: linearity(rows, model, s) for s in STAGES}
    over = {s: r for s, r in ratios.items() if r is not None and r > LINEAR_SLACK}
    measured = [s for s, r in ratios.items() if r is not None]
    if measured:
        out.append("- every stage within 1.25x of linear from 8 to 32 frames: "
                   + ("met" if not over else "missed by " + ", ".join(f"{s} ({r:.2f}x)" for s, r in over.items())))
    projected = projection(rows, model, "total")
    if projected is not None:
        out.append(f"- 256 frames (the paper's setting), projected stage by stage: {projected / 60:.0f} min")
    return [*out, ""]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models = [m for m in MODEL_CONFIGS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for stage in [*STAGES, "total"]:
            seconds = sorted(stage_seconds(rows, model, stage).items())
            if seconds and max(s for _, s in seconds) >= 1.0:
                ax.plot([f for f, _ in seconds], [s for _, s in seconds], marker="o", label=stage,
                        linewidth=2.5 if stage == "total" else 1.2)
        ax.set_title(model)
        ax.set_xlabel("calibration frames")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--frames", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--recipe", default="configs/quant/ptq/lidar_ptq_w8a8_cpu.json")
    parser.add_argument("--recipe-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted recipe overrides, JSON values (e.g. recon.iterations=8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", action="store_true", help="also export (ONNX, verified) after quantizing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/scale.json"))
    parser.add_argument("--fresh", action="store_true", help="start a new JSON instead of resuming")
    parser.add_argument("--again", action="store_true", help="measure the given models and frames again, "
                        "replacing their rows (other rows are kept)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--one-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.recipe_options)}
    if args.one:
        data = run_one(args.one[0], int(args.one[1]), args.recipe, options, args.seed, args.export)
        Path(args.one_out).write_text(json.dumps(data))
        return
    out = Path(args.out)
    command = "python tools/benchmark_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"recipe": args.recipe, "recipe_options": options, "seed": args.seed, "export": args.export,
            "commands": [command.strip()],
            "machine": describe_machine(load=False)["machine"]}
    result = {"meta": meta, "rows": [], "runs": []}
    if out.is_file() and not args.fresh:
        result = json.loads(out.read_text())
    for model in args.models:
        for frames in args.frames:
            if not args.again and any(r["model"] == model and r["frames"] == frames for r in result["runs"]):
                print(f"[scale] {model} x {frames}: already measured, skipped")
                continue
            print(f"[scale] {model} x {frames} frames ...", flush=True)
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, __file__, "--one", model, str(frames), "--one-out", tmp.name,
                       "--recipe", args.recipe, "--seed", str(args.seed), *(["--export"] if args.export else []),
                       "--recipe-options", *args.recipe_options]
                done = subprocess.run(cmd, cwd=ROOT)
                if done.returncode != 0:
                    print(f"[scale] {model} x {frames}: failed (exit {done.returncode}); see the output above")
                    continue
                data = json.loads(Path(tmp.name).read_text())
            result["rows"] = [r for r in result["rows"] if not (r["model"] == model and r["frames"] == frames)]
            result["rows"] += data["rows"]
            result["runs"] = [r for r in result["runs"] if not (r["model"] == model and r["frames"] == frames)]
            result["runs"].append({**data["run"], "command": command.strip()})
            result["meta"]["commands"] = list(dict.fromkeys(r["command"] for r in result["runs"] if "command" in r))
            total = next(r for r in data["rows"] if r["stage"] == "total")
            print(f"[scale] {model} x {frames}: {total['seconds']:.1f} s, {total['forwards']} forwards, "
                  f"peak {total['peak_rss_mb']:.0f} MB", flush=True)
            out.write_text(json.dumps(result, indent=1))
            out.with_suffix(".md").write_text(render(result))
    if result["rows"]:
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(render(result))
        plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
