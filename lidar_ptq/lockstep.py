"""Advance several batches through a model together, meeting at chosen modules.

Stages that fix the model layer by layer (bias correction, reconstruction) need each layer measured
on every calibration batch with all earlier layers already fixed. Running the model once per layer
does that at a cost that grows with the square of the depth. ``Lockstep`` runs one forward per
batch (a *lane*, each in its own quant mode) and pauses every lane at the output of each *stop*
module until all lanes have reached it; ``meet`` then sees every lane's inputs and output there,
may change the module (a correction, a learned rounding) and names the lanes that must compute it
again before going on. Lanes are threads, but one baton lets only one run at a time: results are
deterministic and each op keeps the machine's intra-op threads. A stop called several times per
forward meets at its first call; later calls run with whatever ``meet`` did.
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import call_model
from .quant.quantizer import FakeQuantizer, QuantMode


@dataclass
class Lane:
    batch: Any
    mode: QuantMode  # every quantizer of the model runs in this mode while the lane computes


@dataclass
class Arrival:
    lane: int
    args: tuple
    kwargs: dict
    output: Any


Meet = Callable[[str, nn.Module, list[Arrival]], Sequence[int]]  # returns the lanes that compute the stop again


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by other threads back to the system. Each lane is a thread and glibc gives each
    thread its own heap, which keeps what the thread freed: without this, a 4-frame lockstep on the
    synthetic pillar model held 4.0 GB resident instead of 1.4 GB."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Aborted(Exception):
    """Unwinds a waiting lane after another lane failed."""


class Lockstep:
    def __init__(self, model: nn.Module, lanes: Sequence[Lane], stops: Mapping[str, nn.Module], meet: Meet) -> None:
        self.model, self.lanes, self.stops, self.meet = model, list(lanes), dict(stops), meet
        self.quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
        self.baton = threading.Condition(threading.Lock())
        self.local = threading.local()
        self.arrivals: dict[str, list[Arrival]] = {}
        self.recompute: dict[str, set[int]] = {}
        self.done: set[str] = set()
        self.waiting: dict[str, int] = {}
        self.running = len(self.lanes)  # lanes not waiting at a stop (started or not, unfinished)
        self.meeting = False
        self.error: BaseException | None = None

    def current_lane(self) -> int | None:
        """The lane whose forward is running in this thread (None outside the lanes or inside ``meet``)."""
        return None if self.meeting else getattr(self.local, "lane", None)

    def _enter(self, lane: int) -> None:
        """The lane holds the baton from here: the model runs in its mode."""
        mode = self.lanes[lane].mode
        for quantizer in self.quantizers:
            quantizer.mode = mode

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, name: str) -> Any:
        lane = getattr(self.local, "lane", None)
        if lane is None or self.meeting or name in self.local.passed:
            return None  # another caller's forward, a forward made by ``meet``, or a later call
        self.local.passed.add(name)
        arrivals = self.arrivals.setdefault(name, [])
        arrivals.append(Arrival(lane, args, kwargs, output))
        if len(arrivals) == len(self.lanes):
            self.meeting = True
            try:
                self.recompute[name] = set(self.meet(name, module, sorted(arrivals, key=lambda a: a.lane)))
            finally:
                self.meeting = False
            del self.arrivals[name]  # frees the captured tensors
            release_freed_memory()
            self.done.add(name)
            self.running += self.waiting.pop(name, 0)
            self.baton.notify_all()
        else:
            self.running -= 1
            self.waiting[name] = self.waiting.get(name, 0) + 1
            if self.running == 0:  # every lane waits at a different stop: their orders differ
                self.error = RuntimeError(f"lockstep: the batches reach the model's layers in different orders "
                                          f"(stuck at {name}); pass batches of one kind of input")
                self.baton.notify_all()
            while name not in self.done and self.error is None:
                self.baton.wait()
            if self.error is not None:
                raise _Aborted
        self._enter(lane)
        if lane in self.recompute[name]:
            return module.forward(*args, **kwargs)
        return None

    def _run(self, lane: int) -> None:
        self.local.lane, self.local.passed = lane, set()
        with self.baton:
            try:
                self._enter(lane)
                with torch.no_grad():  # grad mode is per thread
                    call_model(self.model, self.lanes[lane].batch)
            except _Aborted:
                pass
            except BaseException as err:  # handed to the caller's thread
                if self.error is None:
                    self.error = err
            finally:
                self.running -= 1
                self.baton.notify_all()

    def run(self) -> None:
        """Run every lane to its end; re-raises the first error a lane or ``meet`` met."""
        previous = {q: q.mode for q in self.quantizers}
        handles = [module.register_forward_hook(lambda mod, a, k, out, _n=name: self._hook(mod, a, k, out, _n),
                                                with_kwargs=True) for name, module in self.stops.items()]
        try:
            threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.lanes))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for handle in handles:
                handle.remove()
            for quantizer, mode in previous.items():
                quantizer.mode = mode
        if self.error is not None:
            raise self.error
        never = sorted(set(self.stops) - self.done)
        if never:
            raise RuntimeError(f"lockstep: {len(never)} layer(s) were not reached by every batch: {never[:5]}")
