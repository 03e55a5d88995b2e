"""ONNX Runtime sessions on the CPU, configured one way for every check and benchmark."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import onnx


def ort_session(model: str | os.PathLike | onnx.ModelProto, optimized: bool = True, threads: int | None = None
                ) -> Any:
    """A CPU session. ``optimized=False`` uses ONNX Runtime's reference kernels (no graph fusions), which
    compute exactly what the file says; the fused INT8 kernels round like a real engine."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def median_latency_ms(session: Any, feeds: dict[str, Any], runs: int, warmup: int = 1) -> float:
    """Median wall time of one ``session.run`` in milliseconds, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)
