"""What a user would pick instead: NVIDIA ModelOpt and Qualcomm AIMET on the synthetic CenterPoint-Pillar.

Each peer quantizes the model's dense network (backbone, neck, head: the part TensorRT runs; the pillar
encoder stays float in these rows) with its own INT8 default, calibrated on the same draws of 16
training frames as the LiDAR-PTQ rows of ``benchmarks/lidar.json``, and is scored on the same
val frames and metric:

- ``modelopt``: ``mtq.quantize(dense, mtq.INT8_DEFAULT_CFG, forward_loop)`` (per-channel weight max,
  per-tensor activation max);
- ``aimet_quantsim``: ``QuantizationSimModel`` W8A8 with AIMET's default scheme and config
  (``post_training_tf_enhanced``), encodings computed on the calibration frames (mmcv's ConvTranspose2d
  wrapper swapped for torch's and the head's unused loss modules set aside: AIMET refuses module types
  it has no quantized definition for);
- ``aimet_adaround``: AIMET's AdaRound (``Adaround.apply_adaround``, the same iterations per layer as
  the LiDAR-PTQ rows' reconstruction) and then the QuantSim above with the AdaRound weight encodings frozen.

Every row reports the difference to FP32 with its 95% bootstrap interval (val frames and calibration
draws resampled) and, where the LiDAR-PTQ default's per-frame matches from ``benchmark_lidar.py`` are on
disk, the paired difference to it. The peers' packages are not part of the install:

    python -m venv peers && peers/bin/pip install -r requirements/peers.txt   (beside the project's stack)
    python tools/benchmark_peers.py [--peers modelopt aimet_quantsim aimet_adaround] [--seeds 0 1 2]

Writes ``benchmarks/peers.{json,md}``; rows are appended as they finish (a killed run resumes). A peer
that cannot be imported or run gets a row that says why.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

# the precision-plan benchmark's synthetic pillar model, val frames and per-frame matches (tools/ is on the path)
from benchmark_precision_plan import MODEL, build_model, evaluate, frames_path, pillar_val_loader
from machine import describe_machine
from mmengine.config import Config

import lidar_ptq.mmdet3d  # noqa: F401  (registries)
from lidar_ptq.mmdet3d.adapter import DetectorAdapter
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
from lidar_ptq.mmdet3d.export import DenseNetwork, capture_part_inputs
from lidar_ptq.mmdet3d.intervals import MatchTable, bootstrap_map_file
from lidar_ptq.stats import paired_interval, resample_weights

ROOT = Path(__file__).resolve().parents[1]
# the LiDAR-PTQ default's per-frame matches, written by tools/benchmark_lidar.py (same frames, same draws)
LIDAR_PTQ_FRAMES = ROOT / "benchmarks/frames/lidar" / MODEL
PEERS = ("modelopt", "aimet_quantsim", "aimet_adaround")
BOOTSTRAP_RESAMPLES = 1000


def bev_maps(adapter: DetectorAdapter, batches: list[Any]) -> list[torch.Tensor]:
    """The dense network's input (the scattered BEV map) for every calibration batch."""
    backbone = adapter.part_names[2]
    return [capture_part_inputs(adapter, batch)[0][backbone][0] for batch in batches]


def install_dense(adapter: DetectorAdapter, dense: torch.nn.Module) -> None:
    """Point the detector at ``dense``'s parts (a peer may return a copy of the network it quantized)."""
    names = adapter.part_names
    parts = [dense.backbone, *([dense.neck] if len(names) == 5 else []), dense.head]
    for name, part in zip([names[2], *names[3:]], parts):
        setattr(adapter, name, part)
    adapter.sync()


def modelopt(dense: DenseNetwork, bevs: list[torch.Tensor], args: argparse.Namespace, work: Path
             ) -> torch.nn.Module:
    import modelopt.torch.quantization as mtq

    def forward_loop(model: torch.nn.Module) -> None:
        for bev in bevs:
            model(bev)
    return mtq.quantize(dense, mtq.INT8_DEFAULT_CFG, forward_loop)


def aimet_ready(dense: torch.nn.Module) -> torch.nn.Module:
    """AIMET refuses module types it has no quantized definition for: mmcv's ConvTranspose2d wrapper (the
    same operator as torch's) becomes torch's, and the head's loss modules (never called at inference)
    are set aside."""
    for parent in list(dense.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ConvTranspose2d) and type(child) is not torch.nn.ConvTranspose2d:
                plain = torch.nn.ConvTranspose2d(child.in_channels, child.out_channels, child.kernel_size,
                                                 child.stride, child.padding, child.output_padding, child.groups,
                                                 child.bias is not None, child.dilation)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
            elif type(child).__name__.endswith("Loss"):
                setattr(parent, name, None)
    return dense


