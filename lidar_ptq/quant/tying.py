"""One tensor, one step size: tie the activation quantizers that read the same tensor.

A tensor with several readers (a SECOND stage's output feeding the next stage and
the FPN, the CenterHead's shared conv feeding every task head) is quantized once
in a deployed engine: one Q node, one scale, so the producer can write INT8.
Calibration gives its readers identical ranges (same data), but reconstruction
learns each reader's LSQ step on its own and they drift apart (by <0.2 % on the
synthetic pillar model), which blocks that fusion. Here the first reader leads
and the others follow its step (``FakeQuantizer.follow``); only the leader learns.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from .quantizer import FakeQuantizer, QuantMode, temporary_quant_mode


def shared_input_groups(model: nn.Module, run: Callable[[], Any]) -> list[list[FakeQuantizer]]:
    """Per-tensor quantizers of ``model`` that read one tensor object during ``run()`` (one forward pass),
    grouped in the order they first read it; groups of one are left out. Readers with different specs
    (bits, signedness) are not grouped: they could not share a Q node anyway."""
    # Every tensor read gets its own entry, kept to the end: a tensor freed mid-forward can give its id to a
    # later one, and overwriting the first tensor's entry would drop its readers' group (which then depended
    # on the allocator, so runs of the same recipe tied different quantizers).
    entries: list[tuple[weakref.ref, list[FakeQuantizer]]] = []
    live: dict[int, int] = {}  # id of a tensor -> its entry in ``entries``
    candidates = [q for q in model.modules() if isinstance(q, FakeQuantizer) and q.enabled
                  and q.channel_axis is None]

    def record(quantizer: FakeQuantizer, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        index = live.get(id(x))
        if index is None or entries[index][0]() is not x:  # a new tensor (an id can be reused after a free)
            live[id(x)] = len(entries)
            entries.append((weakref.ref(x), [quantizer]))
        elif quantizer not in entries[index][1]:
            entries[index][1].append(quantizer)

    handles = [q.register_forward_pre_hook(record) for q in candidates]
    try:
        with torch.no_grad(), temporary_quant_mode(model, QuantMode.FLOAT):
            run()
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for _, readers_of_tensor in entries:
        by_spec: dict[Any, list[FakeQuantizer]] = {}
        for q in readers_of_tensor:
            by_spec.setdefault(repr(q.spec), []).append(q)
        groups.extend(g for g in by_spec.values() if len(g) > 1)
    return groups


def tie(groups: list[list[FakeQuantizer]]) -> None:
    """The first quantizer of each group leads; the others use its step from now on."""
    for leader, *followers in groups:
        for q in followers:
            q.follow(leader)


def sync(groups: list[list[FakeQuantizer]]) -> None:
    """Copy each leader's current step into its followers' buffers."""
    for _, *followers in groups:
        for q in followers:
            q.sync_from_leader()


def untie(groups: list[list[FakeQuantizer]]) -> None:
    """Followers own their (synced, equal) steps again: the saved model needs no tie information."""
    for _, *followers in groups:
        for q in followers:
            q.sync_from_leader()
            q.follow(None)
