"""Packaging rules: a light core import and loadable shipped configs."""
import json
import os
import shutil
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


def test_the_wheel_holds_every_module_and_the_mmdet3d_plugin_imports_from_it(tmp_path):
    """``pip install .`` (not editable) must ship every package: a folder without ``__init__.py`` is
    silently left out of the wheel, and the plugin would then fail to import only for users."""
    import zipfile

    from conftest import import_or_skip
    import_or_skip("mmdet3d")
    source = tmp_path / "source"  # a clean copy: a build/ folder left in the checkout would hide omissions
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("requirements", "lidar_ptq"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lidar_ptq-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    shipped = {name for name in names if name.startswith("lidar_ptq/")}
    modules = {str(p.relative_to(ROOT)).replace("\\", "/") for p in (ROOT / "lidar_ptq").rglob("*.py")}
    assert modules - shipped == set()
    assert any(name.endswith("LICENSE") for name in names)
    code = "import lidar_ptq, lidar_ptq.mmdet3d, lidar_ptq.sim.dataset; print(lidar_ptq.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(tmp_path / "site"))


@pytest.mark.parametrize("package", ["quant", "recon", "lidar", "export"])
def test_the_core_never_reaches_into_the_mmdet3d_integration(package):
    """The core serves any model: neither it nor its lazy imports name mmdet3d, mmengine or mmcv."""
    import ast
    offenders = []
    for path in sorted((ROOT / "lidar_ptq" / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("lidar_ptq."):
                names = [node.value]  # importlib.import_module("lidar_ptq....")
            for name in names:
                if any(part in ("mmdet3d", "mmengine", "mmcv") for part in name.lstrip(".").split(".")):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_layers_import_downward_only():
    """quant/ is the bottom layer: recon/ and lidar/ use its model-level functions, never the package's
    top-level facade; no two modules of export/ import each other."""
    import ast
    offenders = []
    for package in ("quant", "recon", "lidar", "export"):
        for path in sorted((ROOT / "lidar_ptq" / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module in ("api", None):
                    offenders.append(f"{path.relative_to(ROOT)}: from ..{node.module or ''}")
    assert offenders == []
    imports: dict[str, set[str]] = {}
    for path in (ROOT / "lidar_ptq" / "export").glob("*.py"):
        imports[path.stem] = {node.module for node in ast.walk(ast.parse(path.read_text()))
                              if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    cycles = sorted((a, b) for a, deps in imports.items() for b in deps if a in imports.get(b, set()) and a < b)
    assert cycles == []


def test_the_hook_named_by_its_path_builds_without_custom_imports():
    """mmdet3d's own tools/test.py with a config that has the hook but no ``custom_imports``: mmengine
    imports the plugin from the hook's path (a fresh interpreter, nothing of lidar_ptq imported before)."""
    pytest.importorskip("mmdet3d")
    code = ("import sys\nfrom mmengine.registry import init_default_scope\nfrom mmdet3d.registry import HOOKS\n"
            "init_default_scope('mmdet3d')\nassert 'lidar_ptq.mmdet3d' not in sys.modules\n"
            "hook = HOOKS.build(dict(type='lidar_ptq.mmdet3d.LidarPTQHook', recipe='maxmin', calib_frames=2))\n"
            "print(type(hook).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("LidarPTQHook")


def test_an_op_without_a_kernel_for_this_device_is_a_user_error():
    from lidar_ptq.errors import user_error_message
    err = RuntimeError("roiaware_pool3d_forward_impl: implementation for device cpu not found.")
    message = user_error_message(err)
    assert message is not None and "roiaware_pool3d_forward" in message and "no cpu kernel" in message
    assert user_error_message(RuntimeError("shape mismatch")) is None  # a bug stays a traceback
