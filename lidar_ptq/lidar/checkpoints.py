"""Stage results on disk, so a killed quantization run resumes where it stopped.

The calibrated ranges with the range search's choice, and the bias corrections with their
verdict, are saved like reconstruction units are: atomically, once the stage is done. A saved
stage belongs to one recipe and one set of calibration frames (a fingerprint of both); resuming
with another is an error that names the directory, not a silent mix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..recon.cache import is_sparse_tensor
from ..recon.engine import ReconConfig

logger = logging.getLogger(__name__)


def _tensors(item: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor inside a calibration batch (tensors, sparse tensors, containers, dataclasses)."""
    if depth > 6:
        return []
    if isinstance(item, torch.Tensor):
        return [item]
    if is_sparse_tensor(item):
        return [item.features, item.indices]
    if isinstance(item, dict):
        return [t for v in item.values() for t in _tensors(v, depth + 1)]
    if isinstance(item, (list, tuple)):
        return [t for v in item for t in _tensors(v, depth + 1)]
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [t for f in dataclasses.fields(item) for t in _tensors(getattr(item, f.name), depth + 1)]
    return []


def data_digest(data: Sequence[Any]) -> str:
    """A digest of the calibration batches' shapes and sums: the same frames give the same digest."""
    digest = hashlib.sha1()
    for batch in data:
        for tensor in _tensors(batch):
            values = tensor.detach().double()
            digest.update(f"{tuple(tensor.shape)}:{float(values.sum()):.10g}:{float(values.abs().sum()):.10g}"
                          .encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """A value as JSON can hold it; objects (losses) by their type and settings, never their address."""
    if value is None or isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return value
    return f"{type(value).__name__}({getattr(value, 'cfg', '')!r})"


def recipe_digest(recipe: Any) -> str:
    """A digest of what the recipe computes (not of its progress or resume settings)."""
    recon = None
    if recipe.recon is not None:
        recon = {f.name: _plain(getattr(recipe.recon, f.name)) for f in dataclasses.fields(recipe.recon)
                 if f.name not in ("progress", "resume_dir", "cache_dir", "cache_budget_mb")}
    parts = {"name": recipe.name, "quant": recipe.quant, "candidates": recipe.range_candidates, "recon": recon,
             "equalize": list(recipe.equalize), "alpha": recipe.equalize_alpha, "bc": recipe.bias_correction,
             "search_frames": recipe.search_frames, "recon_frames": recipe.recon_frames,
             "loss": _plain(recipe.select_loss), "sparse": recipe.sparse_calibration}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


class StageCheckpoints:
    """``load``/``save`` of finished stages under ``directory`` (a no-op without one)."""

    def __init__(self, directory: str | os.PathLike | None, recipe: Any, data: Sequence[Any]) -> None:
        self.directory = os.fspath(directory) if directory is not None else None
        self.fingerprint = f"{recipe_digest(recipe)}-{data_digest(data)}" if self.directory else ""

    def _path(self, stage: str) -> str:
        return os.path.join(self.directory or "", f"{stage}.pth")

    def load(self, stage: str) -> dict[str, Any] | None:
        if self.directory is None or not os.path.isfile(self._path(stage)):
            return None
        saved = torch.load(self._path(stage), map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self._path(stage)} was saved by a run with another recipe or other calibration "
                             "frames: resume with the same ones, or use a new resume directory (or delete it)")
        logger.info("resuming: stage %s loaded from %s", stage, self._path(stage))
        return saved["payload"]

    def save(self, stage: str, payload: dict[str, Any]) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._path(stage) + ".tmp"
        torch.save({"fingerprint": self.fingerprint, "payload": payload}, tmp)
        os.replace(tmp, self._path(stage))  # atomic: a kill never leaves half a file

    def recon_config(self, config: ReconConfig) -> ReconConfig:
        """Reconstruction saves its finished units beside the other stages unless told elsewhere."""
        if self.directory is None or config.resume_dir is not None:
            return config
        return dataclasses.replace(config, resume_dir=os.path.join(self.directory, "reconstruction"))
