"""The Waymo CenterPoint configs (written for this project: mmdet3d 1.4 has none) build, run on a
Waymo-like cloud (5 features, +-75 m) and quantize; no Waymo data is needed."""
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
import_or_skip("spconv")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import lidar_ptq.mmdet3d  # noqa: E402,F401
from lidar_ptq.mmdet3d.adapter import DetectorAdapter, DetectorBatch  # noqa: E402
from lidar_ptq.mmdet3d.ptq import quantize_detector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["centerpoint_pillar032_waymo_lidar_ptq", "centerpoint_voxel01_waymo_lidar_ptq"])
def test_waymo_config_runs_and_quantizes(name):
    from mmdet3d.registry import MODELS
    from mmdet3d.structures import Det3DDataSample
    init_default_scope("mmdet3d")
    cfg = Config.fromfile(str(ROOT / "configs" / "waymo" / f"{name}.py"))
    assert cfg.class_names == ["Car", "Pedestrian", "Cyclist"] and cfg.test_evaluator.type == "WaymoMetric"
    assert cfg.custom_hooks[0].type == "lidar_ptq.mmdet3d.LidarPTQHook"
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    gen = torch.Generator().manual_seed(0)
    xyz = (torch.rand(20000, 3, generator=gen) - 0.5) * torch.tensor([140.0, 140.0, 1.0]) + torch.tensor([0, 0, -1.0])
    points = torch.cat([xyz, torch.rand(20000, 2, generator=gen)], dim=1)  # x, y, z, intensity, elongation
    data = model.data_preprocessor({"inputs": {"points": [points]}, "data_samples": [Det3DDataSample()]}, False)
    batch = DetectorBatch(data["inputs"], data["data_samples"])
    with torch.no_grad():
        task = DetectorAdapter(model)(batch)[0][0]
    assert task["heatmap"].shape[1] == 3 and "vel" not in task
    result = quantize_detector(model, [batch], {"method": "lidar_ptq", "calib_frames": 1, "tgpl": False,
                                                "adaptive_rounding": False, "range_search": False})
    assert not result.report.uncalibrated and not result.unquantized
