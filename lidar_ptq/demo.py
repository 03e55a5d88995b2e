"""Built-in demo: quantize a small BEV detector head on sparse synthetic BEV maps.

A stand-in for the synthetic CenterPoint demo (a later milestone): it shows the
one-call API, compares calibration methods on LiDAR-like sparse inputs (about
3% non-empty cells, as on a real nuScenes sweep) and prints the quantizer
summary. Run with ``python -m lidar_ptq.demo``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import calibrate, fold_batchnorms, format_summary, quant_summary, quantize

logger = logging.getLogger("lidar_ptq.demo")

# Calibration methods compared by the demo: name -> activation (input) quantizer settings.
CALIBRATION_METHODS: dict[str, dict[str, Any]] = {
    "minmax": {"observer": "minmax"},
    "sparse_minmax": {"observer": "sparse_minmax"},
    "sparse_lp_search": {"observer": "lp_search", "observer_kwargs": {"sparse": True}},
    "percentile_99.99": {"observer": "percentile", "observer_kwargs": {"percentile": 99.99}},
    "entropy": {"observer": "entropy", "observer_kwargs": {"stride": 8}},
    "sparse_entropy": {"observer": "entropy", "observer_kwargs": {"stride": 8, "sparse": True}},
}


def conv_bn_relu(cin: int, cout: int, **kwargs: Any) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kwargs), nn.BatchNorm2d(cout), nn.ReLU()]


def tiny_bev_net(in_channels: int = 8, seed: int = 0) -> nn.Module:
    """A CenterPoint-like BEV backbone + head (heatmap and regression maps), randomly initialised."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        *conv_bn_relu(in_channels, 32), *conv_bn_relu(32, 64, stride=2), *conv_bn_relu(64, 64),
        nn.ConvTranspose2d(64, 32, 2, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 3 + 8, 1),
    )
    for m in net.modules():  # BN statistics like a trained network's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def sparse_bev_batch(generator: torch.Generator, batch: int = 2, channels: int = 8, size: int = 128,
                     occupancy: float = 0.03) -> torch.Tensor:
    """BEV pseudo-images: clustered non-empty cells with positive, long-tailed features."""
    bev = torch.zeros(batch, channels, size, size)
    cells = int(occupancy * size * size)
    for b in range(batch):
        centers = torch.randint(0, size, (cells // 8, 2), generator=generator)
        offsets = torch.randint(-2, 3, (cells // 8, 8, 2), generator=generator)
        yx = (centers[:, None] + offsets).reshape(-1, 2).clamp(0, size - 1)
        feats = torch.exp(0.8 * torch.randn(len(yx), channels, generator=generator))  # log-normal
        bev[b, :, yx[:, 0], yx[:, 1]] = feats.t()
    return bev


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-20)))


@torch.no_grad()
def run_demo(w_bits: int = 8, a_bits: int = 8, calib_batches: int = 8, seed: int = 0,
             out_dir: Path | None = None) -> dict[str, Any]:
    """Quantize the demo network with each calibration method; return output SQNR per method."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    calib = [sparse_bev_batch(gen) for _ in range(calib_batches)]
    test = [sparse_bev_batch(gen) for _ in range(4)]
    reference = tiny_bev_net(seed=seed)
    ref_out = [reference(x) for x in test]
    occupancy = float(torch.cat([(x != 0).any(1).float().mean().reshape(1) for x in test]).mean())
    rows, best_model, best_sqnr = [], None, float("-inf")
    for method, input_cfg in CALIBRATION_METHODS.items():
        start = time.perf_counter()
        model = tiny_bev_net(seed=seed)
        fold_batchnorms(model)
        quantize(model, {"weight": {"bits": w_bits}, "input": {"bits": a_bits, **input_cfg}})
        calibrate(model, calib, progress=False)
        sqnr = sum(sqnr_db(r, model(x)) for r, x in zip(ref_out, test)) / len(test)
        rows.append({"method": method, "w_bits": w_bits, "a_bits": a_bits, "sqnr_db": round(sqnr, 2),
                     "seconds": round(time.perf_counter() - start, 2)})
        if sqnr > best_sqnr:
            best_model, best_sqnr = model, sqnr
    result = {"meta": {"model": "tiny_bev_net", "seed": seed, "calib_batches": calib_batches,
                       "bev_occupancy": round(occupancy, 4)},
              "rows": rows, "summary": quant_summary(best_model)}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2))
    return result


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| calibration | W/A | output SQNR (dB) | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['w_bits']}/{r['a_bits']} | {r['sqnr_db']:.2f} | {r['seconds']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def parse_wa(text: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8)."""
    w, _, a = text.lower().lstrip("w").partition("a")
    try:
        return int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a setting like w8a8 or w4a4, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=parse_wa, nargs="+", default=[(8, 8), (4, 4)],
                        help="weight/activation bit-widths to run, e.g. w8a8 w4a4")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("work_dirs/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for w, a in args.settings:
        result = run_demo(w, a, args.calib_batches, args.seed, args.out_dir / f"w{w}a{a}")
        logger.info("\nW%dA%d on sparse BEV maps (%.1f%% non-empty cells):\n%s", w, a,
                    100 * result["meta"]["bev_occupancy"], format_rows(result["rows"]))
    logger.info("\nQuantizers of the best W%dA%d model:\n%s", w, a, format_summary(result["summary"]))
    logger.info("\nresults written under %s", args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
