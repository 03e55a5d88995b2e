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
    from mmdet3d.structures import Det3DDataSample, LiDARInstance3DBoxes
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        xyz = torch.rand(3000, 3, generator=gen) * torch.tensor([69.0, 78.0, 3.0]) + torch.tensor([0.5, -39.0, -2.5])
        points = torch.cat([xyz, torch.rand(3000, 1, generator=gen)], dim=1)
        sample = Det3DDataSample(metainfo={"box_type_3d": LiDARInstance3DBoxes})
        out = model.data_preprocessor({"inputs": {"points": [points]}, "data_samples": [sample]}, False)
        batches.append(DetectorBatch(out["inputs"], out["data_samples"]))
    return batches


def test_anchor_head_is_judged_and_guarded_by_its_own_positives(caplog):
    from mmdet3d.registry import MODELS
    init_default_scope("mmdet3d")
    cfg = get_config("mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    batches = random_frames(model, n=1)
    recipe = {"method": "lidar_ptq", "calib_frames": 1, "ranges": {"rules": ["maxmin", "pct99.9"]},
              "bias_correction": True, "guards": True,
              "recon": {"iterations": 1, "progress": False, "unit_names": ["bbox_head.conv_cls"]}}
    with caplog.at_level(logging.WARNING):
        result = quantize_detector(model, batches, recipe)
    assert "anchor head: TGPL is replaced by the loss on the anchor head's positives" in caplog.text
    report = result.report
    assert result.tgpl is False and is_quantized(model) and not report.uncalibrated
    assert set(report.selection) == {"maxmin", "pct99.9"}  # the range search ran, judged by the anchor loss
    assert all(v > 0 for v in report.selection.values())
    assert set(report.bias_correction_loss) == {"before", "after"}  # both stages guarded
    assert set(report.recon_loss) == {"before", "after"}
    with torch.no_grad():
        out = DetectorAdapter(model)(batches[0])  # the anchor head's raw (cls, box, dir) maps, quantized
    assert torch.isfinite(out[0][0]).all()


def test_a_detector_without_a_lidar_branch_is_refused():
    class ImageOnly(torch.nn.Module):
        img_backbone = torch.nn.Conv2d(3, 8, 3)

    with pytest.raises(UnsupportedDetectorError, match="no voxel-based LiDAR branch"):
        DetectorAdapter(ImageOnly())


def test_anchor_head_export_is_verified_through_the_heads_own_decoder(tmp_path):
    import_or_skip("onnxruntime")
    from mmdet3d.registry import MODELS

    from lidar_ptq.mmdet3d.export import export_detector
    init_default_scope("mmdet3d")
    cfg = get_config("mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    batches = random_frames(model, n=1)
    quantize_detector(model, batches, {"method": "maxmin", "calib_frames": 1})
    manifest = export_detector(model, batches[0], tmp_path / "export")
    det = manifest["verification"]["dense"]["reference_kernels"]["detections"]
    assert det["compared"], det  # Anchor3DHead.predict_by_feat took the (cls, box, dir) maps back
    assert det["matched_within_10cm"] >= 0.9 * det["boxes_pytorch"]
    assert (tmp_path / "export" / "dense.onnx").is_file()
