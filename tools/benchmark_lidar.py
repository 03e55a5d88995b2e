"""LiDAR benchmark: FP32 vs PTQ methods on the synthetic CenterPoint-Pillar/Voxel (nuScenes-style mAP).

Rows (W8A8): maxmin, entropy, percentile, percentile+equalize(+bias_correction), brecq, qdrop, lidar_ptq and
the LiDAR-PTQ ablation (ablation:maxmin = sparse max-min ranges, +equalize = input-channel equalization of the
pillar encoder, +bias_correction = empirical bias correction (both not in the paper), +grid = task-guided
search of the clipping range,
+tgpl = TGPL-driven activation steps, +rounding = adaptive rounding, i.e. full LiDAR-PTQ;
ablation:dense = full LiDAR-PTQ with ranges over every site instead of the non-empty ones,
ablation:judge-heldout = full LiDAR-PTQ whose guard judges on calibration frames held out of bias
correction and reconstruction);
W4A8: maxmin, qdrop, lidar_ptq; W8A4 (a stress test beyond the paper's settings, where even the robust
voxel model separates the methods): maxmin, percentile, lidar_ptq. Every method sees the same
calibration frames and the same reconstruction budget. Rows are appended to benchmarks/lidar.json as
they finish (a killed run resumes); benchmarks/lidar.md and the PNG plots are rewritten from it.

    python tools/benchmark_lidar.py [--models pillar voxel] [--val-frames 200] [--calib-frames 32]
                                    [--iterations 100] [--output-loss-every 4] [--fresh]
                                    [--rows METHOD ...] [--bits w8a4 ...]   (only these rows; both
                                    named: every pair, also ones the table leaves out)
    python tools/benchmark_lidar.py --merge pillar.json voxel.json   (jobs run in parallel with --out)
    python tools/benchmark_lidar.py --seeds 0 1 2 --out benchmarks/lidar_seeds.json   (each row once per
                                    seed: other calibration frames and reconstruction order; the report
                                    gives every seed's mAP and their mean +- std, i.e. the noise floor)
Models come from tools/train.py (benchmarks/models/centerpoint_<model>_synthetic.pth).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.lidar.pipeline import LidarPTQConfig
from lidar_ptq.lidar.recipes import recipe_from_dict
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate
from lidar_ptq.mmdet3d.ptq import load_float_checkpoint, quantize_detector
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"pillar": ROOT / "configs/synthetic/centerpoint_pillar_synthetic.py",
           "voxel": ROOT / "configs/synthetic/centerpoint_voxel_synthetic.py"}
ABLATION = {"ablation:maxmin": dict(equalize_inputs=False, bias_correction=False, grid_search=False, tgpl=False,
                                   adaptive_rounding=False),
            "ablation:+equalize": dict(bias_correction=False, grid_search=False, tgpl=False, adaptive_rounding=False),
            "ablation:+bias_correction": dict(grid_search=False, tgpl=False, adaptive_rounding=False),
            "ablation:+grid": dict(tgpl=False, adaptive_rounding=False),
            "ablation:+tgpl": dict(adaptive_rounding=False),
            "ablation:+rounding": dict(adaptive_rounding=True),  # LiDAR-PTQ's default
            "ablation:dense": dict(sparse_calibration=False),  # LiDAR-PTQ with ranges over every site, empty too
            # LiDAR-PTQ whose guard judges bias correction and reconstruction on a quarter of the
            # calibration frames held out of both instead of on every calibration frame
            "ablation:judge-heldout": dict(judge_fraction=0.25)}
EQUALIZE = ["*voxel_encoder*"]  # "<method>+equalize": a baseline with LiDAR-PTQ's input equalization
ROWS = [(m, 8, 8) for m in ("maxmin", "entropy", "percentile", "percentile+equalize",
                            "percentile+equalize+bias_correction", "brecq", "qdrop", "lidar_ptq", *ABLATION)] + \
       [(m, 4, 8) for m in ("maxmin", "qdrop", "lidar_ptq")] + \
       [(m, 8, 4) for m in ("maxmin", "percentile", "lidar_ptq")]


def selected_rows(methods: list[str] | None, bits: list[str] | None) -> list[tuple[str, int, int]]:
    """The table's rows filtered by ``--rows``/``--bits``; naming both runs every pair asked for, also
    pairs the table leaves out (e.g. an ablation row at W4A8)."""
    rows = [r for r in ROWS if (not methods or r[0] in methods) and (not bits or f"w{r[1]}a{r[2]}" in bits)]
    if methods and bits:
        for method in methods:
            for b in bits:
                w, a = (int(v) for v in b.lower().removeprefix("w").split("a"))
                if (method, w, a) not in rows:
                    rows.append((method, w, a))
    return rows


def same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two row recipes quantize the same way (LiDAR-PTQ stage flags resolved to their defaults)."""
    if not a or not b or a.get("method") != b.get("method"):
        return False
    if a["method"] != "lidar_ptq":
        return a == b
    flags = ("equalize_inputs", "bias_correction", "grid_search", "tgpl")

    def resolved(spec: dict[str, Any]) -> dict[str, Any]:
        cfg = LidarPTQConfig(w_bits=spec["w_bits"], a_bits=spec["a_bits"],
                             **{f: spec[f] for f in (*flags, "adaptive_rounding") if f in spec})
        return {**spec, **{f: getattr(cfg, f) for f in flags}, "adaptive_rounding": cfg.adaptive_rounding}
    return resolved(a) == resolved(b)


