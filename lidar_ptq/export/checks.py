"""What makes a fake-quant model exportable, checked before anything is written."""
from __future__ import annotations

from torch import nn

from ..errors import LidarPTQError
from ..quant.quantizer import FakeQuantizer, UncalibratedError


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
