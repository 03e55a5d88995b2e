"""An independent reader of the libspconv ONNX: rebuild the network with spconv and run it.

It uses nothing of the model that was exported, only the file: weights from the
FP16 initialisers, geometry and rulebooks from the attributes, INT8 simulated
from the dynamic ranges (symmetric, scale = range / 127) wherever a node says
``precision="int8"``. Its output must match the PyTorch quantized model; a wrong
attribute, layout or range shows up as a mismatch.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import spconv.pytorch as spconv
import torch
from onnx import numpy_helper

from ..quant import sparse as _sparse  # noqa: F401  (spconv CPU compatibility)

QMIN, QMAX = -128, 127


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fake_int8(x: torch.Tensor, amax: torch.Tensor | float, axis: int | None = None) -> torch.Tensor:
    scale = torch.as_tensor(amax, dtype=x.dtype) / QMAX
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    scale = scale.clamp(min=1e-8)
    return torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale


def _build_conv(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> spconv.conv.SparseConvolution:
    a = _attrs(node)
    kwargs = dict(indice_key=_text(a.get("rulebook", "")) or None, bias=True)
    if a["subm"]:
        conv = spconv.SubMConv3d(a["in_channels"], a["out_channels"], a["kernel_size"], stride=a["stride"],
                                 padding=a["padding"], dilation=a["dilation"], **kwargs)
    elif a["inverse"]:
        conv = spconv.SparseInverseConv3d(a["in_channels"], a["out_channels"], a["kernel_size"], **kwargs)
    else:
        conv = spconv.SparseConv3d(a["in_channels"], a["out_channels"], a["kernel_size"], stride=a["stride"],
                                   padding=a["padding"], dilation=a["dilation"], **kwargs)
    weight = torch.from_numpy(weights[node.input[1]].astype(np.float32))
    if tuple(weight.shape) != tuple(conv.weight.shape):
        raise ValueError(f"{node.name}: weight shape {tuple(weight.shape)} does not fit spconv's "
                         f"{tuple(conv.weight.shape)} ([out, kD, kH, kW, in])")
    if _text(a["precision"]) == "int8":
        weight = _fake_int8(weight, torch.tensor(a["weight_dynamic_ranges"]), axis=0)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(torch.from_numpy(weights[node.input[2]].astype(np.float32)))
    return conv.eval()


class SparseOnnxRunner:
    """``runner(features, coords, batch_size)`` -> the BEV map, computed from the ONNX file alone."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.model = onnx.load(str(path))
        weights = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        meta = {p.key: p.value for p in self.model.metadata_props}
        self.sparse_shape = [int(v) for v in meta["sparse_shape"].split(",")]
        self.nodes = list(self.model.graph.node)
        self.convs = {n.name: _build_conv(n, weights) for n in self.nodes if n.op_type == "SparseConvolution"}
        supported = {"SparseConvolution", "Add", "Relu", "ScatterDense", "Reshape"}
        unknown = sorted({n.op_type for n in self.nodes} - supported)
        if unknown:
            raise ValueError(f"{path}: ops {unknown} are not part of the libspconv format")

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int) -> torch.Tensor:
        values: dict[str, Any] = {self.model.graph.input[0].name: spconv.SparseConvTensor(
            features.float(), coords.int(), self.sparse_shape, batch_size)}
        for node in self.nodes:
            a = _attrs(node)
            x = values[node.input[0]]
            if node.op_type == "SparseConvolution":
                if _text(a["precision"]) == "int8":
                    x = x.replace_feature(_fake_int8(x.features, a["input_dynamic_range"]))
                y = self.convs[node.name](x)
                if _text(a["activation"]).lower() == "relu":
                    y = y.replace_feature(torch.relu(y.features))
            elif node.op_type == "Add":
                b = values[node.input[1]]
                fa, fb = x.features, b.features
                if _text(a["precision"]) == "int8":
                    fa = _fake_int8(fa, a["input0_dynamic_range"])
                    fb = _fake_int8(fb, a["input1_dynamic_range"])
                y = x.replace_feature(fa + fb)
            elif node.op_type == "Relu":
                y = x.replace_feature(torch.relu(x.features))
            elif node.op_type == "ScatterDense":
                if _text(a["format"]) != "zyx" or list(a["input_spatial_shape"]) != list(x.spatial_shape):
                    raise ValueError(f"{node.name}: format/spatial shape do not match the sparse tensor")
                y = x.dense()
                if list(y.shape) != list(a["output_shape"]):
                    raise ValueError(f"{node.name}: dense shape {list(y.shape)} != output_shape {a['output_shape']}")
            else:  # Reshape with libspconv's "dims" attribute
                y = x.reshape(list(a["dims"]))
            values[node.output[0]] = y
        return values[self.model.graph.output[0].name]
