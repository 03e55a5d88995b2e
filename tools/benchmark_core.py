"""Benchmark of the generic reconstruction core on the digits ResNet and ViT.

For each model and bit setting: FP32, round-to-nearest with min-max ranges
(`rtn_minmax`), round-to-nearest with MSE ranges (`rtn_mse`), AdaRound, BRECQ,
QDrop, FlexRound, plus one mixed-precision row (average 3-bit weights, QDrop).
Rows are appended to ``benchmarks/core.json`` as they finish, so a killed run
continues where it stopped; ``benchmarks/core.md`` is rewritten from the JSON.

Usage: python tools/benchmark_core.py [--iterations 1000] [--models resnet vit] [--fresh]
(train the models first: python tools/train_digits.py --model resnet|vit)

``--task hard`` runs the hard digits task instead (turned, scaled, shifted, noisy digits; about 6000
distorted test images; ``python tools/train_digits.py --model resnet --task hard`` first): each method at
W4A4 and W2A4 on several calibration draws (``--seeds``: other distorted calibration images and
reconstruction order), with the difference to FP32 and between methods as paired bootstrap intervals
over test images and draws. Writes ``benchmarks/core_hard.{json,md}``; per-image results go to
``benchmarks/frames/core_hard/`` (not committed); a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe_machine

import lidar_ptq
from lidar_ptq.recon.engine import ReconConfig, reconstruct
from lidar_ptq.recon.losses import self_label_cross_entropy
from lidar_ptq.recon.mixed import allocate_bits, layer_sensitivity
from lidar_ptq.stats import BootstrapSamples, Interval, bootstrap_mean, paired_interval, resample_weights
from lidar_ptq.zoo.digits import MODELS, accuracy, correct, distort, load_digits_split, load_hard_digits_split

SETTINGS = [(8, 8), (4, 8), (4, 4), (2, 4)]
RECON = ["adaround", "brecq", "qdrop", "flexround"]
# First and last layers stay 8-bit, as in the BRECQ/QDrop papers.
KEEP_8BIT = {"resnet": ["stem.0", "fc"], "vit": ["patch", "head"]}


def quant_config(model_name: str, w_bits: int, a_bits: int, observer: str,
                 extra: dict[str, Any] | None = None, softmax: dict[str, Any] | None = None) -> dict[str, Any]:
    obs_kwargs = {"p": 2.0} if observer == "lp_search" else {}
    cfg: dict[str, Any] = {
        # Asymmetric weights and activations, as in the BRECQ/QDrop/FlexRound papers: a 2-bit symmetric
        # signed grid {-2,-1,0,1} is lopsided, and post-ReLU/post-GELU activations are one-sided.
        "weight": {"bits": w_bits, "observer": observer, "observer_kwargs": obs_kwargs, "symmetric": False},
        "input": {"bits": a_bits, "observer": observer, "observer_kwargs": obs_kwargs, "symmetric": False},
        "overrides": {name: {"weight": {"bits": 8}, "input": {"bits": 8}} for name in KEEP_8BIT[model_name]},
    }
    if softmax:
        cfg["softmax"] = softmax
    cfg["overrides"].update(extra or {})
    return cfg


def prepare(model_name: str, state: dict, cfg: dict, calib: list[torch.Tensor]) -> torch.nn.Module:
    model = MODELS[model_name]()
    model.load_state_dict(state)
    model.eval()
    lidar_ptq.fold_batchnorms(model)
    lidar_ptq.quantize(model, cfg)
    lidar_ptq.calibrate(model, calib, progress=False)
    return model


def run_row(model_name: str, method: str, w: int, a: int, state: dict, data: dict, calib: list[torch.Tensor],
            args: argparse.Namespace, softmax: dict[str, Any] | None,
            recon_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """One quantized model's row and its per-image correctness on the test split."""
    start = time.perf_counter()
    observer = "minmax" if method == "rtn_minmax" else "lp_search"
    extra = None
    if method == "mixed":
        probe = prepare(model_name, state, quant_config(model_name, 8, a, observer, softmax=softmax), calib)
        sens = layer_sensitivity(probe, calib[:4], bit_options=(2, 3, 4, 8))
        for name in KEEP_8BIT[model_name]:
            sens.pop(name, None)
        allocation = allocate_bits(probe, sens, average_bits=w)
        extra = {name: {"weight": {"bits": b}} for name, b in allocation.bits.items()}
    model = prepare(model_name, state, quant_config(model_name, w, a, observer, extra, softmax), calib)
    if method in RECON or method == "mixed":
        recon_method = "qdrop" if method == "mixed" else method
        reconstruct(model, calib, ReconConfig.from_method(recon_method, iterations=args.iterations,
                                                          batch_size=32, seed=args.seed, progress=False,
                                                          **(recon_overrides or {})))
    hits = correct(model, data["x_test"], data["y_test"])
    row = {"model": model_name, "method": method, "w_bits": w, "a_bits": a, "metric": "top1",
           "value": round(100.0 * float(hits.mean()), 2), "seconds": round(time.perf_counter() - start, 1)}
    if method == "mixed":
        row["allocation"] = allocation.bits
    return row, hits


