"""Active sites of dense BEV maps for sparsity-based calibration.

Right after the pillar scatter, the non-empty BEV cells are exactly the
non-zero ones (about 3% of a nuScenes sweep). Deeper in the dense backbone a
conv with a bias makes empty cells non-zero, so "non-zero" stops meaning
"occupied". ``OccupancyMask`` records the occupancy at a source module (e.g.
the scatter / middle encoder) on every forward pass and gives each sparse
activation observer that occupancy resized to its own grid: max-pooled when
the layer is downsampled (a coarse cell is active if any fine cell is),
nearest-upsampled otherwise.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.model import iter_quantizers


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean [B, 1, H, W] occupancy at another resolution."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.adaptive_max_pool2d(mask.float(), size) > 0
    return F.interpolate(mask.float(), size=size, mode="nearest") > 0


class OccupancyMask:
    """Context manager: BEV occupancy from ``source`` feeds the sparse observers of ``model``."""

    def __init__(self, model: nn.Module, source: str) -> None:
        modules = dict(model.named_modules())
        if source not in modules:
            raise KeyError(f"occupancy source {source!r} is not a module of the model; give the name of the "
                           "module whose output is the scattered BEV map (e.g. 'pts_middle_encoder')")
        self.model, self.source = model, modules[source]
        self.mask: torch.Tensor | None = None
        self._handle: Any = None

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        bev = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(bev, torch.Tensor) or bev.dim() != 4:
            raise TypeError(f"occupancy source must output a [B, C, H, W] BEV map, got {type(bev).__name__}")
        self.mask = (bev != 0).any(dim=1, keepdim=True)

    def provide(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None or x.dim() != 4 or x.shape[0] != self.mask.shape[0]:
            return None  # not a BEV map of this batch: fall back to non-zero sites
        return resize_mask(self.mask, x.shape[-2:])

    def __enter__(self) -> OccupancyMask:
        self._handle = self.source.register_forward_hook(self._record)
        for _, quantizer in iter_quantizers(self.model):
            quantizer.site_mask_provider = self.provide
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        for _, quantizer in iter_quantizers(self.model):
            quantizer.site_mask_provider = None
        self.mask = None
