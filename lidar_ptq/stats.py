"""Paired bootstrap intervals of a benchmark metric (numpy only).

A difference between two quantized models on a test set is only a ranking if it survives a resampling
of that set and of the calibration draws. Every model is scored on the same resamples of the same
items (frames, images: a paired bootstrap), so the interval of a difference leaves out the items' own
difficulty, which both sides share; each side's calibration draws are resampled too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def resample_weights(items: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, items] how often each item is drawn in each bootstrap resample (with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, items, size=(resamples, items))
    return np.stack([np.bincount(p, minlength=items) for p in picks])


@dataclass
class Interval:
    """A difference of a metric (x100: percentage points) and its 95% bootstrap interval."""

    delta: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval leaves out zero: the sign of the difference is established."""
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float | bool]:
        return {"delta": round(self.delta, 3), "low": round(self.low, 3), "high": round(self.high, 3),
                "resolved": self.resolved}

    def cell(self) -> str:
        mark = "" if self.resolved else " (unresolved)"
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]{mark}"


@dataclass
class BootstrapSamples:
    """One model's metric on the items as they are and on every bootstrap resample of them."""

    point: float
    replicates: np.ndarray


def bootstrap_mean(values: np.ndarray, weights: np.ndarray) -> BootstrapSamples:
    """The mean of per-item ``values`` (e.g. 1 for a correct image) and its value on each resample in
    ``weights`` ([resamples, items], from ``resample_weights``)."""
    if weights.shape[1] != len(values):
        raise ValueError(f"resamples over {weights.shape[1]} items for {len(values)} values")
    values = np.asarray(values, dtype=np.float64)
    return BootstrapSamples(float(values.mean()), weights @ values / weights.sum(axis=1))


def paired_interval(a: Sequence[BootstrapSamples], b: Sequence[BootstrapSamples], level: float = 0.95, seed: int = 0
                    ) -> Interval:
    """Mean metric of ``a`` minus mean metric of ``b`` (x100), each a list of calibration draws (FP32: one),
    with its bootstrap interval. Every replicate takes one resample of the items, the same for all
    samples (they must come from the same resamples), and a resample of each side's draws, so the
    interval holds both the items' and the calibration draws' share of the spread."""
    if len({len(s.replicates) for s in (*a, *b)}) != 1:
        raise ValueError("paired samples must come from the same bootstrap resamples")
    rng = np.random.default_rng(seed)

    def side(samples: Sequence[BootstrapSamples]) -> np.ndarray:
        table = np.stack([s.replicates for s in samples])  # [draws, replicates]
        if len(samples) == 1:
            return table[0]
        picks = rng.integers(0, len(samples), size=table.shape)
        return np.take_along_axis(table, picks, axis=0).mean(axis=0)

    spread = 100.0 * (side(a) - side(b))
    point = 100.0 * (np.mean([s.point for s in a]) - np.mean([s.point for s in b]))
    tail = 100.0 * (1.0 - level) / 2.0
    return Interval(float(point), float(np.percentile(spread, tail)), float(np.percentile(spread, 100 - tail)))
