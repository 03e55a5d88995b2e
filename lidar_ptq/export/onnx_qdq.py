"""Dense network -> ONNX with explicit QuantizeLinear/DequantizeLinear pairs.

The fake-quant model is traced by torch's ONNX exporter while every enabled
quantizer emits its exact Q/DQ pair: activations ``Q -> DQ`` with a per-tensor
scale, weights stored as integer codes (int8 initialisers) behind a per-output-
channel ``DequantizeLinear``, biases in float. That is TensorRT's explicit
quantization form (symmetric, zero point 0), and ONNX Runtime runs it as well.

``target="onnxruntime"`` rewrites one pattern for ONNX Runtime's CPU kernels:
a ``Relu`` feeding an int8 ``QuantizeLinear`` blocks its QLinearConv fusion
(it drops the Relu only when the zero point is the type's minimum), so such
quantizers become uint8 with the same scale. Codes are unchanged except that
values above 127 steps no longer saturate (they would be clipped in TensorRT).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..quant.functional import broadcast_shape, fake_quantize
from ..quant.modules import QuantModuleMixin
from ..quant.quantizer import FakeQuantizer, temporary_quant_mode
from .checks import require_exportable, require_standard_ops
from .onnx_graph import constant_values, consumers, producers, prune_unused

log = logging.getLogger(__name__)
TARGETS = ("tensorrt", "onnxruntime")
DEFAULT_OPSET = 17
NAME_ATTR = "lidar_ptq_quantizer"


@dataclass
class _QDQConstants:
    """A quantizer's scale/zero point (and, for weights, codes and dequantized values) taken out of the
    module before tracing: the legacy tracer fails on module buffers read inside a custom Function."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None
    qmin: int
    qmax: int
    name: str = ""
    codes: torch.Tensor | None = None
    dequantized: torch.Tensor | None = None

    @classmethod
    def of(cls, quantizer: FakeQuantizer, weight: torch.Tensor | None = None) -> _QDQConstants:
        dtype = torch.int8 if quantizer.spec.signed else torch.uint8
        scale = quantizer.scale.detach().float().cpu().clone()
        zero_point = quantizer.zero_point.detach().cpu().round().to(dtype)
        axis = quantizer.channel_axis
        scale, zero_point = (scale.reshape(-1), zero_point.reshape(-1)) if axis is not None else \
            (scale.reshape(()), zero_point.reshape(()))
        out = cls(scale, zero_point, axis, quantizer.spec.qmin, quantizer.spec.qmax, quantizer.name)
        if weight is not None:
            out.codes = quantizer.to_int(weight.detach()).to(dtype).cpu()
            out.dequantized = quantizer(weight.detach()).detach().clone()
        return out

    def emit(self, g, value):
        """ONNX nodes: DequantizeLinear(QuantizeLinear(value)), or DequantizeLinear(codes) for weights."""
        attrs = {} if self.axis is None else {"axis_i": self.axis}
        s = g.op("Constant", value_t=self.scale)
        z = g.op("Constant", value_t=self.zero_point)
        tag = {NAME_ATTR + "_s": self.name}  # becomes the node name after export (then removed)
        if self.codes is not None:
            return g.op("DequantizeLinear", g.op("Constant", value_t=self.codes), s, z, **attrs, **tag)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", value, s, z, **attrs, **tag), s, z, **attrs)


# Functions get an int key into this table (modules and dataclasses cannot travel through the tracer).
_EXPORTING: dict[int, _QDQConstants] = {}


class _QuantDequant(torch.autograd.Function):
    """Fake quantization that exports as ONNX Q/DQ (activations) or DQ of integer codes (weights).

    The constant tensors come in as arguments rather than being read from the table inside
    ``forward``: the tracer records every tensor a Function's forward touches, and a quantizer that
    runs twice in one trace (a head shared across feature levels) would otherwise reach a tensor
    recorded by its first call (``RuntimeError: unordered_map::at``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: int, scale: torch.Tensor, zero_point: torch.Tensor,  # noqa: D102
                dequantized: torch.Tensor | None) -> torch.Tensor:
        if dequantized is not None:
            return dequantized.to(x.device, copy=True)
        constants = _EXPORTING[key]
        shape = broadcast_shape(scale.numel(), x.dim(), constants.axis)
        return fake_quantize(x, scale.to(x.device).reshape(shape), zero_point.to(x.device).float().reshape(shape),
                             constants.qmin, constants.qmax)

    @staticmethod
    def symbolic(g, x, key: int, *constant_tensors):  # noqa: D102
        return _EXPORTING[key].emit(g, x)


def _quant_dequant(x: torch.Tensor, key: int) -> torch.Tensor:
    constants = _EXPORTING[key]
    return _QuantDequant.apply(x, key, constants.scale, constants.zero_point, constants.dequantized)


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every enabled quantizer of ``model`` traces as ONNX Q/DQ (forward values unchanged)."""
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, FakeQuantizer) and module.enabled:
                key = id(module)
                _EXPORTING[key] = _QDQConstants.of(module)
                module.forward = lambda x, mask=None, _k=key: _quant_dequant(x, _k)
                patched.append(module)
            if isinstance(module, QuantModuleMixin) and module.weight_quantizer.enabled:
                _EXPORTING[id(module)] = _QDQConstants.of(module.weight_quantizer, module.float_weight)
                module.quantized_weight = lambda _m=module: _quant_dequant(_m.float_weight, id(_m))
                patched.append(module)
        yield model
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("quantized_weight", None)
            _EXPORTING.pop(id(module), None)


