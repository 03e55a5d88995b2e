"""The task loss of anchor heads (PointPillars, SECOND): TGPL's idea on per-anchor outputs.

An anchor head returns, per feature level, classification logits ``[B, A*C, H, W]``
and regression maps of the same grid (boxes ``[B, A*7, H, W]``, direction
classes ``[B, A*2, H, W]``). The float model's confident, locally maximal class
scores are its positives; at those the quantized classification logits must
match, and at their locations every regression channel. It judges the range
search and guards bias correction and reconstruction on anchor heads, as TGPL
does on CenterHead (docs/method.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .tgpl import TaskGuidedPositiveLoss


def is_anchor_output(output: Any) -> bool:
    """Whether ``output`` is ``(cls_maps, reg_maps, ...)``, each a list of ``[B, C, H, W]`` per level."""
    if not isinstance(output, (list, tuple)) or len(output) < 2:
        return False
    if not all(isinstance(maps, (list, tuple)) and maps for maps in output):
        return False
    return (len({len(maps) for maps in output}) == 1
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 for maps in output for t in maps))


class AnchorPositiveLoss(TaskGuidedPositiveLoss):
    """``fn(quant_output, float_output, batch) -> scalar`` for anchor-head outputs (``is_anchor_output``)."""

    def __call__(self, quant_output: Sequence[Sequence[torch.Tensor]], float_output: Sequence[Sequence[torch.Tensor]],
                 batch: Any = None) -> torch.Tensor:
        if not (is_anchor_output(quant_output) and is_anchor_output(float_output)):
            raise TypeError("AnchorPositiveLoss expects (cls_maps, reg_maps, ...) lists of [B, C, H, W] maps per level")
        total, levels = None, len(quant_output[0])
        for level in range(levels):
            loss = self.level_loss([maps[level] for maps in quant_output], [maps[level] for maps in float_output])
            total = loss if total is None else total + loss
        return total / levels

    def level_loss(self, quant: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
        """Class logits are the scores; box and direction maps the regressions."""
        return self.positive_loss(quant[0], ref[0], list(zip(quant[1:], ref[1:])))
