"""Calibration observers: they watch tensors and propose a clipping range.

Every observer reduces what it sees to a ``[C, N]`` view (``C = 1`` for
per-tensor quantizers). With ``sparse=True`` only *active sites* count: the
locations whose feature vector is not all zero (empty pillars/voxels of a
scattered BEV map), or the sites an explicit mask marks. On a LiDAR BEV map
about 97% of cells are empty, so without this the zeros dominate every
distribution-based statistic.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .functional import fake_quantize, range_to_scale
from .spec import QuantSpec

OBSERVERS: dict[str, Callable[..., Observer]] = {}


def register_observer(name: str) -> Callable[[type], type]:
    """Register an observer class under ``name`` for use in quantizer specs."""
    def wrap(cls: type) -> type:
        OBSERVERS[name] = cls
        return cls
    return wrap


def build_observer(spec: QuantSpec, channel_axis: int | None, feature_axis: int) -> Observer:
    """Create the observer a spec names; unknown names list the valid ones."""
    if spec.observer not in OBSERVERS:
        raise KeyError(f"unknown observer {spec.observer!r}; registered observers: {sorted(OBSERVERS)}")
    return OBSERVERS[spec.observer](spec, channel_axis=channel_axis, feature_axis=feature_axis,
                                    **dict(spec.observer_kwargs))


def active_site_mask(x: torch.Tensor, feature_axis: int) -> torch.Tensor:
    """Sites whose feature vector has any non-zero entry (keeps ``feature_axis`` with size 1)."""
    return (x != 0).any(dim=feature_axis, keepdim=True)


class Observer:
    """Base class: turns observed tensors into per-channel rows and a range proposal."""

    def __init__(self, spec: QuantSpec, channel_axis: int | None = None, feature_axis: int = 1,
                 sparse: bool = False) -> None:
        self.spec = spec
        self.channel_axis = channel_axis
        self.feature_axis = feature_axis
        self.sparse = sparse
        self.num_observed = 0

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """View ``x`` as ``[C, N]``: one row per channel, only active sites if sparse."""
        x = x.detach().float()
        if self.sparse or mask is not None:
            if x.dim() < 2:
                raise ValueError("sparse observation needs a tensor with a feature axis; got a 1-D tensor")
            fa = self.feature_axis % x.dim()
            if mask is None:
                mask = active_site_mask(x, fa)
            if self.channel_axis is not None and self.channel_axis % x.dim() != fa:
                raise ValueError("sparse observation supports per-tensor or per-feature-channel ranges only")
            mask = mask.to(torch.bool)
            if mask.shape[fa] != 1:
                mask = mask.any(dim=fa, keepdim=True)
            site = mask.expand(*[s if i != fa else 1 for i, s in enumerate(x.shape)]).movedim(fa, -1).squeeze(-1)
            feats = x.movedim(fa, -1)[site]  # [K, C]
            if self.channel_axis is None:
                return feats.reshape(1, -1)
            return feats.t()
        if self.channel_axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.channel_axis % x.dim(), 0).reshape(x.shape[self.channel_axis], -1)

    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = self.rows(x, mask)
        if rows.numel() == 0:
            return
        self.num_observed += 1
        self._update(rows)

    def _update(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (lo, hi), each of shape ``[C]``."""
        raise NotImplementedError

    # What an observer records (as opposed to how it turns that into a range): two observers of one
    # tensor with the same ``record_key`` record the same state, so one can record for both (several
    # clipping rules calibrated in one pass, lidar_ptq.lidar.range_search).
    record_fields: tuple[str, ...] = ("num_observed",)

    def record_key(self) -> tuple | None:
        return None

    def adopt_record(self, other: Observer) -> None:
        for name in self.record_fields:
            setattr(self, name, getattr(other, name))


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum per channel (the classic max-min calibration)."""

    record_fields = ("num_observed", "lo", "hi")

    def __init__(self, spec: QuantSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def record_key(self) -> tuple | None:
        return ("minmax", self.sparse) if type(self) in (MinMaxObserver, SparseMinMaxObserver) else None

    def _update(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data (no non-empty sites)")
        return self.lo, self.hi


@register_observer("sparse_minmax")
class SparseMinMaxObserver(MinMaxObserver):
    """Min-max over active (non-empty) sites only: LiDAR-PTQ's sparsity-based calibration."""

    def __init__(self, spec: QuantSpec, **kwargs) -> None:
        kwargs.setdefault("sparse", True)
        super().__init__(spec, **kwargs)