def export_onnx(model: nn.Module, args: tuple[Any, ...], path: str | os.PathLike, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
                target: str = "tensorrt", opset: int = DEFAULT_OPSET, quantized: bool = True,
                simplify: bool = True) -> onnx.ModelProto:
    """Export ``model(*args)`` to ``path``: with explicit Q/DQ when ``quantized``, else the float graph.

    The model is checked first (calibrated, symmetric for TensorRT, no learned
    rounding left), then traced in eval mode; ``simplify`` applies the exact
    fusion-enabling rewrites of ``qdq_rewrite``; the file is validated with
    ``onnx.checker`` and written atomically.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose from {TARGETS}")
    if opset < 13:
        raise ValueError(f"opset {opset} < 13: per-channel DequantizeLinear needs opset 13 or newer")
    if quantized:
        require_exportable(model, symmetric=(target == "tensorrt"))
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        context = qdq_export_mode(model) if quantized else contextlib.nullcontext()
        with temporary_quant_mode(model, "quantize" if quantized else "float"), context, torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buffer, dynamo=False, opset_version=opset, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes or {},
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    require_standard_ops(proto)
    adopt_quantizer_names(proto)
    if quantized and simplify:
        from .qdq_rewrite import simplify_qdq
        simplify_qdq(proto)
    if quantized and target == "onnxruntime":
        unsigned_after_relu(proto)
    onnx.checker.check_model(proto)
    save_onnx(proto, path)
    return proto


def adopt_quantizer_names(proto: onnx.ModelProto) -> None:
    """Name each Q (activation) / weight DQ node after its quantizer, e.g.
    ``backbone.blocks.0.3.input_quantizer/QuantizeLinear``: readable in TensorRT's layer report, and
    how ``verify.layerwise_agreement`` pairs ONNX nodes with PyTorch quantizers."""
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        tags = [a for a in node.attribute if a.name == NAME_ATTR]
        if not tags:
            continue
        base = f"{tags[0].s.decode()}/{node.op_type}"
        seen[base] = seen.get(base, 0) + 1
        node.name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        node.attribute.remove(tags[0])


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically (a killed export leaves no truncated .onnx behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


# ----- graph helpers --------------------------------------------------------------------------------
def unsigned_after_relu(proto: onnx.ModelProto) -> int:
    """Q(int8, zp 0) of a non-negative tensor (a Relu output, or a Concat/MaxPool of such) -> Q(uint8, zp 0),
    with its DequantizeLinear readers (see the module docstring)."""
    values = constant_values(proto)
    users = consumers(proto)
    producer = producers(proto)

    def non_negative(tensor: str) -> bool:
        node = producer.get(tensor)
        if node is None:
            return False
        if node.op_type == "Relu":
            return True
        if node.op_type == "DequantizeLinear" and len(node.input) > 2:
            return values.get(node.input[2], np.zeros((), np.int8)).dtype == np.uint8
        if node.op_type in ("Concat", "MaxPool"):
            return all(non_negative(name) for name in node.input[:1 if node.op_type == "MaxPool" else None])
        return False

    changed = 0
    for node in list(proto.graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        zero_point = values.get(node.input[2])
        if zero_point is None or zero_point.dtype != np.int8 or np.any(zero_point != 0):
            continue
        if not non_negative(node.input[0]):
            continue
        dequants = users.get(node.output[0], [])
        if not dequants or any(d.op_type != "DequantizeLinear" for d in dequants):
            continue
        name = f"{node.output[0]}_zero_point_u8"
        values[name] = np.zeros(zero_point.shape, np.uint8)
        proto.graph.initializer.append(numpy_helper.from_array(values[name], name))
        node.input[2] = name
        for d in dequants:
            if len(d.input) > 2:
                d.input[2] = name
            else:
                d.input.append(name)
        changed += 1
    prune_unused(proto)
    log.debug("unsigned_after_relu: %d quantizers switched to uint8", changed)
    return changed
