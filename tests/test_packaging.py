"""Packaging rules: a light core import and loadable shipped configs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lidar_ptq

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("mmdet3d", "mmdet", "mmcv", "mmengine", "spconv", "onnx", "onnxruntime")


def test_core_import_needs_only_torch_and_numpy():
    code = ("import sys, lidar_ptq, lidar_ptq.demo; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "quant").glob("*.json")), ids=lambda p: p.name)
def test_shipped_quant_configs_load(path):
    cfg = lidar_ptq.load_quant_config(path)
    assert cfg.to_dict()["weight"]["bits"] == json.loads(path.read_text())["weight"]["bits"]