def write_markdown(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    models = sorted({r["model"] for r in rows})
    lines = ["# Reconstruction core on digits (top-1 %, test split)", "",
             f"Iterations per unit: {result['meta']['iterations']} (published default 20000), "
             f"{result['meta']['calib_samples']} calibration samples, batch 32, seed {result['meta']['seed']}; "
             "first and last layers 8-bit. Produced by `python tools/benchmark_core.py`.", ""]
    settings = [f"W{w}A{a}" for w, a in SETTINGS]
    for model in models:
        fp32 = next(r["fp32"] for r in rows if r["model"] == model)
        lines += [f"## {model} (FP32 {fp32:.2f})", "", "| method | " + " | ".join(settings) + " | seconds (W4A4) |",
                  "|---" * (len(settings) + 2) + "|"]
        for method in ["rtn_minmax", "rtn_mse", *RECON]:
            cells = []
            for w, a in SETTINGS:
                hit = [r for r in rows if (r["model"], r["method"], r["w_bits"], r["a_bits"]) == (model, method, w, a)]
                cells.append(f"{hit[0]['value']:.2f}" if hit else "-")
            secs = [r["seconds"] for r in rows if (r["model"], r["method"], r["w_bits"], r["a_bits"]) ==
                    (model, method, 4, 4)]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs[0] if secs else '-'} |")
        variants = [r for r in rows if r["model"] == model and r.get("variant")]
        if variants:
            lines += ["", "Variants (the table above uses a log2 4-bit softmax grid at A4 for the ViT):", "",
                      "| method | variant | setting | top-1 |", "|---|---|---|---|"]
            lines += [f"| {r['method']} | {r['variant']} | W{r['w_bits']}A{r['a_bits']} | {r['value']:.2f} |"
                      for r in variants]
        for r in rows:
            if r["model"] == model and r["method"] == "mixed":
                lines.append(f"\nMixed precision (average {r['w_bits']}-bit weights, A{r['a_bits']}, QDrop): "
                             f"{r['value']:.2f} in {r['seconds']} s; allocation {r.get('allocation')}")
        lines.append("")
    path.write_text("\n".join(lines))


# ----- the hard digits task, with intervals ---------------------------------------------------------------
HARD_SETTINGS = [(4, 4), (2, 4)]
HARD_METHODS = ["rtn_minmax", "rtn_mse", *RECON]
# (published claim, better method, worse method): low-bit orderings reported by the BRECQ, QDrop and
# FlexRound papers on ImageNet
HARD_COMPARISONS = [("AdaRound over round-to-nearest", "adaround", "rtn_minmax"),
                    ("BRECQ over AdaRound", "brecq", "adaround"),
                    ("QDrop over BRECQ", "qdrop", "brecq"),
                    ("FlexRound over QDrop", "flexround", "qdrop")]
BOOTSTRAP_RESAMPLES = 1000


