"""TensorRT's implicit-quantization route: per-tensor dynamic ranges for a float network.

Explicit quantization (the Q/DQ ONNX) is the recommended TensorRT route. For
builds that set dynamic ranges instead, this module derives from the Q/DQ ONNX
(1) the float ONNX with the same tensor names (Q/DQ removed, weights
dequantized, so already on their integer grid) and (2) the range of every
quantized activation as a TensorRT calibration cache (``name: hex(float32
scale)`` lines under a ``TRT-<version>-EntropyCalibration2`` header) and as JSON.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_graph import constant_values, consumers, producers, prune_unused

DEFAULT_CACHE_HEADER = "TRT-8601-EntropyCalibration2"


def activation_quantizers(proto: onnx.ModelProto) -> dict[str, list[float]]:
    """``{tensor name: [amax of each QuantizeLinear reading it]}`` for every quantized activation."""
    values = constant_values(proto)
    found: dict[str, list[float]] = {}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in values:
            continue
        scale = values[node.input[1]]
        zero_point = values[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale.size != 1:
            raise ValueError(f"activation {node.input[0]} has a per-channel scale; TensorRT ranges are per tensor")
        qmax = 127 if zero_point.dtype == np.int8 else 255
        found.setdefault(node.input[0], []).append(float(scale.reshape(()) * (qmax - int(zero_point.reshape(())))))
    return found


def activation_ranges(proto: onnx.ModelProto) -> dict[str, float]:
    """``{tensor name: amax}``. A range is per tensor in TensorRT's implicit mode, so a tensor read by
    several quantizers (a shared feature map feeding several head branches) gets the largest of their
    ranges; ``shared_range_tensors`` lists those (the Q/DQ file keeps every consumer's own scale)."""
    return {name: max(amaxes) for name, amaxes in activation_quantizers(proto).items()}


def shared_range_tensors(proto: onnx.ModelProto) -> dict[str, list[float]]:
    """Tensors whose quantizers disagree on the range (only the largest survives in the cache)."""
    return {name: amaxes for name, amaxes in activation_quantizers(proto).items()
            if len(amaxes) > 1 and not np.allclose(amaxes, amaxes[0], rtol=1e-6)}


def strip_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy: activation Q->DQ pairs removed (consumers read the Q input, so names match the
    ranges), DequantizeLinear of integer weights replaced by the dequantized float initialiser."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    values = constant_values(out)
    users = consumers(out)
    producer = producers(out)
    graph_outputs = {o.name for o in out.graph.output}
    remove = []
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        if source in values:  # weight: DQ(codes) -> float initialiser
            codes = values[source].astype(np.float32)
            scale = values[node.input[1]].astype(np.float32)
            zero_point = values[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            if scale.size > 1:
                shape[axis] = -1
            weight = (codes - zero_point.reshape(shape)) * scale.reshape(shape)
            out.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), node.output[0]))
            remove.append(node)
            continue
        quant = producer.get(source)
        if quant is None or quant.op_type != "QuantizeLinear":
            continue
        original = quant.input[0]
        if node.output[0] in graph_outputs:
            raise ValueError(f"graph output {node.output[0]} is a DequantizeLinear; cannot strip it by renaming")
        for user in users.get(node.output[0], []):
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = original
        remove += [node]
        if all(u.op_type == "DequantizeLinear" for u in users.get(source, [])):
            remove.append(quant)
    for node in {id(n): n for n in remove}.values():
        out.graph.node.remove(node)
    prune_unused(out)
    onnx.checker.check_model(out)
    return out


def scale_hex(amax: float, qmax: int = 127) -> str:
    """TensorRT cache encoding: the float32 scale's IEEE-754 bits as 8 hex digits."""
    return f"{struct.unpack('<I', struct.pack('<f', amax / qmax))[0]:08x}"


def write_dynamic_ranges(ranges: dict[str, float], directory: str | os.PathLike, stem: str,
                         header: str = DEFAULT_CACHE_HEADER) -> dict[str, Path]:
    """``<stem>.calib.cache`` (TensorRT calibration cache) and ``<stem>.ranges.json`` ({tensor: amax})."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cache = directory / f"{stem}.calib.cache"
    table = directory / f"{stem}.ranges.json"
    cache.write_text(header + "\n" + "".join(f"{name}: {scale_hex(amax)}\n" for name, amax in ranges.items()))
    table.write_text(json.dumps({"format": "amax per tensor (symmetric int8: scale = amax / 127)",
                                 "ranges": ranges}, indent=1))
    return {"calibration_cache": cache, "dynamic_ranges": table}


def read_calibration_cache(path: str | os.PathLike) -> dict[str, float]:
    """Parse a TensorRT calibration cache back into ``{tensor: scale}`` (for checks and tooling)."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise ValueError(f"{path} is not a TensorRT calibration cache (first line must start with 'TRT-')")
    scales = {}
    for line in lines[1:]:
        name, _, value = line.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return scales
