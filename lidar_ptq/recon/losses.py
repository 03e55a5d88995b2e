"""Reconstruction losses on a unit's output, and task losses for Fisher weighting.

Reduction follows BRECQ: sum over the channel axis, mean over samples and
positions, so the rounding regulariser's lambda keeps its published meaning.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

# fn(quantized_model_output, float_model_output, batch) -> scalar; TGPL plugs in here.
OutputLoss = Callable[[Any, Any, Any], torch.Tensor]
# fn(model_output, batch) -> scalar; its gradient w.r.t. a unit output gives BRECQ's Fisher weights.
TaskLoss = Callable[[Any, Any], torch.Tensor]


def lp_loss(output: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """|output - target|^p summed over channels (axis 1), averaged over everything else."""
    diff = (output - target).abs().pow(p)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def fisher_loss(output: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Squared error weighted by the squared task-loss gradient (diagonal Fisher, BRECQ).

    The engine rescales ``grad`` to unit mean square per unit, so the loss has the
    magnitude of an MSE and the rounding regulariser's lambda keeps its meaning."""
    weighted = ((output - target) * grad).pow(2)
    return weighted.sum(1).mean() if weighted.dim() > 1 else weighted.mean()


def self_label_cross_entropy(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """Label-free classification task loss: cross-entropy against the model's own prediction."""
    return F.cross_entropy(output, output.detach().argmax(dim=1))

