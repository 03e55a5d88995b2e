"""Paired bootstrap intervals of nuScenes-style mAP over val frames.

A difference between two detectors on a few hundred frames is only a ranking if it survives a
resampling of those frames. Whether a detection is a true positive depends on its own frame alone
(nuScenes-devkit matches greedily by score within a frame), so every detection is matched once; a
resample of the frames then only reweights the matched detections and recomputes AP. Two tables
built on the same frames are resampled with the same draws (a paired bootstrap), so the interval of
their difference leaves out the frames' own difficulty, which both share.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..stats import BootstrapSamples
from .metrics import DIST_THRESHOLDS

MIN_RECALL = 0.1
MIN_PRECISION = 0.1
RECALL_GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class MatchTable:
    """Every detection of one model on a list of frames, matched to the ground truth at each threshold."""

    frame: np.ndarray      # [D] frame number of each detection
    label: np.ndarray      # [D] class index
    tp: np.ndarray         # [D, T] true positive at each distance threshold
    gt_count: np.ndarray   # [F, C] ground-truth boxes per frame and class
    # [D] detections in the devkit's order (descending score, later detection first on a tie)
    order: np.ndarray

    @property
    def frames(self) -> int:
        return self.gt_count.shape[0]

    @cached_property
    def class_orders(self) -> list[np.ndarray]:
        """Each class's detections in the devkit's order (fixed: a resample only reweights them)."""
        labels = self.label[self.order]
        return [self.order[labels == c] for c in range(self.gt_count.shape[1])]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, frame=self.frame, label=self.label, tp=self.tp, gt_count=self.gt_count,
                            order=self.order)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> MatchTable:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in ("frame", "label", "tp", "gt_count", "order")})


def _match_frame(gt_xy: np.ndarray, pred_xy: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy matching of one frame and class: predictions in the given (score) order take the nearest
    untaken ground truth; a true positive if it is nearer than ``threshold`` (nuScenes-devkit's rule)."""
    hits = np.zeros(len(pred_xy), dtype=bool)
    if not len(gt_xy):
        return hits
    taken = np.zeros(len(gt_xy), dtype=bool)
    dist = np.linalg.norm(pred_xy[:, None, :] - gt_xy[None, :, :], axis=-1)
    for i in range(len(pred_xy)):
        row = np.where(taken, np.inf, dist[i])
        j = int(np.argmin(row))
        if row[j] < threshold:
            taken[j], hits[i] = True, True
    return hits


def match_frames(frames: Sequence[dict[str, Any]], classes: Sequence[str],
                 thresholds: Sequence[float] = DIST_THRESHOLDS) -> MatchTable:
    """Match the records of ``CenterDistanceMAP`` (``{"gt": ..., "pred": ...}`` per frame) once."""
    scores, frame_ids, labels, tps, positions = [], [], [], [], []
    offset = 0  # the devkit enumerates the frames' boxes in order: its tie-break among equal scores
    gt_count = np.zeros((len(frames), len(classes)), dtype=np.int64)
    for f, record in enumerate(frames):
        gt, pred = record["gt"], record["pred"]
        gt_labels, pred_labels = np.asarray(gt["labels"]), np.asarray(pred["labels"])
        pred_scores = np.asarray(pred["scores"], dtype=np.float64)
        for c in range(len(classes)):
            gt_count[f, c] = int((gt_labels == c).sum())
            mine = np.flatnonzero(pred_labels == c)
            if not len(mine):
                continue
            # descending score; on a tie the later detection first, as the devkit's reversed sort
            mine = mine[np.lexsort((-mine, -pred_scores[mine]))]
            gt_xy = np.asarray(gt["centres"])[gt_labels == c][:, :2]
            pred_xy = np.asarray(pred["centres"])[mine][:, :2]
            tps.append(np.stack([_match_frame(gt_xy, pred_xy, th) for th in thresholds], axis=1))
            scores.append(pred_scores[mine])
            frame_ids.append(np.full(len(mine), f))
            labels.append(np.full(len(mine), c))
            positions.append(offset + mine)
        offset += len(pred_labels)
    if scores:
        score, frame = np.concatenate(scores), np.concatenate(frame_ids)
        label, tp, position = np.concatenate(labels), np.concatenate(tps), np.concatenate(positions)
    else:
        score, frame, label, position = np.zeros(0), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
        tp = np.zeros((0, len(thresholds)), dtype=bool)
    order = np.lexsort((-position, -score))
    return MatchTable(frame.astype(np.int32), label.astype(np.int16), tp, gt_count, order)


def _average_precision(tp_sorted: np.ndarray, positives: float) -> float:
    """nuScenes AP of detections in score order: precision on the 101-point recall grid, recall and
    precision below 10% left out (``nuscenes.eval.detection.algo.calc_ap``)."""
    if positives <= 0 or not tp_sorted.any():
        return 0.0
    tp = np.cumsum(tp_sorted, dtype=np.float64)
    fp = np.cumsum(~tp_sorted, dtype=np.float64)
    precision = np.interp(RECALL_GRID, tp / positives, tp / (tp + fp), right=0.0)
    kept = precision[round(100 * MIN_RECALL) + 1:] - MIN_PRECISION
    return float(np.clip(kept, 0.0, None).mean()) / (1.0 - MIN_PRECISION)


def mean_ap(table: MatchTable, weights: np.ndarray | None = None) -> float:
    """mAP of the table's frames, each counted ``weights[f]`` times (a bootstrap resample; None: once)."""
    weights = np.ones(table.frames, dtype=np.int64) if weights is None else weights
    aps = np.zeros((table.gt_count.shape[1], table.tp.shape[1]))
    for c, mine in enumerate(table.class_orders):
        times = weights[table.frame[mine]]
        positives = float(weights @ table.gt_count[:, c])
        for t in range(aps.shape[1]):
            aps[c, t] = _average_precision(np.repeat(table.tp[mine, t], times), positives)
    return float(aps.mean())


def bootstrap_map(table: MatchTable, weights: np.ndarray) -> BootstrapSamples:
    """mAP of ``table`` on its frames and on each resample in ``weights`` ([draws, frames])."""
    if weights.shape[1] != table.frames:
        raise ValueError(f"resamples over {weights.shape[1]} frames for a table of {table.frames}: paired tables "
                         "must cover the same frames")
    return BootstrapSamples(mean_ap(table), np.array([mean_ap(table, w) for w in weights]))


def bootstrap_map_file(path: Path, weights: np.ndarray) -> BootstrapSamples:
    """``bootstrap_map`` of the match table saved at ``path``, kept beside it: a thousand resamples cost
    seconds per table, and a report reads every table again each time a row is added. The kept samples
    are used only while they are newer than the table and were drawn with the same resamples."""
    cache = path.with_suffix(".bootstrap.npz")
    digest = np.frombuffer(hashlib.sha256(np.ascontiguousarray(weights).tobytes()).digest(), dtype=np.uint8)
    if cache.is_file() and cache.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        with np.load(cache) as kept:
            if np.array_equal(kept["weights_digest"], digest):
                return BootstrapSamples(float(kept["point"]), kept["replicates"])
    samples = bootstrap_map(MatchTable.load(path), weights)
    tmp = cache.with_suffix(".tmp.npz")  # written whole, then renamed: a killed run leaves no half file
    np.savez(tmp, point=samples.point, replicates=samples.replicates, weights_digest=digest)
    tmp.replace(cache)
    return samples
