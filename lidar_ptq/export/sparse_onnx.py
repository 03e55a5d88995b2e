"""A quantized spconv backbone -> the ONNX layout NVIDIA's libspconv parses (CUDA-CenterPoint).

libspconv has its own ONNX reader: ``SparseConvolution`` nodes (FP16 weight and
bias initialisers in spconv 2's ``[out, kD, kH, kW, in]`` layout, geometry and
quantization as attributes), ``Add`` for residuals (the dynamic range of each
input), ``Relu``, and ``ScatterDense`` + ``Reshape`` to the BEV map TensorRT
takes. These are not standard ONNX ops, so ``onnx.checker`` does not apply;
``sparse_check`` reads the file back and runs it with spconv instead.

The backbone is walked by structure (emitters registered per module type, so
mmdet3d's blocks join from ``lidar_ptq.mmdet3d``), while one real forward pass
records every conv's input/output spatial shape.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import spconv.pytorch as spconv
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..quant import sparse as _sparse  # noqa: F401  (spconv twins + CPU compatibility)
from ..quant.quantizer import FakeQuantizer
from .checks import ExportError, require_exportable
from .onnx_qdq import save_onnx

log = logging.getLogger(__name__)
INT8, FP16 = "int8", "fp16"
INPUT_NAME = "voxel_features"
OUTPUT_NAME = "spatial_features"


def _amax(quantizer: FakeQuantizer | None) -> np.ndarray | None:
    """libspconv's dynamic range: scale * 127 (it quantizes with scale = range / 127), per channel for weights."""
    if quantizer is None or not quantizer.enabled:
        return None
    return (quantizer.scale.detach().float().cpu().reshape(-1) * quantizer.spec.qmax).numpy()


@dataclass
class SparseGraph:
    """The nodes being built; ``emit_module`` appends to it in execution order."""

    precision_overrides: dict[str, str]
    output_bound: int
    shapes: dict[str, tuple[list[int], list[int]]]  # conv name -> (input, output) spatial shape
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    input_ranges: dict[str, list[float]] = field(default_factory=dict)  # tensor -> ranges its int8 users need
    fp16_users: set[str] = field(default_factory=set)  # tensors some FP16 consumer reads
    counter: int = 0

    def tensor(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}" if hint else str(self.counter)

    def precision_of(self, name: str, quantized: bool) -> str:
        for pattern, precision in self.precision_overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                if precision not in (INT8, FP16):
                    raise ValueError(f"precision override {pattern!r} -> {precision!r}: use 'int8' or 'fp16'")
                if precision == INT8 and not quantized:
                    raise ExportError(f"{name} is forced to int8 but its quantizers are disabled; "
                                      "quantize it or drop the override")
                return precision
        return INT8 if quantized else FP16

    def reads(self, tensor: str, precision: str, amax: float | None) -> None:
        if precision == INT8:
            self.input_ranges.setdefault(tensor, []).append(float(amax))
        else:
            self.fp16_users.add(tensor)

    def fp16_initializer(self, name: str, value: torch.Tensor) -> str:
        array = value.detach().float().cpu().numpy().astype(np.float16)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


Emitter = Callable[[SparseGraph, str, nn.Module, str], str]
SPARSE_EMITTERS: dict[type, Emitter] = {}


def register_sparse_emitter(module_type: type) -> Callable[[Emitter], Emitter]:
    """Declare how a module type becomes nodes: ``fn(graph, module_name, module, input) -> output``."""
    def wrap(fn: Emitter) -> Emitter:
        SPARSE_EMITTERS[module_type] = fn
        return fn
    return wrap


def emit_module(graph: SparseGraph, name: str, module: nn.Module, x: str) -> str:
    for cls in type(module).__mro__:
        if cls in SPARSE_EMITTERS:
            return SPARSE_EMITTERS[cls](graph, name, module, x)
    raise ExportError(f"{name} ({type(module).__name__}) has no sparse ONNX emitter; libspconv runs sparse convs, "
                      "Add, ReLU and ScatterDense only (register one with register_sparse_emitter)")


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


