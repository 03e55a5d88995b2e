"""Export a quantized mmdet3d detector for Jetson deployment, and verify the files on the CPU.

Split as in NVIDIA's CUDA-CenterPoint / mmdeploy: voxelization, the pillar
scatter, box decoding and NMS stay in the application; the files are

* ``pillar_encoder.onnx`` (Pillar) / ``voxel_encoder.onnx`` (Voxel with a learned
  encoder such as HardVFE): decorated points -> pillar/voxel features, Q/DQ;
* ``sparse_backbone.onnx`` (Voxel): the SparseEncoder in libspconv's ONNX layout;
* ``dense.onnx``: BEV map -> CenterHead maps (backbone, neck, head), Q/DQ for TensorRT;
* ``*.fp32.onnx`` + ``*.calib.cache`` + ``*.ranges.json``: TensorRT's implicit-INT8 route;
* ``manifest.json``: files, I/O names and shapes, precisions, the glue the
  application implements, and the verification numbers measured here.

Everything is written into a temporary folder and moved into place at the end,
so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from mmdet3d.models.layers.sparse_block import SparseBasicBlock
from mmdet3d.models.middle_encoders import SparseEncoder
from torch import nn

from .. import __version__
from ..export.checks import ExportError, require_exportable
from ..export.onnx_qdq import export_onnx
from ..export.runtime import ort_session
from ..export.sparse_onnx import (
    SparseGraph,
    emit_add,
    emit_module,
    emit_scatter_dense,
    emit_sparse_conv,
    export_sparse_onnx,
    register_sparse_emitter,
)
from ..export.tensorrt import activation_ranges, shared_range_tensors, strip_qdq, write_dynamic_ranges
from ..export.verify import layerwise_agreement
from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import QuantMode, temporary_quant_mode
from .adapter import DetectorAdapter, DetectorBatch, unwrap_model

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


# ----- libspconv emitters for mmdet3d's sparse modules ----------------------------------------------
@register_sparse_emitter(SparseBasicBlock)
def _emit_basic_block(graph: SparseGraph, name: str, block: nn.Module, x: str) -> str:
    h = emit_sparse_conv(graph, f"{name}.conv1", block.conv1, x, activation="ReLU")
    h = emit_sparse_conv(graph, f"{name}.conv2", block.conv2, h, activation="None")
    identity = x if block.downsample is None else emit_module(graph, f"{name}.downsample", block.downsample, x)
    added = emit_add(graph, f"{name}.add", h, identity, getattr(block, "add_quantizer", None))
    return emit_module(graph, f"{name}.relu", nn.ReLU(), added)


def _emit_sparse_encoder(graph: SparseGraph, name: str, encoder: SparseEncoder, x: str, batch_size: int) -> str:
    x = emit_module(graph, f"{name}.conv_input", encoder.conv_input, x)
    x = emit_module(graph, f"{name}.encoder_layers", encoder.encoder_layers, x)
    x = emit_module(graph, f"{name}.conv_out", encoder.conv_out, x)
    last = [m for m in encoder.conv_out.modules() if hasattr(m, "indice_key")][-1]
    last_name = next(n for n, m in encoder.named_modules() if m is last)
    spatial = graph.shapes[f"{name}.{last_name}"][1]
    return emit_scatter_dense(graph, f"{name}.scatter", x, list(spatial), batch_size, last.out_channels)


# ----- dense part ---------------------------------------------------------------------------------
def flatten_outputs(output: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Head outputs (tuple over levels of lists over tasks of dicts) as named tensors in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)]
    if isinstance(output, dict):
        items = output.items()
    else:
        seq = list(output)
        if len(seq) == 1 and not isinstance(seq[0], torch.Tensor):
            return flatten_outputs(seq[0], prefix)
        first = seq[0] if seq else None
        while isinstance(first, (list, tuple)) and len(first) == 1:
            first = first[0]
        label = "task" if isinstance(first, dict) else "out"  # CenterHead: tuple over tasks of [dict]
        items = ((f"{label}{i}", v) for i, v in enumerate(seq))
    named: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        named += flatten_outputs(value, f"{prefix}_{key}" if prefix else str(key))
    return named


def unflatten_outputs(template: Any, flat: list[Any]) -> Any:
    """Rebuild ``template``'s nesting from a flat list (ONNX Runtime's outputs back into the head's format)."""
    flat = list(flat)

    def build(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return torch.as_tensor(flat.pop(0))
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        return type(node)(build(v) for v in node)
    return build(template)


class DenseNetwork(nn.Module):
    """BEV map -> flat head outputs: what TensorRT runs."""

    def __init__(self, adapter: DetectorAdapter) -> None:
        super().__init__()
        names = adapter.part_names
        self.backbone = getattr(adapter, names[2])
        self.neck = getattr(adapter, names[3]) if len(names) == 5 else None
        self.head = adapter.head

    def structured(self, bev: torch.Tensor) -> Any:
        x = self.backbone(bev)
        if self.neck is not None:
            x = self.neck(x)
        return self.head(x)

    def forward(self, bev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flatten_outputs(self.structured(bev)))


class PointEncoder(nn.Module):
    """The points of each pillar/voxel -> its features (PillarFeatureNet, HardVFE) with the arguments fixed."""

    def __init__(self, voxel_encoder: nn.Module) -> None:
        super().__init__()
        self.voxel_encoder = voxel_encoder

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> torch.Tensor:
        return self.voxel_encoder(voxels, num_points, coors)


def capture_part_inputs(adapter: DetectorAdapter, batch: DetectorBatch) -> tuple[dict[str, tuple], Any]:
    """Run one batch and keep the positional inputs of every part (the export samples), and the head output."""
    captured: dict[str, tuple] = {}
    handles = [getattr(adapter, name).register_forward_pre_hook(
        lambda mod, args, _n=name: captured.setdefault(_n, args)) for name in adapter.part_names]
    try:
        with torch.no_grad():
            output = adapter(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured, output


def _first_input_quantizer(module: nn.Module) -> Any:
    return next((m.input_quantizer for m in module.modules() if isinstance(m, QuantModuleMixin)
                 and m.input_quantizer.enabled and m.input_quantizer.calibrated), None)


def _io(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out.append({"name": v.name, "shape": dims,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name})
        return out
    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def _ort_run(path: Path, feeds: dict[str, np.ndarray], optimized: bool = True) -> list[np.ndarray]:
    return ort_session(path, optimized).run(None, feeds)


def _steps(diff: float, quantizer: Any) -> float | None:
    return None if quantizer is None else float(diff / quantizer.scale.detach().float().max().item())


def _export_dense_file(module: nn.Module, args: tuple, directory: Path, stem: str, input_names: list[str],
                       output_names: list[str], dynamic_axes: dict | None) -> dict[str, Any]:
    """``<stem>.onnx`` (Q/DQ), ``<stem>.fp32.onnx`` and its dynamic ranges; returns manifest entries."""
    proto = export_onnx(module, args, directory / f"{stem}.onnx", input_names, output_names,
                        dynamic_axes=dynamic_axes)
    ranges = activation_ranges(proto)
    merged = shared_range_tensors(proto)
    onnx.save(strip_qdq(proto), str(directory / f"{stem}.fp32.onnx"))
    cache = write_dynamic_ranges(ranges, directory, stem)
    fp16_layers = [name for name, m in module.named_modules() if isinstance(m, QuantModuleMixin)
                   and not m.weight_quantizer.enabled and not m.input_quantizer.enabled]
    entry = {"format": "onnx-qdq (explicit int8: symmetric, per-channel weights, per-tensor activations)",
             "opset": proto.opset_import[0].version, **_io(proto),
             "quantized_activations": len(ranges), "fp16_layers": fp16_layers}
    cache_note = {"format": "TensorRT calibration cache (scale = amax / 127)"}
    if merged:
        cache_note["merged_ranges"] = (f"{len(merged)} tensor(s) feed several quantizers with different ranges; "
                                       "the cache holds the largest (the Q/DQ file keeps each)")
    return {f"{stem}.onnx": entry,
            f"{stem}.fp32.onnx": {"format": "onnx float (weights on their int8 grid; names match the ranges)",
                                  **_io(proto)},
            cache["calibration_cache"].name: cache_note,
            cache["dynamic_ranges"].name: {"format": "JSON {tensor: amax}"}}


def _compare_dense(named: list[tuple[str, torch.Tensor]], got: list[np.ndarray], head: nn.Module, reference: Any,
                   metas: list[dict]) -> dict[str, Any]:
    """Per output: largest difference and the share of elements off by more than one int8 step of the
    output's range; and the decoded boxes of both."""
    per_output = {}
    for (name, ref), out in zip(named, got):
        ref_np = ref.detach().cpu().numpy()
        step = float(np.abs(ref_np).max()) / 127 or 1.0
        diff = np.abs(out - ref_np)
        per_output[name] = {"max_abs_diff": float(diff.max()), "max_diff_steps": float(diff.max() / step),
                            "share_over_1_step": float((diff > step).mean())}
    return {"outputs": per_output, "worst_diff_steps": max(v["max_diff_steps"] for v in per_output.values()),
            "worst_share_over_1_step": max(v["share_over_1_step"] for v in per_output.values()),
            "detections": _match_detections(head, reference, unflatten_outputs(reference, got), metas)}


def decode_head_outputs(head: nn.Module, outputs: Any, metas: list[dict]) -> Any:
    """The first frame's boxes from raw head outputs, through the head's own ``predict_by_feat``.
    CenterHead takes its per-task output as one argument; anchor heads take (cls, box, dir) maps as three."""
    params = inspect.signature(head.predict_by_feat).parameters
    leading = list(params)[:list(params).index("batch_input_metas")]
    args = (outputs,) if len(leading) == 1 else tuple(outputs)[:len(leading)]
    with torch.no_grad():
        return head.predict_by_feat(*args, batch_input_metas=metas)[0]


def _match_detections(head: nn.Module, reference: Any, candidate: Any, metas: list[dict]) -> dict[str, Any]:
    """Decode both head outputs with the head's own decoder and compare boxes (center distance, label).
    A head whose outputs its decoder cannot take back is reported as not compared, never a crash."""
    try:
        ref, got = decode_head_outputs(head, reference, metas), decode_head_outputs(head, candidate, metas)
    except Exception as error:  # any head: the maps above were compared already
        return {"compared": False, "reason": f"{type(head).__name__}.predict_by_feat failed: "
                                             f"{type(error).__name__}: {error}"}
    rb, gb = ref.bboxes_3d.tensor[:, :3], got.bboxes_3d.tensor[:, :3]
    matched, score_diff = 0, 0.0
    if len(rb) and len(gb):
        dist = torch.cdist(rb, gb)
        same = ref.labels_3d[:, None] == got.labels_3d[None, :]
        dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
        best, idx = dist.min(dim=1)
        ok = best < 0.1
        matched = int(ok.sum())
        if matched:
            score_diff = float((ref.scores_3d[ok] - got.scores_3d[idx[ok]]).abs().max())
    return {"compared": True, "boxes_pytorch": len(rb), "boxes_onnx": len(gb), "matched_within_10cm": matched,
            "max_score_diff_matched": score_diff}


@dataclass
class _Part:
    """What exporting one part adds to the manifest."""
    files: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)


def _export_sparse_backbone(adapter: DetectorAdapter, inputs: dict[str, tuple], folder: Path, dense: nn.Module,
                            precision: dict[str, str] | None, output_bound: int, verify: bool) -> _Part:
    voxel_encoder, middle = (getattr(adapter, n) for n in adapter.part_names[:2])
    name = adapter.part_names[1]
    feats, coors, batch_size = inputs[name][:3]
    batch_size = int(batch_size)
    proto = export_sparse_onnx(
        middle, lambda: middle(feats, coors, batch_size), folder / "sparse_backbone.onnx",
        in_channels=feats.shape[1], spatial_shape=list(middle.sparse_shape), batch_size=batch_size,
        emit=lambda g, x: _emit_sparse_encoder(g, name, middle, x, batch_size),
        precision_overrides=precision, output_bound=output_bound, prefix=name)
    convs = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "precision")).decode()
             for n in proto.graph.node if n.op_type == "SparseConvolution"}
    fp16_layers = [n for n, p in convs.items() if p == "fp16"]
    learned = _has_weights(voxel_encoder)
    part = _Part(pipeline=[*([] if learned else ["voxel features = mean of each voxel's points (HardSimpleVFE)"]),
                           "sparse_backbone.onnx on libspconv -> BEV map"])
    part.files["sparse_backbone.onnx"] = {
        "format": "libspconv ONNX (SparseConvolution/Add/Relu/ScatterDense/Reshape, FP16 initialisers)",
        "inputs": [{"name": "voxel_features", "shape": ["num_voxels", int(feats.shape[1])], "dtype": "float16"},
                   {"name": "indices (engine argument)", "shape": ["num_voxels", 4], "dtype": "int32",
                    "order": "batch, z, y, x"}],
        "outputs": _io(proto)["outputs"], "sparse_shape": list(middle.sparse_shape),
        "layers_int8": len(convs) - len(fp16_layers), "layers_fp16": len(fp16_layers), "fp16_layers": fp16_layers}
    if verify:
        from ..export.sparse_check import SparseOnnxRunner
        with torch.no_grad(), temporary_quant_mode(_named_layers(middle, fp16_layers, name), QuantMode.FLOAT):
            ref = middle(feats, coors, batch_size).cpu()  # the model the file means: FP16 layers unquantized
        diff = (SparseOnnxRunner(folder / "sparse_backbone.onnx")(feats.cpu(), coors.cpu(), batch_size) - ref).abs()
        step = _first_input_quantizer(dense)
        part.verification["sparse_backbone"] = {
            "max_abs_diff": float(diff.max()), "max_abs": float(ref.abs().max()),
            "diff_in_steps_of_next_quantizer": _steps(float(diff.max()), step),
            "share_over_1_step": None if step is None else float((diff > step.scale.float().max()).float().mean()),
            "checker": "lidar_ptq.export.sparse_check (spconv rebuild from the ONNX)"}
    return part


