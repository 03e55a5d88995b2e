"""The generality matrix (tools/benchmark_stock_configs.py) on one anchor-head config: the stock KITTI
PointPillars quantizes with the default recipe, is guarded by its own task loss, exports and verifies."""
import importlib.util
from pathlib import Path

import pytest
from conftest import import_or_skip

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
pytestmark = [pytest.mark.mmdet3d, pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "kitti_demo").is_dir(), reason="real frames (../shared/data) not present")]
import_or_skip("mmdet3d")
import_or_skip("onnxruntime")


def test_stock_kitti_pointpillars_row_is_quantized_guarded_and_verified():
    spec = importlib.util.spec_from_file_location("stock_matrix", ROOT / "tools" / "benchmark_stock_configs.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    row = matrix.run_one("pointpillars-kitti")
    assert row["status"] == "ok", row
    assert row["quantized_layers"] >= 20 and row["float_layers"] == {}
    assert row["range_search"] == ["lp4", "maxmin"] and row["reconstruction_guarded"]
    assert {"dense.onnx", "pillar_encoder.onnx"} <= set(row["export_files"])
    matched, total = (int(v) for v in row["boxes"].split("/"))
    assert total > 0 and matched >= 0.9 * total
