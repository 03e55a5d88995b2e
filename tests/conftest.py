import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def import_or_skip(module: str):
    """Import an optional dependency, or skip; ``make test`` sets LIDAR_PTQ_REQUIRE_STACK=1 so that a
    broken install fails instead of silently skipping."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("LIDAR_PTQ_REQUIRE_STACK") == "1":
            raise
        pytest.skip(f"{module} not installed ({err})", allow_module_level=True)


def load_tool(name: str = "quantize"):
    """A script of tools/ as a module (tools/ on sys.path: the scripts import each other and tools/machine.py)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