@register_sparse_emitter(spconv.SparseSequential)
def _emit_sequential(graph: SparseGraph, name: str, module: nn.Module, x: str) -> str:
    children = list(module.named_children())
    skip_relu = False
    for child_name, child in children:
        if skip_relu and isinstance(child, nn.ReLU):  # already the conv's activation attribute
            skip_relu = False
            continue
        if isinstance(child, nn.Identity):  # a folded BatchNorm
            continue
        x = emit_module(graph, _join(name, child_name), child, x)
        fused = getattr(child, "fused_activation", "") == "relu"
        skip_relu = isinstance(child, spconv.conv.SparseConvolution) and fused
    return x


@register_sparse_emitter(nn.Identity)
def _emit_identity(graph: SparseGraph, name: str, module: nn.Module, x: str) -> str:
    return x


@register_sparse_emitter(nn.ReLU)
def _emit_relu(graph: SparseGraph, name: str, module: nn.Module, x: str) -> str:
    y = graph.tensor("relu")
    graph.nodes.append(helper.make_node("Relu", [x], [y], name=name))
    return y


@register_sparse_emitter(nn.modules.batchnorm._BatchNorm)
def _emit_batchnorm(graph: SparseGraph, name: str, module: nn.Module, x: str) -> str:
    raise ExportError(f"{name} is an unfolded BatchNorm; fold BNs before quantizing (lidar_ptq.fold_batchnorms)")


@register_sparse_emitter(spconv.conv.SparseConvolution)
def emit_sparse_conv(graph: SparseGraph, name: str, conv: nn.Module, x: str, activation: str | None = None) -> str:
    """One ``SparseConvolution`` node; ``activation`` overrides the layer's own fused-ReLU marker."""
    if name not in graph.shapes:
        raise ExportError(f"{name} did not run in the sample forward pass; export needs one frame that reaches "
                          "every sparse layer")
    in_shape, out_shape = graph.shapes[name]
    input_q, weight_q = getattr(conv, "input_quantizer", None), getattr(conv, "weight_quantizer", None)
    quantized = _amax(input_q) is not None and _amax(weight_q) is not None
    precision = graph.precision_of(name, quantized)
    weight = conv.weight_quantizer(conv.weight) if quantized and precision == INT8 else conv.weight
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    act = activation if activation is not None else ("ReLU" if getattr(conv, "fused_activation", "") == "relu"
                                                     else "None")
    input_range = float(_amax(input_q)[0]) if precision == INT8 else 0.0
    weight_ranges = _amax(weight_q).tolist() if precision == INT8 else [0.0] * conv.out_channels
    graph.reads(x, precision, input_range)
    y = graph.tensor("spconv")
    graph.nodes.append(helper.make_node(
        "SparseConvolution",
        [x, graph.fp16_initializer(f"{name}.weight", weight), graph.fp16_initializer(f"{name}.bias", bias)], [y],
        name=name, ndim=conv.ndim, input_spatial_shape=list(in_shape), output_spatial_shape=list(out_shape),
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=list(conv.kernel_size),
        stride=list(conv.stride), dilation=list(conv.dilation), padding=list(conv.padding),
        transposed=int(conv.transposed), inverse=int(conv.inverse), output_padding=list(conv.output_padding),
        groups=conv.groups, subm=int(conv.subm), rulebook=conv.indice_key or "", activation=act,
        input_dynamic_range=input_range, weight_dynamic_ranges=[float(r) for r in weight_ranges],
        precision=precision, output_precision=FP16, output_bound=graph.output_bound))
    return y


def emit_add(graph: SparseGraph, name: str, a: str, b: str, quantizer: FakeQuantizer | None) -> str:
    """Residual ``Add``: both inputs share the quantizer's range (one integer domain in the engine)."""
    amax = _amax(quantizer)
    precision = graph.precision_of(name, amax is not None)
    r = float(amax[0]) if precision == INT8 else 0.0
    graph.reads(a, precision, r)
    graph.reads(b, precision, r)
    y = graph.tensor("add")
    graph.nodes.append(helper.make_node("Add", [a, b], [y], name=name, input0_dynamic_range=r,
                                        input1_dynamic_range=r, precision=precision, output_precision=FP16))
    return y