def hard_calibration(data: dict[str, torch.Tensor], samples: int, seed: int) -> list[torch.Tensor]:
    """One calibration draw: ``samples`` training images in a seeded order, each distorted by that draw."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data["x_train"]), generator=generator)[:samples]
    return list(distort(data["x_train"][order], generator).split(64))


def hard_items_path(out: Path, model: str, name: str) -> Path:
    return out.parent / "frames" / out.stem / model / f"{name}.npy"


def hard_intervals(result: dict[str, Any], out: Path) -> None:
    """Each method's difference to FP32 and the published orderings, paired over test images and draws."""
    result["intervals"], result["comparisons"] = {}, {}
    for model in sorted({r["model"] for r in result["rows"]}):
        base_path = hard_items_path(out, model, "fp32")
        if not base_path.is_file():
            continue
        base_items = np.load(base_path)
        weights = resample_weights(len(base_items), BOOTSTRAP_RESAMPLES, seed=0)
        base = bootstrap_mean(base_items, weights)
        samples: dict[tuple[str, int, int], list[BootstrapSamples]] = {}
        for (method, w, a) in {(r["method"], r["w_bits"], r["a_bits"]) for r in result["rows"] if r["model"] == model}:
            paths = [hard_items_path(out, model, f"{method}_w{w}a{a}_seed{r['seed']}") for r in result["rows"]
                     if (r["model"], r["method"], r["w_bits"], r["a_bits"]) == (model, method, w, a)]
            if paths and all(p.is_file() for p in paths):
                samples[(method, w, a)] = [bootstrap_mean(np.load(p), weights) for p in paths]
                result["intervals"][f"{model}|{method}|W{w}A{a}"] = paired_interval(
                    samples[(method, w, a)], [base]).as_dict()
        for claim, better, worse in HARD_COMPARISONS:
            for w, a in HARD_SETTINGS:
                if (better, w, a) in samples and (worse, w, a) in samples:
                    gap = paired_interval(samples[(better, w, a)], samples[(worse, w, a)])
                    result["comparisons"][f"{model}|{better}|{worse}|W{w}A{a}"] = {"claim": claim, **gap.as_dict()}


def hard_markdown(result: dict[str, Any], path: Path) -> None:
    meta, rows = result["meta"], result["rows"]
    lines = ["# Reconstruction core on the hard digits task (top-1 %, intervals)", "",
             f"{meta['note']} Command: `{meta['command']}`; machine: {meta['machine']}, load average (1 min) "
             f"{meta['load_before']:.2f} before the run.", ""]
    for model in sorted({r["model"] for r in rows}):
        fp32 = meta["fp32"].get(model)
        seeds = sorted({r["seed"] for r in rows if r["model"] == model})
        lines += [f"## {model} (FP32 {fp32:.2f})", "",
                  "| method | W/A | " + " | ".join(f"draw {s}" for s in seeds) + " | delta vs FP32 [95% CI] | "
                  "seconds (mean) |", "|---|---|" + "---|" * (len(seeds) + 2)]
        for w, a in HARD_SETTINGS:
            for method in HARD_METHODS:
                mine = {r["seed"]: r for r in rows if (r["model"], r["method"], r["w_bits"], r["a_bits"]) ==
                        (model, method, w, a)}
                if not mine:
                    continue
                entry = result["intervals"].get(f"{model}|{method}|W{w}A{a}")
                cell = Interval(entry["delta"], entry["low"], entry["high"]).cell() if entry else "-"
                lines.append(f"| {method} | {w}/{a} | " + " | ".join(
                    f"{mine[s]['value']:.2f}" if s in mine else "-" for s in seeds) + f" | {cell} | "
                    f"{sum(r['seconds'] for r in mine.values()) / len(mine):.0f} |")
        found = [(k.split("|"), v) for k, v in result["comparisons"].items() if k.startswith(f"{model}|")]
        if found:
            lines += ["", "Published orderings (better minus worse method, same images and draws):", "",
                      "| claim | W/A | delta [95% CI] | appears here |", "|---|---|---|---|"]
            for (_, _, _, bits), v in found:
                verdict = "yes" if v["resolved"] and v["delta"] > 0 else ("reversed" if v["resolved"] else
                                                                          "not resolved")
                lines.append(f"| {v['claim']} | {bits} | "
                             f"{Interval(v['delta'], v['low'], v['high']).cell()} | {verdict} |")
        lines.append("")
    path.write_text("\n".join(lines))


