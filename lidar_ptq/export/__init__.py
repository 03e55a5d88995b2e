"""Deployment exports of a calibrated fake-quant model.

``onnx_qdq``     dense network -> ONNX with explicit QuantizeLinear/DequantizeLinear (TensorRT, ONNX Runtime)
``tensorrt``     per-tensor dynamic ranges: TensorRT calibration cache + JSON, QDQ-free float ONNX
``sparse_onnx``  spconv backbone -> the ONNX layout NVIDIA's libspconv parses (CUDA-CenterPoint)
``sparse_check`` an independent spconv re-implementation of that ONNX, to verify it on CPU

Needs ``onnx`` (and spconv for the sparse parts); ``import lidar_ptq`` does not import this package.
"""
from .checks import ExportError, require_exportable

__all__ = ["ExportError", "require_exportable"]