def emit_scatter_dense(graph: SparseGraph, name: str, x: str, spatial_shape: list[int], batch_size: int,
                       channels: int) -> str:
    """``ScatterDense`` to [N, C, D, H, W] (mmdet3d indices are (batch, z, y, x)), then ``Reshape`` to the
    BEV map [N, C*D, H, W] that the dense network takes."""
    dense = graph.tensor("dense")
    graph.fp16_users.add(x)
    out5 = [batch_size, channels, *spatial_shape]
    graph.nodes.append(helper.make_node("ScatterDense", [x], [dense], name=name, input_spatial_shape=spatial_shape,
                                        output_shape=out5, format="zyx", input_dynamic_range=0.0,
                                        output_layout="NCHW"))
    bev = [batch_size, channels * spatial_shape[0], *spatial_shape[1:]]
    graph.nodes.append(helper.make_node("Reshape", [dense], [OUTPUT_NAME], name=f"{name}.reshape", dims=bev))
    return OUTPUT_NAME


def _finalise_output_precision(graph: SparseGraph) -> None:
    """A conv or add writes int8 only when every reader is int8 with the same range (one scale to write with)."""
    for node in graph.nodes:
        if node.op_type not in ("SparseConvolution", "Add"):
            continue
        out = node.output[0]
        ranges = graph.input_ranges.get(out, [])
        relu_users = [n for n in graph.nodes if n.op_type == "Relu" and n.input[0] == out]
        if relu_users:  # the engine fuses Add+ReLU; precision follows the ReLU's readers
            ranges = graph.input_ranges.get(relu_users[0].output[0], [])
            readers_fp16 = relu_users[0].output[0] in graph.fp16_users
        else:
            readers_fp16 = out in graph.fp16_users
        if ranges and not readers_fp16 and np.allclose(ranges, ranges[0], rtol=1e-6):
            for attr in node.attribute:
                if attr.name == "output_precision":
                    attr.s = INT8.encode()


def record_spatial_shapes(model: nn.Module, run: Callable[[], Any]) -> dict[str, tuple[list[int], list[int]]]:
    """Run ``run()`` once and note every sparse conv's input/output spatial shape by module name."""
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, spconv.conv.SparseConvolution):
            def hook(mod, inputs, output, _name=name):
                shapes[_name] = (list(inputs[0].spatial_shape), list(output.spatial_shape))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def export_sparse_onnx(encoder: nn.Module, run: Callable[[], Any], path: str | os.PathLike, in_channels: int,
                       spatial_shape: list[int], batch_size: int, emit: Callable[[SparseGraph, str], str],
                       precision_overrides: dict[str, str] | None = None, output_bound: int = 200000,
                       prefix: str = "") -> onnx.ModelProto:
    """Write the libspconv ONNX of ``encoder``.

    ``run`` performs one forward pass (to record spatial shapes); ``emit(graph, input)``
    emits the encoder's nodes in execution order and returns the BEV output name.
    ``precision_overrides`` maps module-name patterns to ``"fp16"``/``"int8"``
    (e.g. ``{"*conv_input*": "fp16"}`` keeps the first layer in FP16).
    """
    require_exportable(encoder, symmetric=True)
    encoder.eval()
    shapes = record_spatial_shapes(encoder, run)
    if prefix:
        shapes = {_join(prefix, k): v for k, v in shapes.items()}
    graph = SparseGraph(dict(precision_overrides or {}), output_bound, shapes)
    with torch.no_grad():
        output = emit(graph, INPUT_NAME)
    _finalise_output_precision(graph)
    last = graph.nodes[-1]
    out_shape = next(list(a.ints) for a in last.attribute if a.name == "dims")
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT16, ["num_voxels", in_channels])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT16, out_shape)]
    model = helper.make_model(helper.make_graph(graph.nodes, "sparse_backbone", inputs, outputs, graph.initializers),
                              opset_imports=[helper.make_operatorsetid("ai.onnx", 11)], producer_name="lidar_ptq")
    model.metadata_props.add(key="coordinate_order", value="batch,z,y,x")
    model.metadata_props.add(key="sparse_shape", value=",".join(map(str, spatial_shape)))
    save_onnx(model, path)
    return model
