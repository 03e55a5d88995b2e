"""Detectors other than CenterPoint: quantize what is supported, warn about the rest, keep going."""
import logging

import pytest
import torch
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from mmengine.hub import get_config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from lidar_ptq.mmdet3d.adapter import DetectorAdapter, DetectorBatch, UnsupportedDetectorError  # noqa: E402
from lidar_ptq.mmdet3d.ptq import is_quantized, quantize_detector  # noqa: E402


def random_frames(model, n=2, seed=0):
    from mmdet3d.structures import Det3DDataSample
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        xyz = torch.rand(3000, 3, generator=gen) * torch.tensor([69.0, 78.0, 3.0]) + torch.tensor([0.5, -39.0, -2.5])
        points = torch.cat([xyz, torch.rand(3000, 1, generator=gen)], dim=1)
        out = model.data_preprocessor({"inputs": {"points": [points]}, "data_samples": [Det3DDataSample()]}, False)
        batches.append(DetectorBatch(out["inputs"], out["data_samples"]))
    return batches


def test_anchor_head_detector_is_quantized_without_tgpl(caplog):
    from mmdet3d.registry import MODELS
    init_default_scope("mmdet3d")
    cfg = get_config("mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    batches = random_frames(model, n=1)
    recipe = {"method": "lidar_ptq", "calib_frames": 1, "grid_search": False,  # one unit keeps it quick
              "recon": {"iterations": 1, "progress": False, "unit_names": ["bbox_head.conv_cls"]}}
    with caplog.at_level(logging.WARNING):
        result = quantize_detector(model, batches, recipe)
    assert "no heatmaps: TGPL is skipped" in caplog.text
    assert result.tgpl is False and is_quantized(model) and not result.report.uncalibrated
    with torch.no_grad():
        out = DetectorAdapter(model)(batches[0])  # the anchor head's raw (cls, box, dir) maps, quantized
    assert torch.isfinite(out[0][0]).all()


def test_a_detector_without_a_lidar_branch_is_refused():
    class ImageOnly(torch.nn.Module):
        img_backbone = torch.nn.Conv2d(3, 8, 3)

    with pytest.raises(UnsupportedDetectorError, match="no voxel-based LiDAR branch"):
        DetectorAdapter(ImageOnly())
