"""How a calibration batch is fed to a model, shared by calibration and reconstruction."""
from __future__ import annotations

from typing import Any

from torch import nn


def call_model(model: nn.Module, batch: Any) -> Any:
    """A tuple/list is positional arguments, a dict keyword arguments, anything else the single input."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)
