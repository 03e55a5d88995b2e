"""Optional layer integrations, loaded only for models that need them (keeps ``import lidar_ptq`` light)."""
from __future__ import annotations

import importlib

from torch import nn


def load_integrations(model: nn.Module) -> None:
    """Sparse-conv twins and folding rules need spconv (and mmdet3d's sparse blocks, mmdet3d):
    load them for models holding such layers."""
    modules = {type(m).__module__ for m in model.modules()}
    if any(name.startswith("spconv.") for name in modules):
        importlib.import_module("lidar_ptq.quant.sparse")
    if "mmdet3d.models.layers.sparse_block" in modules:
        importlib.import_module("lidar_ptq.mmdet3d.sparse_block")
