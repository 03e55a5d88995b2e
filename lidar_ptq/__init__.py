"""lidar_ptq: post-training quantization for LiDAR 3D detectors.

``import lidar_ptq`` needs only torch and numpy; integrations (mmdet3d, spconv,
ONNX) live in their own subpackages and are imported on demand.
"""
from .quant.config import PRESETS, QuantConfig, load_quant_config
from .quant.fold import fold_batchnorms, fold_bn
from .quant.model import calibrate, format_summary, iter_quantizers, quant_summary, quantize, set_quant_mode
from .quant.quantizer import FakeQuantizer, QuantMode, UncalibratedError
from .quant.spec import QuantSpec
from .recon.engine import RECON_METHODS, ReconConfig, freeze, reconstruct
from .recon.mixed import allocate_bits, layer_sensitivity

__version__ = "0.1.0"

__all__ = [
    "quantize", "calibrate", "set_quant_mode", "quant_summary", "format_summary", "iter_quantizers",
    "QuantConfig", "QuantSpec", "PRESETS", "load_quant_config", "fold_bn", "fold_batchnorms",
    "FakeQuantizer", "QuantMode", "UncalibratedError", "reconstruct", "ReconConfig", "RECON_METHODS", "freeze",
    "layer_sensitivity", "allocate_bits", "__version__",
]
