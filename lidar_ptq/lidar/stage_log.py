"""Per-stage cost of a quantization run: wall time, model forwards and peak resident memory.

Every stage of ``run_ptq`` (and of the drivers around it: frame loading, export) runs inside
``StageLog.stage``. Nested stages are attributed exclusively: the guard's judging inside
reconstruction counts as "guard", not twice. Forwards are calls of the root model (a pass
stopped early by a hook counts as one), so a stage whose forwards grow with the square of the
layers shows at once. Peak memory is the process's resident high-water mark, reset at every
stage boundary where Linux allows it (``/proc/self/clear_refs``), else the peak so far.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    stage: str
    seconds: float = 0.0
    forwards: int = 0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}


def _read_hwm_mb() -> float:
    """Resident high-water mark in MB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _reset_hwm() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")


class StageLog:
    """Collects ``StageRecord``s in first-seen order; ``watch`` counts the forwards of a model."""

    def __init__(self) -> None:
        self.records: dict[str, StageRecord] = {}
        self._stack: list[tuple[StageRecord, float]] = []
        self._handles: list[Any] = []

    def watch(self, model: nn.Module) -> None:
        """Count every call of ``model`` towards the stage running at the time."""
        self._handles.append(model.register_forward_pre_hook(lambda module, args: self._count()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count(self) -> None:
        if self._stack:
            self._stack[-1][0].forwards += 1

    def _boundary(self) -> None:
        """Charge the time and memory peak since the last boundary to the running stage."""
        now = time.perf_counter()
        if self._stack:
            record, since = self._stack[-1]
            record.seconds += now - since
            record.peak_rss_mb = max(record.peak_rss_mb, _read_hwm_mb())
            self._stack[-1] = (record, now)
        _reset_hwm()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        record = self.records.setdefault(name, StageRecord(name))
        self._boundary()
        self._stack.append((record, time.perf_counter()))
        try:
            yield record
        finally:
            self._boundary()
            self._stack.pop()
            if self._stack:  # the parent resumes now
                parent, _ = self._stack[-1]
                self._stack[-1] = (parent, time.perf_counter())
            if not self._stack or self._stack[-1][0] is not record:
                logger.info("stage %s: %.1f s, %d forwards, peak %.0f MB", name, record.seconds, record.forwards,
                            record.peak_rss_mb)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per stage, plus ``total`` (seconds and forwards summed, the largest peak)."""
        rows = [r.to_dict() for r in self.records.values()]
        total = StageRecord("total", sum(r.seconds for r in self.records.values()),
                            sum(r.forwards for r in self.records.values()),
                            max((r.peak_rss_mb for r in self.records.values()), default=0.0))
        return [*rows, total.to_dict()]