def _quantsim(dense: torch.nn.Module, bevs: list[torch.Tensor], encodings: Path | None = None) -> Any:
    from aimet_torch.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(dense, dummy_input=bevs[0], default_param_bw=8, default_output_bw=8)
    if encodings is not None:
        sim.set_and_freeze_param_encodings(encoding_path=str(encodings))
    sim.compute_encodings(lambda model, _: [model(bev) for bev in bevs], None)
    return sim.model


def aimet_quantsim(dense: DenseNetwork, bevs: list[torch.Tensor], args: argparse.Namespace, work: Path
                   ) -> torch.nn.Module:
    return _quantsim(aimet_ready(dense), bevs)


def aimet_adaround(dense: DenseNetwork, bevs: list[torch.Tensor], args: argparse.Namespace, work: Path
                   ) -> torch.nn.Module:
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters

    params = AdaroundParameters(data_loader=[bev for bev in bevs], num_batches=len(bevs),
                                default_num_iterations=args.adaround_iterations,
                                forward_fn=lambda model, bev: model(bev))
    rounded = Adaround.apply_adaround(aimet_ready(dense), bevs[0], params, path=str(work), filename_prefix="adaround",
                                      default_param_bw=8)
    return _quantsim(rounded, bevs, work / "adaround.encodings")


APPLY: dict[str, Callable[[DenseNetwork, list[torch.Tensor], argparse.Namespace, Path], torch.nn.Module]] = {
    "modelopt": modelopt, "aimet_quantsim": aimet_quantsim, "aimet_adaround": aimet_adaround}


