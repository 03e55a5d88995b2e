"""How calibration batches are fed to a model, shared by calibration, bias correction and reconstruction."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def call_model(model: nn.Module, batch: Any) -> Any:
    """A tuple/list is positional arguments, a dict keyword arguments, anything else the single input."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


class StopForward(Exception):
    """Raised by a forward hook once it has what it needs: the rest of the model need not run."""


def run_batches(model: nn.Module, data: Iterable[Any]) -> None:
    """Feed every batch to ``model`` for the hooks' sake; a hook may end a batch early with ``StopForward``."""
    for batch in data:
        try:
            call_model(model, batch)
        except StopForward:
            pass
