"""The OpenMMLab stack installed by the set-up runs stock CenterPoint on a real nuScenes sweep,
and lidar_ptq's primitives quantize its dense part. Skips cleanly without the stack or the data."""
import os
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip

import lidar_ptq

pytestmark = pytest.mark.mmdet3d
mmdet3d = import_or_skip("mmdet3d")
apis = import_or_skip("mmdet3d.apis")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuscenes_demo"
SWEEP = DATA / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
CONFIGS = Path(os.path.dirname(mmdet3d.__file__)) / ".mim" / "configs" / "centerpoint"
PILLAR = "centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"
VOXEL = "centerpoint_voxel01_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"

needs_sweep = pytest.mark.skipif(not SWEEP.is_file(), reason="real nuScenes sweep (../shared/data) not present")


def build(config: str):
    torch.manual_seed(0)
    return apis.init_model(str(CONFIGS / config), None, device="cpu")


def heatmaps(head_out) -> torch.Tensor:
    return torch.cat([task[0]["heatmap"].flatten() for task in head_out])


@needs_sweep
def test_stock_voxel_centerpoint_runs_on_cpu_with_spconv():
    from lidar_ptq.quant.spconv_compat import enable_spconv_cpu_compat

    enable_spconv_cpu_compat()
    model = build(VOXEL)
    result, _ = apis.inference_detector(model, str(SWEEP))
    boxes = result.pred_instances_3d.bboxes_3d
    assert boxes.tensor.shape[1] == 9  # x y z l w h yaw vx vy
    assert len(boxes) > 0


@needs_sweep
def test_pillar_centerpoint_bev_sparsity_and_w8a8_dense_part():
    model = build(PILLAR)
    captured = {}
    model.pts_middle_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("bev", o))
    model.pts_bbox_head.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o))
    apis.inference_detector(model, str(SWEEP))
    bev = captured["bev"]
    assert tuple(bev.shape) == (1, 64, 512, 512)
    occupancy = (bev != 0).any(1).float().mean().item()
    assert 0.02 < occupancy < 0.04  # about 3% of BEV cells hold a pillar on a real sweep
    reference = heatmaps(captured["head"]).clone()

    for part in ("pts_backbone", "pts_neck", "pts_bbox_head"):
        lidar_ptq.quantize(getattr(model, part), "w8a8")
    assert len(list(lidar_ptq.iter_quantizers(model))) > 100
    assert lidar_ptq.calibrate(model, lambda m: apis.inference_detector(m, str(SWEEP))) == []
    apis.inference_detector(model, str(SWEEP))
    quantized = heatmaps(captured["head"])
    sqnr = 10 * torch.log10(reference.pow(2).mean() / (quantized - reference).pow(2).mean())
    assert sqnr > 20.0  # measured 29 dB with random weights
