"""LiDAR benchmark: FP32 against PTQ methods on the synthetic CenterPoint-Pillar/Voxel (nuScenes-style mAP),
with intervals that say which differences are resolved.

Every row runs once per calibration draw (``--seeds``: other calibration frames and reconstruction order)
and is evaluated on the same val frames as FP32. The report gives each draw's mAP, their mean and std,
and the difference to FP32 with a 95% bootstrap interval that resamples the val frames (paired: both
models on the same resamples) and the calibration draws. The stage table compares neighbouring recipes
the same way: the paper's chain (sparse max-min -> +grid search of the clipping range -> +TGPL ->
+adaptive rounding = ``lidar_ptq_paper``) and this package's default without each of its own stages.

Rows (W8A8): maxmin, entropy, percentile, percentile+equalize, percentile+equalize+bias_correction, brecq,
qdrop, the paper's chain, lidar_ptq and the variants that measure its own stages; W4A8: maxmin, qdrop,
lidar_ptq_paper, lidar_ptq+tgpl+guards, lidar_ptq, lidar_ptq@64x200; W4A4: maxmin, qdrop, lidar_ptq.
Every method sees the same calibration frames and reconstruction budget, except a row named
``<method>@<frames>x<iterations>``, which measures what a larger budget buys. Rows are appended to the
JSON as they finish (a killed run resumes; a table run with other settings is refused, not
overwritten); the markdown and plots are rewritten from it. Per-frame matches (for the intervals) are
kept under ``benchmarks/frames/<json stem>/``.

    python tools/benchmark_lidar.py [--models pillar voxel] [--val-frames 1000] [--calib-frames 16]
                                    [--iterations 40] [--seeds 0 1 2] [--rows METHOD ...] [--bits w4a8 ...]
                                    [--out benchmarks/lidar.json] [--fresh | --again]
    python tools/benchmark_lidar.py --merge a.json b.json   (jobs run in parallel with --out)
    python tools/benchmark_lidar.py --report-only
Models come from tools/train.py (benchmarks/models/centerpoint_<model>_synthetic.pth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe_machine
from mmengine.config import Config
from mmengine.registry import init_default_scope

import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.lidar import LidarPTQConfig
from lidar_ptq.lidar.recipes import recipe_from_dict
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate_saving_matches
from lidar_ptq.mmdet3d.intervals import MatchTable, bootstrap_map_file
from lidar_ptq.mmdet3d.ptq import build_float_model, quantize_detector
from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data
from lidar_ptq.stats import BootstrapSamples, Interval, paired_interval, resample_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"pillar": ROOT / "configs/synthetic/centerpoint_pillar_synthetic.py",
           "voxel": ROOT / "configs/synthetic/centerpoint_voxel_synthetic.py"}
PAPER_RECIPE = ROOT / "configs/quant/ptq/lidar_ptq_paper.json"
# the paper's stages only: its recipe file without bits, frames and reconstruction budget
PAPER = {k: v for k, v in json.loads(PAPER_RECIPE.read_text()).items()
         if k not in ("method", "w_bits", "a_bits", "calib_frames", "recon")}
VARIANTS = {  # LiDAR-PTQ recipes as overrides of the package default
    "paper:maxmin": {**PAPER, "range_search": False, "tgpl": False, "adaptive_rounding": False},
    "paper:+grid": {**PAPER, "tgpl": False, "adaptive_rounding": False},
    "paper:+tgpl": {**PAPER, "adaptive_rounding": False},
    "lidar_ptq_paper": PAPER,
    "lidar_ptq": {},
    # the stages the default leaves out, measured by adding them back
    "lidar_ptq+guards": {"guards": True},
    "lidar_ptq+tgpl+guards": {"tgpl": True, "guards": True},
    "lidar_ptq+tgpl+bias_correction": {"tgpl": True, "bias_correction": True},
    "lidar_ptq+tgpl+guards+bias_correction": {"tgpl": True, "guards": True, "bias_correction": True},
    "lidar_ptq+tgpl+guards+bias_correction-equalize": {"tgpl": True, "guards": True, "bias_correction": True,
                                                       "equalize_inputs": False},
}
# a row named "<method>@<frames>x<iterations>" runs <method> with that calibration budget instead of the
# table's (--calib-frames, --iterations): what a larger budget buys, on the same val frames and draws
BUDGET_MARK = "@"
# (what is decided, recipe with it, recipe without it)
COMPARISONS = [("range search (paper's chain)", "paper:+grid", "paper:maxmin"),
               ("TGPL (paper's chain)", "paper:+tgpl", "paper:+grid"),
               ("adaptive rounding (paper's chain)", "lidar_ptq_paper", "paper:+tgpl"),
               ("package default against the paper's recipe", "lidar_ptq", "lidar_ptq_paper"),
               ("TGPL (added to the default + guards)", "lidar_ptq+tgpl+guards", "lidar_ptq+guards"),
               ("TGPL and guards (added to the default)", "lidar_ptq+tgpl+guards", "lidar_ptq"),
               ("equalization (in the default + TGPL, guards, bias correction)",
                "lidar_ptq+tgpl+guards+bias_correction", "lidar_ptq+tgpl+guards+bias_correction-equalize"),
               ("bias correction (added to the default + TGPL, guards)", "lidar_ptq+tgpl+guards+bias_correction",
                "lidar_ptq+tgpl+guards"),
               ("guards (added to the default + TGPL, bias correction)", "lidar_ptq+tgpl+guards+bias_correction",
                "lidar_ptq+tgpl+bias_correction"),
               ("input equalization (on percentile calibration)", "percentile+equalize", "percentile"),
               ("bias correction (on percentile + equalization)", "percentile+equalize+bias_correction",
                "percentile+equalize"),
               ("package default against the strongest baseline", "lidar_ptq",
                "percentile+equalize+bias_correction"),
               ("package default against QDrop", "lidar_ptq", "qdrop"),
               ("64 calibration frames x 200 iterations instead of 16 x 40", "lidar_ptq@64x200", "lidar_ptq")]
ROWS = [(m, 8, 8) for m in ("maxmin", "entropy", "percentile", "percentile+equalize",
                            "percentile+equalize+bias_correction", "brecq", "qdrop", *VARIANTS)] + \
       [(m, 4, 8) for m in ("maxmin", "qdrop", "lidar_ptq_paper", "lidar_ptq+tgpl+guards", "lidar_ptq",
                            "lidar_ptq@64x200")] + \
       [(m, 4, 4) for m in ("maxmin", "qdrop", "lidar_ptq")]
BOOTSTRAP_RESAMPLES = 1000
SETTINGS = ("val_frames", "calib_frames", "iterations", "output_loss_every")  # rows of one table share them
DEFAULT_OUT = ROOT / "benchmarks" / "lidar.json"
EARLIER = "rows_100_frames"  # rows measured on fewer val frames, without intervals, until a full row replaces them
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- lidar-results:begin -->", "<!-- lidar-results:end -->"
README_ROWS = {  # the README's results table: which rows, under which name
    ("paper:maxmin", 8, 8): "sparse max-min (the paper's first stage)",
    ("qdrop", 8, 8): "QDrop",
    ("lidar_ptq_paper", 8, 8): "the paper's recipe (`lidar_ptq_paper`: + range search, TGPL, AdaRound)",
    ("lidar_ptq", 8, 8): "**default LiDAR-PTQ** (sparse calibration, task-guided range search, input "
                            "equalization, AdaRound)",
    ("percentile+equalize+bias_correction", 8, 8): "percentile 99.99 + input equalization + bias correction "
                                                   "(`percentile_eq_bc_w8a8`, no reconstruction)",
    ("maxmin", 4, 8): "max-min", ("qdrop", 4, 8): "QDrop", ("lidar_ptq", 4, 8): "**default LiDAR-PTQ**",
    ("maxmin", 4, 4): "max-min", ("qdrop", 4, 4): "QDrop", ("lidar_ptq", 4, 4): "**default LiDAR-PTQ**",
}


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
    """Whether two row recipes quantize the same way (LiDAR-PTQ settings resolved to their defaults)."""
    if not a or not b or a.get("method") != b.get("method"):
        return False
    if a["method"] != "lidar_ptq":
        return a == b
    known = {f.name for f in dataclasses.fields(LidarPTQConfig)}

    def split(spec: dict[str, Any]) -> tuple[dict[str, Any], LidarPTQConfig]:
        return ({k: v for k, v in spec.items() if k not in known},
                LidarPTQConfig(**{k: v for k, v in spec.items() if k in known}))
    return split(a) == split(b)


def split_budget(method: str, args: argparse.Namespace) -> tuple[str, int, int]:
    """A row name's method and its calibration frames and iterations (the table's unless the name sets them)."""
    if BUDGET_MARK not in method:
        return method, args.calib_frames, args.iterations
    base, budget = method.split(BUDGET_MARK, 1)
    frames, _, iterations = budget.partition("x")
    if not (frames.isdigit() and iterations.isdigit()):
        raise ValueError(f"row {method!r}: write the budget as {base}{BUDGET_MARK}<frames>x<iterations>")
    return base, int(frames), int(iterations)


def recipe_spec(method: str, w: int, a: int, args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    method, calib_frames, iterations = split_budget(method, args)
    recon = {"iterations": iterations, "batch_size": 4, "seed": args.seed if seed is None else seed}
    if method in VARIANTS:
        spec = {"method": "lidar_ptq", "w_bits": w, "a_bits": a, **VARIANTS[method]}
        recon["output_loss_every"] = args.output_loss_every
    else:
        base = method.split("+")[0]
        spec = {"method": base, "w_bits": w, "a_bits": a}
        if base == "percentile":
            spec["observer_kwargs"] = {"percentile": 99.99}
        if "+equalize" in method:
            spec["equalize_inputs"] = True  # LiDAR-PTQ's input equalization
        if "+bias_correction" in method:
            spec["bias_correction"] = True
    if method in ("brecq", "qdrop") or spec["method"] == "lidar_ptq":
        spec["recon"] = recon
    spec["calib_frames"] = calib_frames
    return spec


def row_key(row: dict[str, Any], default_seed: int) -> tuple[str, str, int, int, int]:
    """What identifies a run: model, method, bits and seed (rows written before seeds were recorded ran
    with the file's ``meta.seed``)."""
    return row["model"], row["method"], row["w_bits"], row["a_bits"], row.get("seed", default_seed)


def put_row(rows: list[dict[str, Any]], row: dict[str, Any], default_seed: int) -> list[dict[str, Any]]:
    """``rows`` with ``row`` in place of the row of the same run, or appended (one row per run)."""
    key = row_key(row, default_seed)
    at = next((i for i, r in enumerate(rows) if row_key(r, default_seed) == key), len(rows))
    return [*rows[:at], row, *rows[at + 1:]]


def merge_results(result: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """``result`` with the rows of ``files`` in place of the rows they rerun (same model, method, bits, seed).

    Files must share the settings (frames, iterations, ...); the seed may differ, since every merged row is
    stamped with the seed it ran with. FP32 does not depend on the seed: a model's first FP32 row stays."""
    default_seed = result["meta"].get("seed", 0)
    for path in files:
        other = json.loads(path.read_text())
        differ = [k for k in SETTINGS if other["meta"].get(k) != result["meta"].get(k)]
        if differ:
            raise ValueError(f"{path} ran with other settings ({', '.join(differ)}); rerun it with the same "
                             "--val-frames/--calib-frames/--iterations/--output-loss-every")
        fp32_models = {r["model"] for r in result["rows"] if r["method"] == "fp32"}
        for row in other["rows"]:
            if row["method"] == "fp32":
                if row["model"] in fp32_models:
                    continue
                fp32_models.add(row["model"])
            else:
                row = {**row, "seed": row.get("seed", other["meta"].get("seed", 0))}
            result["rows"] = put_row(result["rows"], row, default_seed)
    return result


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


def frames_dir(out: Path) -> Path:
    """Where the per-frame matches of the rows in ``out`` live (not committed: they are rebuilt by a run)."""
    return out.parent / "frames" / out.stem


def table_path(out: Path, row: dict[str, Any]) -> Path:
    """The per-frame matches of one row (FP32 does not depend on the calibration draw)."""
    name = "fp32" if row["method"] == "fp32" else \
        f"{row['method'].replace(':', '_')}_w{row['w_bits']}a{row['a_bits']}_seed{row.get('seed', 0)}"
    return frames_dir(out) / row["model"] / f"{name}.npz"


def map_samples(path: Path, weights: np.ndarray) -> BootstrapSamples | None:
    """A row's mAP on the val frames and on every bootstrap resample (None if its matches are missing); the
    samples kept beside the matches are reused until the matches are rewritten."""
    return bootstrap_map_file(path, weights) if path.is_file() else None


def group_label(group: list[dict[str, Any]]) -> str:
    first = group[0]
    return f"{first['model']}|{first['method']}|W{first['w_bits']}A{first['a_bits']}"


def update_intervals(result: dict[str, Any], out: Path) -> None:
    """Intervals of every row group against FP32 and of every stage comparison, from the per-frame matches
    on disk; a group whose matches are missing keeps the interval the JSON already holds."""
    labels = {group_label(g) for model in {r["model"] for r in result["rows"]}
              for g in seed_groups(ordered_rows(result, model))}

    def current(comparison: str) -> bool:
        model, with_stage, without, bits = comparison.split("|")
        return any((with_stage, without) == (w, wo) for _, w, wo in COMPARISONS) and \
            {f"{model}|{with_stage}|{bits}", f"{model}|{without}|{bits}"} <= labels
    # what no longer names a row group or a comparison (a renamed row) goes
    result["intervals"] = {k: v for k, v in result.get("intervals", {}).items() if k in labels}
    result["comparisons"] = {k: v for k, v in result.get("comparisons", {}).items() if current(k)}
    intervals, comparisons = result["intervals"], result["comparisons"]
    for model in sorted({r["model"] for r in result["rows"]}):
        groups = seed_groups(ordered_rows(result, model))
        fp32 = [g for g in groups if g[0]["method"] == "fp32"]
        if not fp32:
            continue
        frames = MatchTable.load(table_path(out, fp32[0][0])).frames if table_path(out, fp32[0][0]).is_file() else 0
        if not frames:
            continue
        weights = resample_weights(frames, BOOTSTRAP_RESAMPLES, seed=0)
        base = map_samples(table_path(out, fp32[0][0]), weights)
        samples = {}
        for group in groups:
            found = [map_samples(table_path(out, r), weights) for r in group]
            if all(found):
                samples[(group[0]["method"], group[0]["w_bits"], group[0]["a_bits"])] = found
                if group[0]["method"] != "fp32":
                    intervals[group_label(group)] = paired_interval(found, [base]).as_dict()
        for what, with_stage, without in COMPARISONS:
            for w, a in sorted({(g[0]["w_bits"], g[0]["a_bits"]) for g in groups}, reverse=True):
                if (with_stage, w, a) in samples and (without, w, a) in samples:
                    gap = paired_interval(samples[(with_stage, w, a)], samples[(without, w, a)])
                    comparisons[f"{model}|{with_stage}|{without}|W{w}A{a}"] = {"stage": what, **gap.as_dict()}


def interval_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    return Interval(entry["delta"], entry["low"], entry["high"]).cell()


def seed_table(rows: list[dict[str, Any]], seeds: list[int], intervals: dict[str, Any]) -> list[str]:
    """Markdown rows: each draw's mAP, their mean +- std, and the difference to FP32 with its interval."""
    lines = ["| method | W/A | " + " | ".join(f"draw {s}" for s in seeds) + " | mean +- std (draws) "
             "| delta vs FP32 [95% interval] | PTQ s (mean) |", "|---|---|" + "---|" * (len(seeds) + 3)]
    for group in seed_groups(rows):
        by_seed = {r.get("seed", seeds[0]): r["value"] for r in group}
        mean, std = spread(group)
        first = group[0]
        entry = intervals.get(group_label(group))
        if first["method"] == "fp32":
            delta = "+0.00"
        elif entry:
            delta = interval_cell(entry)
        else:
            delta = f"{100 * (mean - first['fp32']):+.2f} (no interval)"
        cells = [f"{100 * by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds] if first["method"] != "fp32" \
            else [f"{100 * first['value']:.2f}"] + ["-"] * (len(seeds) - 1)
        lines.append(f"| {first['method']} | {first['w_bits']}/{first['a_bits']} | " + " | ".join(cells)
                     + f" | {100 * mean:.2f} +- {100 * std:.2f} ({len(group)}) | {delta} "
                     f"| {statistics.fmean(r['seconds'] for r in group):.0f} |")
    return lines


def comparison_table(comparisons: dict[str, Any], model: str) -> list[str]:
    """Markdown rows: what each stage changes, recipe with it minus recipe without it, and whether resolved."""
    order = [c[0] for c in COMPARISONS]
    entries = [(k.split("|"), v) for k, v in comparisons.items() if k.split("|")[0] == model and v["stage"] in order]
    if not entries:
        return []
    lines = ["| stage | with | without | W/A | delta mAP [95% interval] |", "|---|---|---|---|---|"]
    for (_, with_stage, without, bits), entry in sorted(entries, key=lambda e: (order.index(e[1]["stage"]), e[0][3])):
        lines.append(f"| {entry['stage']} | {with_stage} | {without} | {bits} | {interval_cell(entry)} |")
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


def earlier_table(result: dict[str, Any], model: str) -> list[str]:
    """Markdown rows of the rows measured on fewer val frames whose method, bits and calibration budget
    (frames x iterations) have no full row yet."""
    meta = result["meta"]

    def budget(row: dict[str, Any]) -> tuple[Any, Any]:
        recipe = row.get("recipe", {})
        return (recipe.get("calib_frames", meta.get("calib_frames")),
                recipe.get("recon", {}).get("iterations", meta.get("iterations")))
    full = {(r["method"].split(BUDGET_MARK)[0], r["w_bits"], r["a_bits"], *budget(r))
            for r in result["rows"] if r["model"] == model}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in result.get(EARLIER, []):
        measured = (row["method"], row["w_bits"], row["a_bits"], row["calib_frames"], row["iterations"])
        if row["model"] == model and measured not in full:
            key = (row["method"], row["w_bits"], row["a_bits"], row["val_frames"], row["calib_frames"],
                   row["iterations"])
            groups.setdefault(key, []).append(row)
    if not groups:
        return []
    lines = ["| method | W/A | val frames | calibration frames x iterations | draws | mean +- std "
             "| delta vs FP32 on those frames |", "|---|---|---|---|---|---|---|"]
    for (method, w, a, frames, calib, iterations), group in groups.items():
        mean, std = spread(group)
        draws = " / ".join(f"{100 * r['value']:.2f}" for r in group)
        lines.append(f"| {method} | {w}/{a} | {frames} | {calib} x {iterations} | {draws} | {100 * mean:.2f} +- "
                     f"{100 * std:.2f} | {100 * (mean - group[0]['fp32']):+.2f} (no interval) |")
    return lines


def readme_table(result: dict[str, Any]) -> list[str]:
    """The README's results table: the rows of ``README_ROWS`` that have an interval, per model and bits."""
    intervals = result.get("intervals", {})
    lines = ["| model | W/A | recipe | mAP (mean of draws) | delta vs FP32 [95% interval] |", "|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in result["rows"]}):
        groups = {(g[0]["method"], g[0]["w_bits"], g[0]["a_bits"]): g for g in seed_groups(ordered_rows(result, model))}
        fp32 = groups.get(("fp32", 32, 32))
        name = model.removeprefix("centerpoint_").removesuffix("_synthetic").capitalize()
        for key, label in README_ROWS.items():
            group = groups.get(key)
            if fp32 is None or group is None or group_label(group) not in intervals:
                continue
            lines.append(f"| {name} (FP32 {100 * fp32[0]['value']:.2f}) | W{key[1]}A{key[2]} | {label} "
                         f"| {100 * spread(group)[0]:.2f} | {interval_cell(intervals[group_label(group)])} |")
    return lines


def update_readme(result: dict[str, Any], readme: Path) -> None:
    """Put the results table between the README's markers (a README without them is left alone)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(readme_table(result)) + "\n" + README_END + tail)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    update_intervals(result, out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    seeds = result["meta"].get("seeds", [result["meta"].get("seed", 0)])
    lines = ["# LiDAR benchmark (synthetic CenterPoint, nuScenes-style mAP x100)", "", result["meta"]["note"], "",
             "Intervals: 95%, paired bootstrap over the val frames (both models on the same "
             f"{BOOTSTRAP_RESAMPLES} resamples) and over the calibration draws; 'unresolved' marks an interval "
             "that holds 0, a difference this benchmark cannot tell from noise.", ""]
    for model in sorted({r["model"] for r in [*result["rows"], *result.get(EARLIER, [])]}):
        full = ordered_rows(result, model)
        lines += [f"## {model}"] + (["", *seed_table(full, seeds, result.get("intervals", {}))] if full else [])
        stages = comparison_table(result.get("comparisons", {}), model)
        if stages:
            lines += ["", "Stages: the recipe with the stage minus the recipe without it (same frames, same draws).",
                      ""] + stages
        earlier = earlier_table(result, model)
        if earlier:
            lines += ["", "Rows without a full measurement yet: fewer val frames, no interval (differences "
                      "below about 0.7 mAP between these rows rank nothing).", ""] + earlier
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(result, out.with_suffix(""))
    if out.resolve() == DEFAULT_OUT.resolve():
        update_readme(result, README)


def plot(result: dict[str, Any], prefix: Path) -> None:
    """One chart per model, saved as ``<prefix>_<model>.png``: each row's difference to FP32 and its interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    intervals = result.get("intervals", {})
    for model in sorted({r["model"] for r in result["rows"]}):
        groups = [g for g in seed_groups(ordered_rows(result, model)) if group_label(g) in intervals]
        if not groups:
            continue
        entries = [intervals[group_label(g)] for g in groups]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.errorbar(range(len(groups)), [e["delta"] for e in entries],
                    yerr=[[e["delta"] - e["low"] for e in entries], [e["high"] - e["delta"] for e in entries]],
                    fmt="o", capsize=3)
        ax.axhline(0.0, color="k", ls="--", label="FP32")
        ax.set_xticks(range(len(groups)), [f"{g[0]['method']}\nW{g[0]['w_bits']}A{g[0]['a_bits']}" for g in groups],
                      rotation=60, fontsize=7)
        ax.set_ylabel("mAP - FP32 mAP (95% interval)")
        ax.set_title(f"{model}: PTQ methods")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{prefix}_{model}.png", dpi=110)
        plt.close(fig)


def evaluate_row(model: torch.nn.Module, loader: Any, cfg: Config, row: dict[str, Any], out: Path
                 ) -> dict[str, float]:
    """Evaluate ``model`` on the val frames, keep its per-frame matches for the intervals, return the metrics."""
    return evaluate_saving_matches(model, loader, cfg.test_evaluator, table_path(out, row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pillar", "voxel"], choices=list(CONFIGS))
    parser.add_argument("--val-frames", type=int, default=1000)
    parser.add_argument("--calib-frames", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=40, help="reconstruction iterations per unit")
    parser.add_argument("--output-loss-every", type=int, default=4, help="TGPL (full model) step every k")
    parser.add_argument("--rows", nargs="*", help="only these methods (e.g. lidar_ptq maxmin)")
    parser.add_argument("--bits", nargs="*", help="only these precisions (e.g. w4a8 w4a4)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="calibration draws: every row runs once per seed (calibration frames, "
                             "reconstruction order)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the results JSON (the default one also "
                        "writes the README's results table)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--again", action="store_true", help="run the selected rows again and replace them (e.g. "
                        "on a machine without their per-frame matches, or to check that a draw reproduces)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown/plots from the JSON")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="put the rows of these result files (e.g. jobs run in parallel with --out) into --out, "
                             "replacing rows of the same model/method/bits/seed, and rewrite the report")
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
            "output_loss_every": args.output_loss_every, "seed": args.seeds[0], "seeds": args.seeds,
            **describe_machine(),
            "note": (f"Synthetic LiDAR val set, first {args.val_frames} frames; {args.calib_frames} calibration "
                     f"frames from the training set per draw (draws {', '.join(map(str, args.seeds))}: other "
                     f"frames and reconstruction order); reconstruction {args.iterations} iterations per unit "
                     f"(TGPL step every {args.output_loss_every}). mAP: nuScenes-style, centre distance "
                     "0.5/1/2/4 m, nuscenes-devkit matching.")}
    result = {"meta": meta, "rows": []}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        differ = [k for k in SETTINGS if previous["meta"].get(k) != meta[k]]
        if differ:
            held = ", ".join(f"{k} {previous['meta'].get(k)}" for k in differ)
            print(f"{args.out} holds rows run with other settings ({held}); pass the same ones to add rows, "
                  "--out for a new table, or --fresh to start this one again", file=sys.stderr)
            return 2
        result = previous
        result["meta"]["seeds"] = sorted(set(previous["meta"].get("seeds", [])) | set(args.seeds))
    default_seed = result["meta"].get("seed", meta["seed"])
    done = {row_key(r, default_seed) for r in result["rows"]}
    for name in args.models:
        cfg = Config.fromfile(str(CONFIGS[name]))
        ensure_synthetic_data(cfg, at_least={"val": args.val_frames})
        checkpoint = ROOT / "benchmarks" / "models" / f"centerpoint_{name}_synthetic.pth"
        loader = build_test_loader(cfg, args.val_frames)
        float_model = build_float_model(cfg, checkpoint)
        model_name = f"centerpoint_{name}_synthetic"
        fp32_row = next((r for r in result["rows"] if r["model"] == model_name and r["method"] == "fp32"), None)
        if fp32_row is None or not table_path(args.out, fp32_row).is_file():
            start = time.perf_counter()
            fp32_row = {"model": model_name, "method": "fp32", "w_bits": 32, "a_bits": 32, "metric": "mAP"}
            fp32 = evaluate_row(float_model, loader, cfg, fp32_row, args.out)
            fp32_row.update(value=fp32["det/mAP"], fp32=fp32["det/mAP"], seconds=time.perf_counter() - start,
                            per_class={c: fp32[f"det/AP_{c}"] for c in ("car", "pedestrian", "bicycle")})
            result["rows"] = [r for r in result["rows"] if not (r["model"] == model_name and r["method"] == "fp32")]
            result["rows"].append(fp32_row)
            write_outputs(result, args.out)
        for seed in args.seeds:
            batches: dict[int, list[Any]] = {}  # per frame count, on first use: a resumed run may need none
            for method, w, a in selected_rows(args.rows, args.bits):
                key = (model_name, method, w, a, seed)
                if key in done and not args.again:
                    continue
                spec = recipe_spec(method, w, a, args, seed)
                same = [] if args.again else \
                    [r for r in result["rows"] if r["model"] == model_name and r["method"] != method
                        and (r["w_bits"], r["a_bits"]) == (w, a) and r.get("seed", default_seed) == seed
                        and same_recipe(r.get("recipe", {}), spec)]
                if same:  # a row whose recipe another row already ran (same draw): not run twice
                    row = {**same[0], "method": method, "same_as": same[0]["method"]}
                    source, target = table_path(args.out, same[0]), table_path(args.out, row)
                    if source.is_file():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(source.read_bytes())
                else:
                    frames = spec["calib_frames"]
                    if frames not in batches:
                        batches[frames] = collect_batches(float_model, build_calibration_loader(cfg, frames, seed))
                    model = build_float_model(cfg, checkpoint)
                    outcome = quantize_detector(model, batches[frames], recipe_from_dict(spec))
                    row = {"model": model_name, "method": method, "w_bits": w, "a_bits": a, "seed": seed,
                           "metric": "mAP", "fp32": fp32_row["value"], "seconds": outcome.seconds, "recipe": spec,
                           "range_search": outcome.report.selection,
                           "bias_correction": {**outcome.report.bias_correction_loss,
                                               "kept": bool(outcome.report.bias_corrections)},
                           "reconstruction": {**outcome.report.recon_loss, "kept": outcome.report.recon_kept}}
                    metrics = evaluate_row(model, loader, cfg, row, args.out)
                    row.update(value=metrics["det/mAP"],
                               per_class={c: metrics[f"det/AP_{c}"] for c in ("car", "pedestrian", "bicycle")})
                result["rows"] = put_row(result["rows"], row, default_seed)
                done.add(key)
                write_outputs(result, args.out)
                print(f"{row['model']} {method} W{w}A{a} draw {seed}: mAP {100 * row['value']:.2f} (fp32 "
                      f"{100 * row['fp32']:.2f}) in {row['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
