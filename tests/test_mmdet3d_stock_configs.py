"""Stock mmdet3d nuScenes CenterPoint (pillar and voxel), wired to lidar_ptq by the project's configs,
through tools/quantize.py end to end on the real nuScenes sweep in ../shared/data (skips when absent).

Random weights (no pretrained CenterPoint is reachable): the checks are that every stage runs on the
real sweep, both metric rows exist, and the saved quantized checkpoint reproduces the quantized outputs.
The default suite runs LiDAR-PTQ's sparse calibration; the full recipe
with TGPL and rounding on these ~100-layer models is the slow variant (minutes per iteration on CPU).
"""
import json
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
import_or_skip("spconv")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from test_mmdet3d_ptq import run_tool  # noqa: E402

from lidar_ptq.mmdet3d.adapter import DetectorAdapter  # noqa: E402
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches  # noqa: E402
from lidar_ptq.mmdet3d.ptq import load_quantized  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuscenes_demo"
pytestmark = [pytest.mark.mmdet3d,
              pytest.mark.skipif(not (DEMO / "nuscenes_demo_infos.pkl").is_file(),
                                 reason="real nuScenes sweep (../shared/data) not present")]
CALIBRATION_ONLY = ["--recipe-options", "tgpl=false", "adaptive_rounding=false", "range_search=false",
                    "--calib-frames", "1"]


def demo_config(tmp_path: Path, name: str) -> Path:
    """The project config pointed at the one-frame demo set, scored with the project's own metric."""
    loader = f"dataset=dict(data_root='{DEMO}/', ann_file='nuscenes_demo_infos.pkl', data_prefix=dict(pts=''))"
    path = tmp_path / f"{name}.py"
    path.write_text(
        f"_base_ = ['{ROOT / 'configs' / 'nuscenes' / name}.py']\n"
        f"train_dataloader = dict(dataset=dict({loader}))\n"
        f"test_dataloader = dict(num_workers=0, persistent_workers=False, {loader})\n"
        "test_evaluator = dict(_delete_=True, type='CenterDistanceMAP')\n")
    return path


def random_checkpoint(config: Path, path: Path) -> Path:
    from mmdet3d.registry import MODELS
    init_default_scope("mmdet3d")
    torch.manual_seed(0)
    torch.save({"state_dict": MODELS.build(Config.fromfile(str(config)).model).state_dict()}, path)
    return path


def check_run(tmp_path: Path, name: str, extra: list[str]) -> None:
    config = demo_config(tmp_path, name)
    checkpoint = random_checkpoint(config, tmp_path / "float.pth")
    work = tmp_path / "work"
    runner = run_tool([str(config), str(checkpoint), "--work-dir", str(work), *extra])
    metrics = json.loads((work / "metrics.json").read_text())
    assert "det/mAP" in metrics["fp32"] and "det/mAP" in metrics[metrics["precision"]]
    assert metrics["unquantized_layers"] == []
    params = json.loads((work / "quant_params.json").read_text())["quantizers"]
    assert params and all(p["calibrated"] and p["bits"] == 8 for p in params)
    batch = collect_batches(runner.model, build_calibration_loader(runner.cfg, 1), progress=False)[0]
    from mmdet3d.registry import MODELS
    fresh = MODELS.build(runner.cfg.model)
    load_quantized(fresh, work / "quantized.pth")
    with torch.no_grad():
        a = DetectorAdapter(runner.model).eval()(batch)
        b = DetectorAdapter(fresh).eval()(batch)
    for ta, tb in zip(a[0], b[0]):
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0)
    if "--export" in extra:  # deployment files of the full-size network on the real sweep, verified
        manifest = json.loads((work / "export" / "manifest.json").read_text())
        layerwise = manifest["verification"]["dense"]["layerwise"]
        assert layerwise["quantizers"] > 80 and not layerwise["missing_in_file"]
        assert layerwise["max_code_diff"] <= 1 and layerwise["differing_code_share"] < 1e-3
        first = "sparse_backbone.onnx" if "voxel" in name else "pillar_encoder.onnx"
        assert first in manifest["files"]
        if "voxel" in name:
            assert manifest["verification"]["sparse_backbone"]["share_over_1_step"] < 0.01


@pytest.mark.parametrize("name", ["centerpoint_pillar02_nus_lidar_ptq", "centerpoint_voxel01_nus_lidar_ptq"])
def test_stock_nuscenes_config_calibration_stages(tmp_path, name):
    check_run(tmp_path, name, [*CALIBRATION_ONLY, "--export"])


@pytest.mark.slow
def test_stock_nuscenes_pillar_full_recipe(tmp_path):
    check_run(tmp_path, "centerpoint_pillar02_nus_lidar_ptq",
              ["--recipe-options", "recon.iterations=1", "ranges.rules=[maxmin,lp4]", "--calib-frames", "1"])
