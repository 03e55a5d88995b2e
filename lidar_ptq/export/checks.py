"""What makes a fake-quant model exportable, checked before anything is written."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import LidarPTQError
from ..quant.quantizer import FakeQuantizer, UncalibratedError

if TYPE_CHECKING:
    import onnx


class ExportError(LidarPTQError, RuntimeError):
    """The model cannot be expressed in the requested deployment format."""


def require_exportable(model: nn.Module, symmetric: bool = False) -> None:
    """Refuse models an engine cannot run faithfully; every problem is named with its fix.

    ``symmetric`` (TensorRT, libspconv) additionally requires zero points of 0.
    """
    uncalibrated = [name for name, m in model.named_modules()
                    if isinstance(m, FakeQuantizer) and m.enabled and not m.calibrated]
    if uncalibrated:
        shown = ", ".join(uncalibrated[:8]) + (f" (+{len(uncalibrated) - 8} more)" if len(uncalibrated) > 8 else "")
        raise UncalibratedError(
            f"{len(uncalibrated)} quantizer(s) were never calibrated: {shown}. An engine would get no scale for "
            "them. Run calibration on data that reaches these layers (lidar_ptq.calibrate or tools/quantize.py), "
            "or disable them in the quant config to keep those layers in float")
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer) and m.enabled:
            if m.spec.scheme != "uniform":
                problems.append(f"{name}: {m.spec.scheme} quantization has no ONNX QuantizeLinear form")
            if m.rounding is not None:
                problems.append(f"{name}: learned rounding still attached (call lidar_ptq.freeze(model))")
            if symmetric and (m.zero_point.abs() > 0).any():
                problems.append(f"{name}: zero point != 0 (TensorRT/libspconv INT8 is symmetric; use a symmetric "
                                "quant config)")
    if problems:
        raise ExportError("the model cannot be exported as is:\n  " + "\n  ".join(problems))


STANDARD_DOMAINS = ("", "ai.onnx")


def require_standard_ops(proto: onnx.ModelProto) -> None:
    """Refuse a traced graph with operators outside the ONNX standard (e.g. mmcv's ``MMCVDeformConv2d``
    of a layer without a twin): neither ONNX Runtime nor TensorRT runs them without a plugin, and the
    verification would die inside ONNX Runtime instead of naming the layer."""
    custom = [f"{n.domain}::{n.op_type} ({n.name or 'unnamed'})" for n in proto.graph.node
              if n.domain not in STANDARD_DOMAINS]
    if custom:
        shown = ", ".join(custom[:6]) + (f" (+{len(custom) - 6} more)" if len(custom) > 6 else "")
        raise ExportError(f"the graph holds {len(custom)} operator(s) outside the ONNX standard: {shown}. ONNX Runtime "
                          "and TensorRT run them only with a plugin. Give that layer type a fake-quant twin written "
                          "in standard ops (lidar_ptq.quant.modules.register_quant_module; mmcv's DeformConv2d has "
                          "one in lidar_ptq.mmdet3d.deform_conv) or keep it out of the exported network")