def recipe_spec(method: str, w: int, a: int, args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    recon = {"iterations": args.iterations, "batch_size": 4, "seed": args.seed if seed is None else seed}
    if method in ("lidar_ptq", *ABLATION):
        spec = {"method": "lidar_ptq", "w_bits": w, "a_bits": a, **ABLATION.get(method, {})}
        recon["output_loss_every"] = args.output_loss_every
    else:
        base = method.split("+")[0]
        spec = {"method": base, "w_bits": w, "a_bits": a}
        if base == "percentile":
            spec["observer_kwargs"] = {"percentile": 99.99}
        if "+equalize" in method:
            spec["equalize"] = EQUALIZE
        if "+bias_correction" in method:
            spec["bias_correction"] = True
    if method in ("brecq", "qdrop") or spec["method"] == "lidar_ptq":
        spec["recon"] = recon
    spec["calib_frames"] = args.calib_frames
    return spec


def row_key(row: dict[str, Any], default_seed: int) -> tuple[str, str, int, int, int]:
    """What identifies a run: model, method, bits and seed (rows written before seeds were recorded ran
    with the file's ``meta.seed``)."""
    return row["model"], row["method"], row["w_bits"], row["a_bits"], row.get("seed", default_seed)


def merge_results(result: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """``result`` with the rows of ``files`` in place of the rows they rerun (same model, method, bits, seed).

    Files must share the settings (frames, iterations, ...); the seed may differ, since every merged row is
    stamped with the seed it ran with. FP32 does not depend on the seed: a model's first FP32 row stays."""
    key = lambda r: row_key(r, result["meta"].get("seed", 0))  # noqa: E731
    settings = [k for k in result["meta"] if k not in ("machine", "note", "seed", "seeds")]
    for path in files:
        other = json.loads(path.read_text())
        differ = [k for k in settings if other["meta"].get(k) != result["meta"][k]]
        if differ:
            raise ValueError(f"{path} ran with other settings ({', '.join(differ)}); rerun it with the same "
                             "--val-frames/--calib-frames/--iterations/--output-loss-every")
        index = {key(r): i for i, r in enumerate(result["rows"])}
        fp32_models = {r["model"] for r in result["rows"] if r["method"] == "fp32"}
        for row in other["rows"]:
            if row["method"] == "fp32":
                if row["model"] in fp32_models:
                    continue
                fp32_models.add(row["model"])
            else:
                row = {**row, "seed": row.get("seed", other["meta"].get("seed", 0))}
            if key(row) in index:
                result["rows"][index[key(row)]] = row
            else:
                result["rows"].append(row)
    return result


def build_model(cfg: Config, checkpoint: Path) -> torch.nn.Module:
    from mmdet3d.registry import MODELS
    model = MODELS.build(cfg.model)
    load_float_checkpoint(model, checkpoint)
    return model.eval()


def ordered_rows(result: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """A model's rows in the table's order (fp32, W8A8 methods, ablation, W4A8), whatever order they ran in."""
    order = [("fp32", 32, 32), *ROWS]

    def rank(row: dict[str, Any]) -> int:
        key = (row["method"], row["w_bits"], row["a_bits"])
        return order.index(key) if key in order else len(order)
    return sorted((r for r in result["rows"] if r["model"] == model), key=rank)


def seed_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows of one model grouped by method and bits, one entry per seed, groups in the order given."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["w_bits"], row["a_bits"]), []).append(row)
    return list(groups.values())


def spread(group: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one run) of a group's mAP."""
    values = [r["value"] for r in group]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_table(rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """Markdown rows: each seed's mAP, their mean +- std and the mean's distance to FP32."""
    lines = ["| method | W/A | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std (runs) "
             "| mean delta vs FP32 | PTQ s (mean) |", "|---|---|" + "---|" * (len(seeds) + 3)]
    for group in seed_groups(rows):
        by_seed = {r.get("seed", seeds[0]): r["value"] for r in group}
        mean, std = spread(group)
        first = group[0]
        lines.append(f"| {first['method']} | {first['w_bits']}/{first['a_bits']} | "
                     + " | ".join(f"{100 * by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds)
                     + f" | {100 * mean:.2f} +- {100 * std:.2f} ({len(group)}) | {100 * (mean - first['fp32']):+.2f} "
                     f"| {statistics.fmean(r['seconds'] for r in group):.0f} |")
    return lines


def guard_cell(guard: dict[str, Any] | None) -> str:
    """A guarded LiDAR-PTQ stage's verdict: task loss before/after it and kept or undone ("-": not run)."""
    guard = guard or {}
    if "before" not in guard:
        return "-"
    return f"{guard['before']:.3f} -> {guard['after']:.3f}, {'kept' if guard['kept'] else 'undone'}"


def range_rule_cell(scores: dict[str, float] | None) -> str:
    """The clipping rule LiDAR-PTQ's range search picked (lowest score) and its score ("-": no search)."""
    if not scores:
        return "-"
    best = min(scores, key=scores.get)
    return f"{best} ({scores[best]:.3f})"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    lines = ["# LiDAR benchmark (synthetic CenterPoint, nuScenes-style mAP x100)", "",
             f"{result['meta']['note']}", ""]
    for model in sorted({r["model"] for r in result["rows"]}):
        rows = ordered_rows(result, model)
        info = ROOT / "benchmarks" / "models" / f"{model}.json"
        train_s = json.loads(info.read_text()).get("train_wall_s") if info.is_file() else None
        lines += [f"## {model}", ""]
        if result["meta"].get("seeds"):
            lines += seed_table(rows, result["meta"]["seeds"]) + [""]
            continue
        if train_s:
            lines += [f"Float training took {train_s / 60:.0f} min on this CPU (`{info.name}`); the "
                      "'PTQ / training' column is PTQ wall time as a fraction of it.", ""]
        lines += ["| method | W/A | mAP | delta vs FP32 | car | pedestrian | bicycle | PTQ s | PTQ / training "
                  "| range rule (TGPL) | bias correction: TGPL before -> after "
                  "| reconstruction: TGPL before -> after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ap = r.get("per_class", {})
            lines.append(f"| {r['method']} | {r['w_bits']}/{r['a_bits']} | {100 * r['value']:.2f} | "
                         f"{100 * (r['value'] - r['fp32']):+.2f} | "
                         + " | ".join(f"{100 * ap.get(c, float('nan')):.2f}" for c in ("car", "pedestrian", "bicycle"))
                         + f" | {r['seconds']:.0f} | "
                         + (f"{r['seconds'] / train_s:.3f} |" if train_s and r["method"] != "fp32" else "- |")
                         + f" {range_rule_cell(r.get('range_search'))} | {guard_cell(r.get('bias_correction'))} | "
                         f"{guard_cell(r.get('reconstruction'))} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(result, out.with_suffix(""))


def plot(result: dict[str, Any], prefix: Path) -> None:
    """One bar chart per model, saved as ``<prefix>_<model>.png`` (next to the JSON it comes from)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for model in sorted({r["model"] for r in result["rows"]}):
        groups = seed_groups(ordered_rows(result, model))
        stats = [spread(g) for g in groups]
        fig, ax = plt.subplots(figsize=(10, 4))
        labels = [f"{g[0]['method']}\nW{g[0]['w_bits']}A{g[0]['a_bits']}" for g in groups]
        ax.bar(range(len(groups)), [100 * m for m, _ in stats], yerr=[100 * sd for _, sd in stats],
               color="tab:blue", capsize=3)
        ax.axhline(100 * groups[0][0]["fp32"], color="k", ls="--", label="FP32")
        ax.set_xticks(range(len(groups)), labels, rotation=60, fontsize=7)
        ax.set_ylabel("mAP")
        ax.set_title(f"synthetic CenterPoint-{model}: PTQ methods")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{prefix}_{model}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pillar", "voxel"], choices=list(CONFIGS))
    parser.add_argument("--val-frames", type=int, default=200)
    parser.add_argument("--calib-frames", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100, help="reconstruction iterations per unit")
    parser.add_argument("--output-loss-every", type=int, default=4, help="TGPL (full model) step every k")
    parser.add_argument("--rows", nargs="*", help="only these methods (e.g. lidar_ptq maxmin)")
    parser.add_argument("--bits", nargs="*", help="only these precisions (e.g. w8a4 w4a8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="run every row once per seed (calibration frames, reconstruction order); "
                             "the report gives each seed's mAP and mean +- std")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "lidar.json")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown/plots from the JSON")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="put the rows of these result files (e.g. jobs run in parallel with --out) into --out, "
                             "replacing rows of the same model/method/bits, and rewrite the report")
    args = parser.parse_args()
    if args.report_only:
        write_outputs(json.loads(args.out.read_text()), args.out)
        return 0
    if args.merge:
        write_outputs(merge_results(json.loads(args.out.read_text()), args.merge), args.out)
        return 0
    logging.basicConfig(level=logging.WARNING)
    init_default_scope("mmdet3d")
    meta = {"val_frames": args.val_frames, "calib_frames": args.calib_frames, "iterations": args.iterations,
            "output_loss_every": args.output_loss_every, "seed": (args.seeds or [args.seed])[0],
            "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "note": (f"Synthetic LiDAR val set, first {args.val_frames} frames; {args.calib_frames} calibration "
                     f"frames from the training set; reconstruction {args.iterations} iterations per unit "
                     f"(TGPL step every {args.output_loss_every}). mAP: nuScenes-style, centre distance "
                     "0.5/1/2/4 m, nuscenes-devkit matching.")}
    if args.seeds:
        meta["seeds"] = args.seeds
        meta["note"] += f" Every row once per seed ({', '.join(map(str, args.seeds))}): its calibration frames and " \
                        "reconstruction order."
    result = {"meta": meta, "rows": []}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        same = [k for k in meta if k not in ("machine", "note")]
        if all(previous["meta"].get(k) == meta[k] for k in same):
            result = previous
    default_seed = meta["seed"]
    done = {row_key(r, default_seed) for r in result["rows"]}
    for name in args.models:
        cfg = Config.fromfile(str(CONFIGS[name]))
        ensure_synthetic_data(cfg)
        checkpoint = ROOT / "benchmarks" / "models" / f"centerpoint_{name}_synthetic.pth"
        loader = build_test_loader(cfg, args.val_frames)
        float_model = build_model(cfg, checkpoint)
        start = time.perf_counter()
        fp32 = evaluate(float_model, loader, cfg.test_evaluator)
        fp32_row = {"model": f"centerpoint_{name}_synthetic", "method": "fp32", "w_bits": 32, "a_bits": 32,
                    "metric": "mAP", "value": fp32["det/mAP"], "fp32": fp32["det/mAP"],
                    "seconds": time.perf_counter() - start}
        for seed in args.seeds or [args.seed]:
            batches = None  # collected on first use: a resumed run may have nothing left for this seed
            rows = ([("fp32", 32, 32)] if seed == default_seed else []) + selected_rows(args.rows, args.bits)
            for method, w, a in rows:
                key = (fp32_row["model"], method, w, a, seed)
                if key in done:
                    continue
                spec = recipe_spec(method, w, a, args, seed) if method != "fp32" else {}
                same = [r for r in result["rows"] if r["model"] == fp32_row["model"] and r["method"] != method
                        and (r["w_bits"], r["a_bits"]) == (w, a) and r.get("seed", default_seed) == seed
                        and same_recipe(r.get("recipe", {}), spec)]
                if method == "fp32":
                    row, metrics = fp32_row, fp32
                elif same:  # an ablation row whose recipe is LiDAR-PTQ's default (or the reverse): not run twice
                    row = {**same[0], "method": method, "same_as": same[0]["method"]}
                    metrics = {f"det/AP_{c}": v for c, v in same[0]["per_class"].items()}
                else:
                    if batches is None:
                        batches = collect_batches(float_model, build_calibration_loader(cfg, args.calib_frames, seed))
                    model = build_model(cfg, checkpoint)
                    outcome = quantize_detector(model, batches, recipe_from_dict(spec))
                    metrics = evaluate(model, loader, cfg.test_evaluator)
                    row = {"model": fp32_row["model"], "method": method, "w_bits": w, "a_bits": a, "seed": seed,
                           "metric": "mAP", "value": metrics["det/mAP"], "fp32": fp32["det/mAP"],
                           "seconds": outcome.seconds, "recipe": spec, "range_search": outcome.report.selection,
                           "judge_frames": outcome.report.judge_frames,
                           "bias_correction": {**outcome.report.bias_correction_loss,
                                               "kept": bool(outcome.report.bias_corrections)},
                           "reconstruction": {**outcome.report.recon_loss, "kept": outcome.report.recon_kept}}
                row["per_class"] = {c: metrics[f"det/AP_{c}"] for c in ("car", "pedestrian", "bicycle")}
                result["rows"].append(row)
                done.add(key)
                write_outputs(result, args.out)
                print(f"{row['model']} {method} W{w}A{a} seed {seed}: mAP {100 * row['value']:.2f} (fp32 "
                      f"{100 * row['fp32']:.2f}) in {row['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