@register_observer("lp_search")
class LpSearchObserver(MinMaxObserver):
    """Min-max, then a grid search of the clipping range minimising the Lp quantization error.

    The candidates shrink the observed range by factors ``1, ..., min_ratio``; the
    error is measured per channel on at most ``max_samples`` observed values, a
    uniform sample of everything observed (every frame weighs by its size, not
    the last one by default), drawn at a cost linear in what was observed.
    """

    def __init__(self, spec: QuantSpec, p: float = 2.4, num_candidates: int = 50, min_ratio: float = 0.2,
                 max_samples: int = 1 << 18, seed: int = 0, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if not 0 < min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        self.p = p
        self.num_candidates = num_candidates
        self.min_ratio = min_ratio
        self.max_samples = max_samples
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: torch.Tensor | None = None
        self.seen = 0  # values per channel observed so far (the sample stands for all of them)

    record_fields = ("num_observed", "lo", "hi", "samples", "seen")

    def record_key(self) -> tuple | None:
        return ("lp_samples", self.sparse, self.max_samples, self.seed)

    def _update(self, rows: torch.Tensor) -> None:
        super()._update(rows)
        rows = rows.cpu()
        new, total = rows.shape[1], self.seen + rows.shape[1]
        self.seen = total
        if self.samples is None or total <= self.max_samples:
            self.samples = rows if self.samples is None else torch.cat([self.samples, rows], dim=1)
            self.samples = self._pick(self.samples, min(self.samples.shape[1], self.max_samples))
            return
        # each retained value stands for total / max_samples observed ones: the new rows get their share
        from_new = min(new, max(self.max_samples - self.samples.shape[1], round(self.max_samples * new / total)))
        self.samples = torch.cat([self._pick(self.samples, self.max_samples - from_new), self._pick(rows, from_new)],
                                 dim=1)

    def _pick(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` of the columns of ``rows``, drawn uniformly without replacement."""
        if count >= rows.shape[1]:
            return rows
        if rows.shape[1] > 4 * count:  # a full permutation of a large tensor costs more than the forward
            keep = torch.unique(torch.randint(rows.shape[1], (count + count // 2,), generator=self.generator))
            keep = keep[torch.randperm(keep.numel(), generator=self.generator)[:count]]
            if keep.numel() == count:
                return rows[:, keep]
        return rows[:, torch.randperm(rows.shape[1], generator=self.generator)[:count]]

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().compute_range()
        lo, hi = lo.cpu(), hi.cpu()
        x = self.samples
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(1.0, self.min_ratio, self.num_candidates).tolist():
            cand_lo, cand_hi = lo * ratio, hi * ratio
            scale, zp = range_to_scale(cand_lo, cand_hi, self.spec)
            xq = fake_quantize(x, scale[:, None], zp[:, None], self.spec.qmin, self.spec.qmax)
            err = (xq - x).abs().pow(self.p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, cand_lo, best_lo)
            best_hi = torch.where(better, cand_hi, best_hi)
        self.best_error = best_err
        return best_lo.to(self.lo.device), best_hi.to(self.hi.device)


class HistogramObserver(Observer):
    """Histogram of |x| over [0, max|x|] (per tensor), grown by merging bins when the max grows.

    Used for range choices that need the whole distribution (percentile, entropy).
    Only symmetric (or unsigned) quantizers fit an |x| histogram.
    """

    def __init__(self, spec: QuantSpec, num_bins: int = 2048, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if self.channel_axis is not None:
            raise ValueError(f"observer {type(self).__name__} is per-tensor only; use 'minmax' or "
                             "'lp_search' for per-channel quantizers")
        if not spec.symmetric:
            raise ValueError(f"observer {type(self).__name__} needs a symmetric quantizer "
                             "(set symmetric=True, or use 'minmax'/'lp_search')")
        self.num_bins = num_bins
        self.hist = np.zeros(num_bins, dtype=np.float64)
        self.bin_width = 0.0

    record_fields = ("num_observed", "hist", "bin_width")

    def record_key(self) -> tuple | None:
        return ("abs_histogram", self.sparse, self.num_bins)

    def _update(self, rows: torch.Tensor) -> None:
        values = rows.abs().reshape(-1)
        vmax = float(values.max())
        if vmax == 0.0 and self.bin_width == 0.0:
            self.hist[0] += values.numel()
            return
        if self.bin_width == 0.0:
            self.bin_width = vmax / self.num_bins
        elif vmax > self.bin_width * self.num_bins:
            factor = math.ceil(vmax / (self.bin_width * self.num_bins))
            merged = np.zeros(self.num_bins, dtype=np.float64)
            np.add.at(merged, np.arange(self.num_bins) // factor, self.hist)
            self.hist = merged
            self.bin_width *= factor
        idx = torch.clamp((values / self.bin_width).long(), max=self.num_bins - 1)
        self.hist += torch.bincount(idx, minlength=self.num_bins).cpu().numpy()

    def _amax_range(self, amax: float) -> tuple[torch.Tensor, torch.Tensor]:
        hi = torch.tensor([amax])
        lo = -hi if self.spec.signed else torch.zeros(1)
        return lo, hi

    def _require_data(self) -> None:
        if self.hist.sum() == 0:
            raise RuntimeError("observer saw no data (no non-empty sites)")


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clip |x| at a percentile of its distribution (e.g. 99.99)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        cdf = np.cumsum(self.hist) / self.hist.sum()
        idx = int(np.searchsorted(cdf, self.percentile / 100.0 - 1e-12))
        return self._amax_range((min(idx, self.num_bins - 1) + 1) * self.bin_width)


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT's entropy calibrator), as a baseline.

    For each candidate threshold the clipped histogram P (outliers folded into the
    last bin) is compared with its coarse version Q having as many bins as the
    quantizer has positive levels; the threshold with the smallest KL(P||Q) wins.
    """

    def __init__(self, spec: QuantSpec, start_bin: int | None = None, stride: int = 1, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.start_bin = start_bin
        self.stride = stride

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        hist = self.hist.copy()
        # Exact zeros (ReLU outputs, empty sites) pile up in bin 0 and would make the
        # smallest threshold win; weigh bin 0 like its neighbour instead.
        hist[0] = hist[1]
        levels = self.spec.qmax + 1
        start = self.start_bin or levels
        best_kl, best_i = float("inf"), self.num_bins
        for i in range(start, self.num_bins + 1, self.stride):
            kl = self._kl_at(hist, i, levels)
            if kl < best_kl:
                best_kl, best_i = kl, i
        return self._amax_range((best_i + 0.5) * self.bin_width if best_i < self.num_bins
                                else self.num_bins * self.bin_width)

    @staticmethod
    def _kl_at(hist: np.ndarray, i: int, levels: int) -> float:
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        total = ref.sum()
        if total == 0:
            return float("inf")
        group = (np.arange(i) * levels) // i  # which coarse bin each fine bin falls in
        nonzero = hist[:i] > 0
        group_sum = np.bincount(group, weights=hist[:i], minlength=levels)
        group_cnt = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        expanded = np.where(nonzero, group_sum[group] / np.maximum(group_cnt[group], 1), 0.0)
        p = ref / total
        q_total = expanded.sum()
        if q_total == 0:
            return float("inf")
        q = expanded / q_total
        support = p > 0
        q_s = np.where(q[support] > 0, q[support], 1e-12)
        return float(np.sum(p[support] * np.log(p[support] / q_s)))
