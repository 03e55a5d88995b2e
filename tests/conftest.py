import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def import_or_skip(module: str):
    """Import an optional dependency, or skip; ``make test`` sets LIDAR_PTQ_REQUIRE_STACK=1 so that a
    broken install fails instead of silently skipping."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("LIDAR_PTQ_REQUIRE_STACK") == "1":
            raise
        pytest.skip(f"{module} not installed ({err})", allow_module_level=True)