POINT_ENCODER_INPUTS = ["voxels", "num_points", "coors"]


def _has_weights(module: nn.Module) -> bool:
    return any(p.numel() for p in module.parameters())


def _export_point_encoder(adapter: DetectorAdapter, inputs: dict[str, tuple], folder: Path, reader: nn.Module,
                          verify: bool, kind: str) -> _Part:
    """``{kind}_encoder.onnx``: the points of each pillar/voxel -> its feature vector (``kind``: pillar|voxel).

    ``reader`` is the network that consumes the features (its first quantizer sizes the verification)."""
    encoder = PointEncoder(getattr(adapter, adapter.part_names[0])).eval()
    args = tuple(inputs[adapter.part_names[0]][:3])
    stem, features = f"{kind}_encoder", f"{kind}_features"
    dynamic = {n: {0: f"num_{kind}s"} for n in [*POINT_ENCODER_INPUTS, features]}
    next_step = (["scatter pillar features into the BEV canvas (application; see 'scatter')"] if kind == "pillar"
                 else [])
    part = _Part(files=_export_dense_file(encoder, args, folder, stem, POINT_ENCODER_INPUTS, [features], dynamic),
                 pipeline=[f"{stem}.onnx (TensorRT) -> {kind} features", *next_step])
    if verify:
        with torch.no_grad():
            ref = encoder(*args).cpu().numpy()
        feeds = {n: a.cpu().numpy() for n, a in zip(POINT_ENCODER_INPUTS, args)}
        # As for the dense network: the reference kernels check what the file computes; the optimized ones
        # are what this CPU's onnxruntime runs (its int8 kernels can saturate on CPUs without VNNI).
        diff, fused = (float(np.abs(_ort_run(folder / f"{stem}.onnx", feeds, optimized)[0] - ref).max())
                       for optimized in (False, True))
        quantizer = _first_input_quantizer(reader)
        part.verification[stem] = {
            "max_abs_diff": diff, "max_abs": float(np.abs(ref).max()),
            "diff_in_steps_of_next_quantizer": _steps(diff, quantizer),
            "optimized_kernels_diff_in_steps": _steps(fused, quantizer),
            "layerwise": layerwise_agreement(encoder, args, folder / f"{stem}.onnx", POINT_ENCODER_INPUTS)}
    return part


