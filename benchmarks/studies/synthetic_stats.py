"""Sparsity of the synthetic LiDAR frames next to the real nuScenes sweep in ../shared/data.

Points per frame and the fraction of non-empty pillars on nuScenes CenterPoint-Pillar's grid
(0.2 m over +-51.2 m, 512x512) and on the synthetic pillar config's grid (0.32 m over +-38.4 m).
Writes benchmarks/synthetic_data.{json,md}.

    python benchmarks/studies/synthetic_stats.py [--frames 50]
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from lidar_ptq.sim.dataset import DatasetSpec, generate

ROOT = Path(__file__).resolve().parents[2]
NUSCENES = ROOT.parent / "shared" / "data" / "nuscenes_demo"
GRIDS = {"nuscenes_pillar_0.2m_51.2m": (0.2, 51.2), "synthetic_pillar_0.32m_38.4m": (0.32, 38.4)}


def occupancy(points: np.ndarray, cell: float, extent: float) -> float:
    xy = points[:, :2]
    inside = np.all(np.abs(xy) < extent, axis=1) & (points[:, 2] > -5.0) & (points[:, 2] < 3.0)
    ij = np.floor((xy[inside] + extent) / cell).astype(np.int64)
    size = int(round(2 * extent / cell))
    return len(np.unique(ij[:, 0] * size + ij[:, 1])) / size**2


def stats(clouds: list[np.ndarray]) -> dict[str, float]:
    out = {"frames": len(clouds), "points_per_frame": float(np.mean([len(c) for c in clouds]))}
    for name, (cell, extent) in GRIDS.items():
        out[f"nonempty_{name}"] = float(np.mean([occupancy(c, cell, extent) for c in clouds]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT / "data" / "synthetic_lidar"))
    parser.add_argument("--frames", type=int, default=50)
    args = parser.parse_args()
    info_path = generate(DatasetSpec(args.root, {"train": 2000, "val": 200}), progress=False)["val"]
    infos = pickle.loads(Path(info_path).read_bytes())["data_list"][: args.frames]
    clouds = [np.fromfile(Path(args.root) / "points" / i["lidar_points"]["lidar_path"], dtype=np.float32)
              .reshape(-1, 5) for i in infos]
    boxes = [len(i["instances"]) for i in infos]
    rows = {"synthetic (val)": {**stats(clouds), "annotated_boxes_per_frame": float(np.mean(boxes))}}
    sweep = NUSCENES / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
    if sweep.is_file():
        nus = pickle.loads((NUSCENES / "nuscenes_demo_infos.pkl").read_bytes())["data_list"][0]
        rows["nuScenes (real sweep)"] = {**stats([np.fromfile(sweep, dtype=np.float32).reshape(-1, 5)]),
                                         "annotated_boxes_per_frame": float(len(nus["instances"]))}
    (ROOT / "benchmarks" / "synthetic_data.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# Synthetic LiDAR frames vs a real nuScenes sweep", "",
             "| data | frames | points/frame | non-empty pillars, 0.2 m / 51.2 m | non-empty pillars, 0.32 m / "
             "38.4 m | boxes/frame |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['frames']} | {r['points_per_frame']:.0f} | "
                     f"{100 * r['nonempty_nuscenes_pillar_0.2m_51.2m']:.2f}% | "
                     f"{100 * r['nonempty_synthetic_pillar_0.32m_38.4m']:.2f}% | "
                     f"{r['annotated_boxes_per_frame']:.1f} |")
    (ROOT / "benchmarks" / "synthetic_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
