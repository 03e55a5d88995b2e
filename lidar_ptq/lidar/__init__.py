"""LiDAR-PTQ (Zhou et al., ICLR 2024) on top of the generic core; independent of mmdet3d.

    from lidar_ptq.lidar import LidarPTQConfig, run_ptq
    report = run_ptq(detector, calib_batches, LidarPTQConfig(w_bits=8, a_bits=8, ranges={"frames": 8}))
"""
from .config import EqualizeOptions, LidarPTQConfig, PTQRecipe, RangeSearchOptions, ReconstructionOptions
from .pipeline import LidarPTQReport, run_ptq
from .tgpl import TGPLConfig

__all__ = ["LidarPTQConfig", "EqualizeOptions", "RangeSearchOptions", "ReconstructionOptions", "TGPLConfig",
           "PTQRecipe", "LidarPTQReport", "run_ptq"]
