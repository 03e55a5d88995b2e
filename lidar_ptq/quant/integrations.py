"""Optional layer integrations, loaded only for models that need them (keeps ``import lidar_ptq`` light).

An integration registers fake-quant twins or folding rules for another library's layer types. The core
loads spconv's on demand; a plugin (``lidar_ptq.mmdet3d``) registers its own layers when it is imported.
"""
from __future__ import annotations

import importlib

from torch import nn


def load_integrations(model: nn.Module) -> None:
    """Sparse-conv twins and folding rules need spconv: load them for models holding spconv layers."""
    if any(type(m).__module__.startswith("spconv.") for m in model.modules()):
        importlib.import_module("lidar_ptq.quant.sparse")
