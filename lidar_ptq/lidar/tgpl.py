"""Task-guided global positive loss (TGPL) of LiDAR-PTQ.

The float model's own heatmap decides where the objects are: per task, local
peaks of the sigmoid heatmap above a score threshold (optionally only the top-k
per sample). At those positives the quantized model's heatmap logits (per
class) and regression maps (offset, height, size, rotation, velocity: per
location) must match the float model's. Used as ``ReconConfig.output_loss``, it
drives the quantization parameters from the final detector output.

Head outputs are read generically: any nesting of lists/tuples whose leaves are
dicts of ``[B, C, H, W]`` maps, one dict per task (CenterPoint's ``CenterHead``
returns one list of per-task dicts per feature level).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TGPLConfig:
    score_threshold: float = 0.1
    top_k: int | None = 500             # per sample and task; None keeps every peak above the threshold
    peak_kernel: int = 3                # a positive is a local maximum in this window (1 disables)
    heatmap_key: str = "heatmap"
    regression_keys: Sequence[str] = ("reg", "height", "dim", "rot", "vel")
    heatmap_weight: float = 1.0
    regression_weight: float = 1.0


def task_dicts(output: Any) -> list[dict[str, torch.Tensor]]:
    """Flatten a head output into its per-task dicts, in order."""
    if isinstance(output, dict):
        return [output]
    if isinstance(output, (list, tuple)):
        return [d for item in output for d in task_dicts(item)]
    raise TypeError(f"TGPL expects (nested lists of) dicts of head maps, got {type(output).__name__}")


@torch.no_grad()
def select_positives(heatmap_logits: torch.Tensor, cfg: TGPLConfig) -> torch.Tensor:
    """Boolean [B, C, H, W] mask of the float heatmap's positives (peaks, threshold, top-k)."""
    score = heatmap_logits.sigmoid()
    keep = score >= cfg.score_threshold
    if cfg.peak_kernel > 1:
        pooled = F.max_pool2d(score, cfg.peak_kernel, stride=1, padding=cfg.peak_kernel // 2)
        keep &= score == pooled
    if cfg.top_k is not None:
        flat = torch.where(keep, score, torch.full_like(score, -1.0)).flatten(1)
        k = min(cfg.top_k, flat.shape[1])
        threshold = flat.topk(k, dim=1).values[:, -1:]
        keep &= (flat >= threshold).view_as(keep)
    return keep


class TaskGuidedPositiveLoss:
    """``fn(quant_output, float_output, batch) -> scalar``, usable as ``ReconConfig.output_loss``.

    The float outputs of a run are taken once and judged against many times (range candidates, guards,
    reconstruction steps), so each float heatmap's positives are selected once and remembered for as
    long as that heatmap lives."""

    def __init__(self, cfg: TGPLConfig | None = None) -> None:
        self.cfg = cfg or TGPLConfig()
        self._positives: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def positives(self, heatmap: torch.Tensor) -> torch.Tensor:
        """``select_positives`` of a float heatmap, computed once per tensor."""
        cached = self._positives.get(id(heatmap))
        if cached is not None and cached[0]() is heatmap:
            return cached[1]
        mask = select_positives(heatmap.detach(), self.cfg)
        self._positives = {k: v for k, v in self._positives.items() if v[0]() is not None}
        self._positives[id(heatmap)] = (weakref.ref(heatmap), mask)
        return mask

    def __getstate__(self) -> dict[str, Any]:  # deep copies and pickles carry the settings, not the cache
        return {"cfg": self.cfg, "_positives": {}}

    def __call__(self, quant_output: Any, float_output: Any, batch: Any = None) -> torch.Tensor:
        quant_tasks, float_tasks = task_dicts(quant_output), task_dicts(float_output)
        if len(quant_tasks) != len(float_tasks):
            raise ValueError(f"quantized and float outputs have {len(quant_tasks)} vs {len(float_tasks)} tasks")
        total = None
        for q, f in zip(quant_tasks, float_tasks):
            loss = self.task_loss(q, f)
            total = loss if total is None else total + loss
        return total / max(len(quant_tasks), 1)

    def task_loss(self, quant: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
        key = self.cfg.heatmap_key
        regressions = [(quant[k], ref[k]) for k in self.cfg.regression_keys if k in quant and k in ref]
        return self.positive_loss(quant[key], ref[key], regressions)

    def positive_loss(self, scores_q: torch.Tensor, scores_ref: torch.Tensor,
                      regressions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """At the float model's positives (peaks of ``scores_ref``, [B, C, H, W] logits): the squared
        logit error per class, plus every regression map's squared error at the positives' locations."""
        positives = self.positives(scores_ref)
        zero = scores_q.sum() * 0.0  # keeps the graph when there is no positive
        if not positives.any():
            return zero
        loss = self.cfg.heatmap_weight * (scores_q - scores_ref.detach())[positives].pow(2).mean()
        locations = positives.any(dim=1)  # [B, H, W]
        for q, f in regressions:
            diff = (q - f.detach()).permute(0, 2, 3, 1)[locations]
            loss = loss + self.cfg.regression_weight * diff.pow(2).mean()
        return loss + zero
