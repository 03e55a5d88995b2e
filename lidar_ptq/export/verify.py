"""Does an exported Q/DQ file compute what the PyTorch fake-quant model computes?

End-to-end output comparisons of a deep INT8 network are dominated by rounding
chaos: a float difference of 1e-6 in one accumulation flips one code, which
flips more codes downstream (measured on the synthetic CenterPoint: 1e-5
relative noise on the biases moves 25% of some head outputs by more than one
step). So the file is checked layer by layer, *teacher-forced*: ONNX Runtime
runs the file with its reference kernels and returns every quantizer's integer
codes; PyTorch then runs with each quantizer's output replaced by ONNX
Runtime's, and each quantizer's own codes (from its PyTorch input) are compared
with the file's. A wrong scale, zero point, weight code, axis or wiring shows up
as large local differences; correct files differ by at most one code in a tiny
share of elements (float rounding at the .5 boundaries).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..quant.quantizer import FakeQuantizer
from .qdq_rewrite import quantizer_names
from .runtime import ort_session


def quantizer_codes(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Run the file with ONNX Runtime's reference kernels; integer codes of every named QuantizeLinear,
    by quantizer name, in graph order (a quantizer used twice has two entries)."""
    model = onnx.load(str(path))
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and quantizer_names(n)]
    existing = {o.name for o in model.graph.output}
    for node in quants:
        if node.output[0] not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    session = ort_session(model, optimized=False)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    codes: dict[str, list[np.ndarray]] = defaultdict(list)
    for node in quants:
        for name in quantizer_names(node):
            codes[name].append(values[node.output[0]])
    return codes


@torch.no_grad()
def layerwise_agreement(model: nn.Module, args: Sequence[Any], path: str | os.PathLike,
                        input_names: Sequence[str]) -> dict[str, Any]:
    """Teacher-forced comparison of every activation quantizer (see the module docstring).

    Returns the number of quantizers compared, the largest code difference, the share of
    differing codes (overall and worst quantizer) and the quantizers the file lacks; a model without
    an INT8 activation (every layer in FP16 by a precision plan) has nothing to compare layer by layer.
    """
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args)}
    codes = quantizer_codes(path, feeds)
    calls: dict[str, int] = defaultdict(int)
    stats: dict[str, list[float]] = {}
    missing: list[str] = []
    handles = []

    def hook(q: FakeQuantizer, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        k = calls[q.name]
        calls[q.name] += 1
        if q.name not in codes or k >= len(codes[q.name]):
            missing.append(q.name)
            return None
        file_codes = torch.from_numpy(codes[q.name][k].astype(np.int64)).to(output.device)
        own = q.to_int(inputs[0]).to(torch.int64)
        diff = (own - file_codes).abs()
        prev = stats.get(q.name, [0.0, 0.0, 0.0])
        stats[q.name] = [max(prev[0], float(diff.max()) if diff.numel() else 0.0), prev[1] + float((diff > 0).sum()),
                         prev[2] + diff.numel()]
        zero_point = q._broadcast(q.zero_point, output)
        scale = q._broadcast(q.scale.detach(), output)
        return ((file_codes - zero_point) * scale).to(output.dtype)  # continue from the file's values

    for module in model.modules():
        if isinstance(module, FakeQuantizer) and module.enabled and module.channel_axis is None:
            handles.append(module.register_forward_hook(hook))
    if not handles:
        return {"quantizers": 0, "max_code_diff": 0.0, "differing_code_share": 0.0, "missing_in_file": [],
                "note": "no INT8 activation in this part (every layer FP16): compared end to end only"}
    try:
        model.eval()
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    if not stats:
        raise ValueError(f"{path}: no quantizer of the model was found in the file (was it exported by lidar_ptq?)")
    differing = sum(s[1] for s in stats.values())
    total = sum(s[2] for s in stats.values())
    worst = max(stats, key=lambda n: stats[n][1] / max(stats[n][2], 1))
    return {"quantizers": len(stats), "max_code_diff": max(s[0] for s in stats.values()),
            "differing_code_share": differing / max(total, 1),
            "worst_quantizer": worst, "worst_quantizer_share": stats[worst][1] / max(stats[worst][2], 1),
            "missing_in_file": sorted(set(missing))}
