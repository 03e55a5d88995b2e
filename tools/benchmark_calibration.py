"""Benchmark: calibration methods on the built-in sparse-BEV demo network.

Writes ``benchmarks/calibration_demo.json`` ({"meta", "rows"}) and a markdown
table next to it. Usage: ``python tools/benchmark_calibration.py [--out-dir benchmarks]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import describe_machine

from lidar_ptq.demo import format_rows, parse_wa, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=parse_wa, nargs="+", default=[(8, 8), (4, 8), (4, 4)])
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    start = time.perf_counter()
    rows, meta = [], {}
    for w, a in args.settings:
        result = run_demo(w, a, args.calib_batches, args.seed)
        rows += [{"model": result["meta"]["model"], **row, "metric": "output_sqnr_db"} for row in result["rows"]]
        meta = result["meta"]
    meta.update({**describe_machine(load=False),
                 "total_seconds": round(time.perf_counter() - start, 1),
                 "command": "python tools/benchmark_calibration.py"})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "calibration_demo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = [f"# Calibration methods on the demo network ({meta['model']})", "",
          f"Sparse synthetic BEV maps, {100 * meta['bev_occupancy']:.1f}% non-empty cells, "
          f"{meta['calib_batches']} calibration batches, seed {meta['seed']}. Output SQNR against the float "
          "network (higher is better). Produced by `python tools/benchmark_calibration.py`.", "",
          format_rows(rows), ""]
    (args.out_dir / "calibration_demo.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
