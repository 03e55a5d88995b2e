"""What every benchmark records about the machine it ran on, so that its times can be read: the CPU, the
threads torch used, the versions, and the load before the run (another job on the cores slows every row)."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch


def describe_machine(load: bool = True) -> dict[str, Any]:
    """``machine`` (one line), ``torch`` and, with ``load`` (call it before the work starts),
    ``load_before``: the 1-minute load average."""
    cpu = platform.processor() or platform.machine()
    found: dict[str, Any] = {"machine": f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                                        f"Python {platform.python_version()}",
                             "torch": torch.__version__}
    return {**found, "load_before": os.getloadavg()[0]} if load else found