def run_hard(args: argparse.Namespace) -> int:
    out = args.out if args.out != Path("benchmarks/core.json") else Path("benchmarks/core_hard.json")
    data = load_hard_digits_split(0)
    result = json.loads(out.read_text()) if out.is_file() and not args.fresh else {"rows": []}
    if result.get("meta", {}).get("iterations", args.iterations) != args.iterations:
        result["rows"] = []
    result["meta"] = {
        "iterations": args.iterations, "calib_samples": args.calib_samples, "seeds": args.seeds,
        "fp32": result.get("meta", {}).get("fp32", {}), **describe_machine(load=False),
        "load_before": result.get("meta", {}).get("load_before", os.getloadavg()[0]),
        "command": f"python tools/benchmark_core.py --task hard --models {' '.join(args.models)} "
                   f"--iterations {args.iterations} --seeds {' '.join(map(str, args.seeds))}",
        "note": (f"Hard digits: {len(data['y_test'])} distorted test images (every test digit 10 times, "
                 "turned up to 20 degrees, scaled 0.85-1.15, shifted up to 1 pixel, Gaussian noise 0.1); "
                 f"{args.calib_samples} distorted training images per calibration draw; {args.iterations} "
                 "iterations per unit, batch 32; asymmetric per-channel weights and per-tensor activations, "
                 "first and last layers 8-bit. Intervals resample test images and draws.")}
    done = {(r["model"], r["method"], r["w_bits"], r["a_bits"], r["seed"]) for r in result["rows"]}

    def save() -> None:
        hard_intervals(result, out)
        out.write_text(json.dumps(result, indent=2) + "\n")
        hard_markdown(result, out.with_suffix(".md"))

    for model_name in args.models:
        state = torch.load(args.weights / f"digits_hard_{model_name}.pth", map_location="cpu")
        float_model = MODELS[model_name]()
        float_model.load_state_dict(state)
        items = correct(float_model, data["x_test"], data["y_test"])
        hard_items_path(out, model_name, "fp32").parent.mkdir(parents=True, exist_ok=True)
        np.save(hard_items_path(out, model_name, "fp32"), items)
        result["meta"]["fp32"][model_name] = round(100.0 * float(items.mean()), 2)
        softmax = {"scheme": "log2"} if model_name == "vit" else None
        for w, a in HARD_SETTINGS:
            for method in HARD_METHODS:
                for seed in args.seeds:
                    if (model_name, method, w, a, seed) in done and \
                            hard_items_path(out, model_name, f"{method}_w{w}a{a}_seed{seed}").is_file():
                        continue
                    args.seed = seed
                    row, hits = run_row(model_name, method, w, a, state, data,
                                        hard_calibration(data, args.calib_samples, seed), args, softmax)
                    np.save(hard_items_path(out, model_name, f"{method}_w{w}a{a}_seed{seed}"), hits)
                    result["rows"] = [r for r in result["rows"] if (r["model"], r["method"], r["w_bits"],
                                                                    r["a_bits"], r["seed"]) !=
                                      (model_name, method, w, a, seed)] + [{**row, "seed": seed}]
                    save()
                    print(json.dumps({**row, "seed": seed}), flush=True)
    save()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"], choices=sorted(MODELS))
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=Path("benchmarks/models"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/core.json"))
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON")
    parser.add_argument("--task", choices=["digits", "hard"], default="digits")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration draws (hard task)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.task == "hard":
        return run_hard(args)
    torch.manual_seed(args.seed)
    data = load_digits_split(args.seed)
    calib = list(data["x_train"][: args.calib_samples].split(64))
    meta = {"iterations": args.iterations, "calib_samples": args.calib_samples, "seed": args.seed,
            **describe_machine(),
            "command": "python tools/benchmark_core.py " + f"--iterations {args.iterations}",
            "vit_softmax": "log2 grid at A4 (variant rows: uniform), uniform at A8",
            "weights_activations": "asymmetric, per-channel weights, per-tensor activations"}
    result = {"meta": meta, "rows": []}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        if previous["meta"].get("iterations") == args.iterations:
            result["rows"] = previous["rows"]
    done = {(r["model"], r["method"], r["w_bits"], r["a_bits"], r.get("variant")) for r in result["rows"]}

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        write_markdown(result, args.out.with_suffix(".md"))
        print(json.dumps(row), flush=True)

    for model_name in args.models:
        state = torch.load(args.weights / f"digits_{model_name}.pth", map_location="cpu")
        float_model = MODELS[model_name]()
        float_model.load_state_dict(state)
        fp32 = round(accuracy(float_model, data["x_test"], data["y_test"]), 2)
        jobs = [(m, w, a) for w, a in SETTINGS for m in ["rtn_minmax", "rtn_mse", *RECON]] + [("mixed", 3, 4)]
        for method, w, a in jobs:
            variants = [None]
            if model_name == "vit" and a == 4 and method in ("rtn_mse", "qdrop"):
                variants = [None, "softmax_uniform"] + (["fisher"] if method == "qdrop" else [])
            for variant in variants:
                if (model_name, method, w, a, variant) in done:
                    continue
                softmax = None
                if model_name == "vit" and a <= 4 and variant != "softmax_uniform":
                    softmax = {"scheme": "log2"}
                # "fisher": BRECQ's Fisher-diagonal (Gauss-Newton Hessian) weighting of the unit loss
                recon_overrides = ({"loss": "fisher", "task_loss": self_label_cross_entropy}
                                   if variant == "fisher" else None)
                row, _ = run_row(model_name, method, w, a, state, data, calib, args, softmax, recon_overrides)
                row["fp32"] = fp32
                if variant:
                    row["variant"] = variant
                record(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