def _export_dense(adapter: DetectorAdapter, dense: nn.Module, bev: torch.Tensor, head_output: Any,
                  batch: DetectorBatch, folder: Path, verify: bool) -> _Part:
    named = flatten_outputs(head_output)
    part = _Part(files=_export_dense_file(dense, (bev,), folder, "dense", ["bev"], [n for n, _ in named], None),
                 pipeline=["dense.onnx (TensorRT) -> head maps",
                           "decode boxes + NMS (application; CenterHead.predict)"])
    if verify:
        metas = [s.metainfo for s in batch.data_samples]
        feeds = {"bev": bev.cpu().numpy()}
        result: dict[str, Any] = {
            kind: _compare_dense(named, _ort_run(folder / "dense.onnx", feeds, optimized), adapter.head,
                                 head_output, metas)
            for kind, optimized in (("reference_kernels", False), ("optimized_kernels", True))}
        result["runtime"] = "onnxruntime CPU"
        result["layerwise"] = layerwise_agreement(dense, (bev,), folder / "dense.onnx", ["bev"])
        part.verification["dense"] = result
    return part


@contextlib.contextmanager
def _assembled_aside(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``out_dir`` only if the block succeeds (nothing half-written)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_detector(model: nn.Module, batch: DetectorBatch, out_dir: str | os.PathLike,
                    sparse_precision: dict[str, str] | None = None, verify: bool = True,
                    output_bound: int = 200000) -> dict[str, Any]:
    """Export the quantized ``model`` (BNs folded, calibrated) into ``out_dir``; returns the manifest.

    ``batch`` is one preprocessed frame: it traces the networks, records the sparse
    shapes and, with ``verify``, is run through ONNX Runtime / the libspconv reader
    to measure agreement with the PyTorch fake-quant model.
    """
    detector = unwrap_model(model)
    adapter = DetectorAdapter(detector).eval()
    if not any(isinstance(m, QuantModuleMixin) for m in adapter.modules()):
        raise ExportError("the model is not quantized: run tools/quantize.py first (or load its quantized.pth)")
    if batch.num_frames != 1:
        raise ValueError("export traces batch size 1: pass a single-frame batch")
    require_exportable(adapter, symmetric=True)  # before anything runs or is written: names every problem
    start = time.perf_counter()
    middle = getattr(adapter, adapter.part_names[1])
    with _assembled_aside(Path(out_dir)) as folder:
        inputs, head_output = capture_part_inputs(adapter, batch)
        dense = DenseNetwork(adapter).eval()
        sparse = isinstance(middle, SparseEncoder)
        parts = []
        if not sparse or _has_weights(getattr(adapter, adapter.part_names[0])):
            parts.append(_export_point_encoder(adapter, inputs, folder, middle if sparse else dense, verify,
                                               "voxel" if sparse else "pillar"))
        if sparse:
            parts.append(_export_sparse_backbone(adapter, inputs, folder, dense, sparse_precision, output_bound,
                                                 verify))
        parts.append(_export_dense(adapter, dense, inputs[adapter.part_names[2]][0], head_output, batch, folder,
                                   verify))
        manifest = {
            "format_version": MANIFEST_VERSION, "producer": f"lidar_ptq {__version__}",
            "detector": type(detector).__name__, "files": {k: v for p in parts for k, v in p.files.items()},
            "pipeline": ["voxelize points (application; settings under 'voxelization')",
                         *(line for p in parts for line in p.pipeline)],
            "voxelization": _voxelization(detector), "scatter": _scatter(middle),
            "head": {"type": type(adapter.head).__name__, "outputs": [n for n, _ in flatten_outputs(head_output)]},
            "verification": {k: v for p in parts for k, v in p.verification.items()},
            "seconds": round(time.perf_counter() - start, 2)}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    log.info("exported %s to %s in %.1f s", ", ".join(sorted(manifest["files"])), out_dir, manifest["seconds"])
    return manifest


def _named_layers(module: nn.Module, names: list[str], prefix: str) -> list[nn.Module]:
    """The submodules of ``module`` whose ``<prefix>.<name>`` is in ``names`` (the FP16-override layers)."""
    return [layer for name, layer in module.named_modules() if f"{prefix}.{name}" in names]


def _voxelization(detector: nn.Module) -> dict[str, Any]:
    layer = getattr(getattr(detector, "data_preprocessor", None), "voxel_layer", None)
    if layer is None:
        return {}
    keys = ("voxel_size", "point_cloud_range", "max_num_points", "max_voxels")
    return {k: (list(map(float, v)) if isinstance(v, (list, tuple)) and k != "max_voxels" else v)
            for k in keys if (v := getattr(layer, k, None)) is not None}


def _scatter(middle: nn.Module) -> dict[str, Any]:
    if isinstance(middle, SparseEncoder):
        return {"done_by": "sparse_backbone.onnx (ScatterDense)"}
    return {"done_by": "application", "canvas": [getattr(middle, "in_channels", None), getattr(middle, "ny", None),
                                                 getattr(middle, "nx", None)],
            "rule": "canvas[:, y, x] = pillar_features[i] for coors[i] = (batch, z, y, x); zeros elsewhere"}


def sample_batch(cfg: Any, detector: nn.Module, seed: int = 0) -> DetectorBatch:
    """One preprocessed training frame (test pipeline) to trace and verify the export with."""
    from .calibration import build_calibration_loader, collect_batches
    return collect_batches(unwrap_model(detector), build_calibration_loader(cfg, 1, seed), progress=False)[0]


def summarize(manifest: dict[str, Any]) -> str:
    """A few lines for the console: files and the verification numbers."""
    lines = [f"files: {', '.join(sorted(manifest['files']))}"]
    for part, result in manifest["verification"].items():
        if "layerwise" in result:
            lw = result["layerwise"]
            lines.append(f"{part}: layer by layer (teacher-forced, {lw['quantizers']} quantizers): max code diff "
                         f"{lw['max_code_diff']:.0f}, {100 * lw['differing_code_share']:.4f}% of codes differ"
                         + (f"; NOT IN FILE: {', '.join(lw['missing_in_file'])}" if lw["missing_in_file"] else ""))
        if part == "dense":
            for kind in ("reference_kernels", "optimized_kernels"):
                r = result[kind]
                det = r["detections"]
                boxes = (f"boxes matched {det['matched_within_10cm']}/{det['boxes_pytorch']} (onnx "
                         f"{det['boxes_onnx']}), max score diff {det['max_score_diff_matched']:.2e}"
                         if det["compared"] else f"boxes not compared ({det['reason']})")
                lines.append(f"dense, onnxruntime {kind.replace('_', ' ')} vs PyTorch: worst output diff "
                             f"{r['worst_diff_steps']:.2f} int8 steps ({100 * r['worst_share_over_1_step']:.2f}% "
                             f"of elements > 1 step); {boxes}")
        else:
            steps = result.get("diff_in_steps_of_next_quantizer")
            share = result.get("share_over_1_step")
            lines.append(f"{part}: max abs diff {result['max_abs_diff']:.3e}"
                         + (f" ({steps:.3f} steps of the next quantizer)" if steps is not None else "")
                         + (f", {100 * share:.4f}% of elements > 1 step" if share is not None else ""))
    return "\n".join(lines)