def package_version(peer: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    name = "nvidia-modelopt" if peer == "modelopt" else "aimet-torch"
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_row(peer: str, seed: int, cfg: Config, loader: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize the dense network with ``peer`` on draw ``seed`` and evaluate; a failure is a row too."""
    row: dict[str, Any] = {"model": MODEL, "peer": peer, "seed": seed, "version": package_version(peer)}
    model = build_model(cfg)
    adapter = DetectorAdapter(model)
    batches = collect_batches(model, build_calibration_loader(cfg, args.calib_frames, seed), progress=False)
    bevs = bev_maps(adapter, batches)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as work, nullcontext() if peer == "aimet_adaround" else torch.no_grad():
            install_dense(adapter, APPLY[peer](DenseNetwork(adapter), bevs, args, Path(work)))
    except Exception as err:  # a peer that does not run on this model is a result, reported with its reason
        row.update(status="failed", reason=f"{type(err).__name__}: {err}"[:400],
                   where=traceback.format_exc().strip().splitlines()[-3:-1])
        return row
    row["ptq_seconds"] = round(time.perf_counter() - start, 1)
    row.update(status="ok", map=evaluate(model, loader, cfg, args.out, f"{peer}_seed{seed}"))
    return row


def intervals(result: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Per peer: the difference to FP32 and to the LiDAR-PTQ default (x100), bootstrap over frames and draws."""
    fp32_path = frames_path(out, "fp32")
    if not fp32_path.is_file():
        return {}
    base_table = MatchTable.load(fp32_path)
    weights = resample_weights(base_table.frames, BOOTSTRAP_RESAMPLES, seed=0)
    base = bootstrap_map_file(fp32_path, weights)
    lidar_ptq = [LIDAR_PTQ_FRAMES / f"lidar_ptq_w8a8_seed{s}.npz" for s in result["meta"]["seeds"]]
    paired = all(p.is_file() and MatchTable.load(p).frames == base_table.frames for p in lidar_ptq)
    theirs = [bootstrap_map_file(p, weights) for p in lidar_ptq] if paired else None
    found: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        paths = [frames_path(out, f"{peer}_seed{r['seed']}") for r in result["rows"]
                 if r["peer"] == peer and r["status"] == "ok"]
        if not paths or not all(p.is_file() for p in paths):
            continue
        samples = [bootstrap_map_file(p, weights) for p in paths]
        found[peer] = {"fp32": paired_interval(samples, [base]).as_dict()}
        if theirs is not None:
            found[peer]["lidar_ptq"] = paired_interval(theirs, samples).as_dict()
    return found


def _cell(gap: dict[str, Any] | None) -> str:
    if gap is None:
        return "-"
    return f"{gap['delta']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]" + ("" if gap["resolved"] else " (unresolved)")


def write_outputs(result: dict[str, Any], out: Path) -> None:
    # a peer whose per-frame matches are not on this machine keeps the interval the JSON holds
    result["intervals"] = {**result.get("intervals", {}), **intervals(result, out)}
    out.write_text(json.dumps(result, indent=1))
    meta = result["meta"]
    lines = ["# Peers: NVIDIA ModelOpt and Qualcomm AIMET on the synthetic CenterPoint-Pillar", "",
             meta["note"], "", f"Command: `{meta['command']}`; machine: {meta['machine']}, load average (1 min) "
             f"{meta.get('load_before', float('nan')):.2f} before the run.", "",
             "| peer | version | mAP (per draw) | delta vs FP32 [95% CI] | LiDAR-PTQ default minus peer [95% CI] | "
             "PTQ seconds (per draw) |", "|---|---|---|---|---|---|"]
    if "fp32_map" in meta:
        lines.append(f"| FP32 | - | {100 * meta['fp32_map']:.2f} | - | - | - |")
    for peer in PEERS:
        rows = sorted((r for r in result["rows"] if r["peer"] == peer), key=lambda r: r["seed"])
        if not rows:
            continue
        failed = [r for r in rows if r["status"] != "ok"]
        if failed:
            lines.append(f"| {peer} | {rows[0]['version']} | did not run: {failed[0]['reason']} | - | - | - |")
            continue
        gaps = result["intervals"].get(peer, {})
        maps = " / ".join(f"{100 * r['map']:.2f}" for r in rows)
        seconds = " / ".join(f"{r['ptq_seconds']:.0f}" for r in rows)
        lines.append(f"| {peer} | {rows[0]['version']} | {maps} | {_cell(gaps.get('fp32'))} | "
                     f"{_cell(gaps.get('lidar_ptq'))} | {seconds} |")
    lines += ["", meta["environment"]] if meta.get("environment") else []
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def table_command(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The command that gives the whole table: a run that adds one peer to a resumed file names the others too."""
    peers = [p for p in PEERS if p in args.peers or any(r["peer"] == p for r in rows)]
    return (f"python tools/benchmark_peers.py --peers {' '.join(peers)} --seeds {' '.join(map(str, args.seeds))} "
            f"--val-frames {args.val_frames}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-frames", type=int, default=1000)
    parser.add_argument("--calib-frames", type=int, default=16)
    parser.add_argument("--adaround-iterations", type=int, default=40,
                        help="per layer; the LiDAR-PTQ rows reconstruct each unit this long")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.json")
    parser.add_argument("--note", help="a sentence for the report (e.g. how the peers were installed); kept")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        write_outputs(json.loads(args.out.read_text()), args.out)
        return 0
    cfg, loader = pillar_val_loader(args.val_frames)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    if args.note is not None:
        result["meta"] = {**result.get("meta", {}), "environment": args.note}
    result["meta"] = {**result.get("meta", {}), "val_frames": args.val_frames, "calib_frames": args.calib_frames,
                      "seeds": args.seeds, "adaround_iterations": args.adaround_iterations,
                      **describe_machine(),
                      "command": table_command(result["rows"], args),
                      "note": ("Synthetic CenterPoint-Pillar; each peer quantizes the dense network (backbone, "
                               "neck, head) W8A8 with its own default and leaves the pillar encoder float (the "
                               "LiDAR-PTQ rows quantize it too); "
                               f"{args.calib_frames} calibration frames per draw (draws "
                               f"{', '.join(map(str, args.seeds))}, the LiDAR-PTQ rows' draws); AdaRound "
                               f"{args.adaround_iterations} iterations per layer. mAP on the first "
                               f"{args.val_frames} val frames (nuScenes-style, centre distance 0.5/1/2/4 m); "
                               "intervals resample val frames and draws; the LiDAR-PTQ column pairs each peer "
                               "with the default LiDAR-PTQ recipe of benchmarks/lidar.md.")}
    if "fp32_map" not in result["meta"] or not frames_path(args.out, "fp32").is_file():
        result["meta"]["fp32_map"] = evaluate(build_model(cfg), loader, cfg, args.out, "fp32")
        write_outputs(result, args.out)
    for peer in args.peers:
        for seed in args.seeds:
            if any(r["peer"] == peer and r["seed"] == seed and r["status"] == "ok" for r in result["rows"]):
                continue
            row = run_row(peer, seed, cfg, loader, args)
            result["rows"] = [r for r in result["rows"] if (r["peer"], r["seed"]) != (peer, seed)] + [row]
            write_outputs(result, args.out)
            print(f"{peer} draw {seed}: {row['status']} "
                  f"{'mAP %.2f' % (100 * row['map']) if 'map' in row else row.get('reason', '')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
