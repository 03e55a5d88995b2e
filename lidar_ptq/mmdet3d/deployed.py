"""Run a detector with its exported files in place of its networks (ONNX Runtime + the libspconv reader).

``with deployed_parts(detector, export_dir): evaluate(...)`` scores exactly what
the export says: the pillar/voxel encoder and dense network through ONNX Runtime, the
sparse backbone through ``SparseOnnxRunner``, while voxelization, scatter, box
decoding and NMS stay mmdet3d's (the application's part in deployment). Used
by the export benchmark to measure the deployed mAP next to PyTorch's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..export.runtime import ort_session
from .adapter import DetectorAdapter, unwrap_model
from .export import POINT_ENCODER_INPUTS, flatten_outputs, unflatten_outputs


class _OnnxModule(nn.Module):
    def __init__(self, path: Path, input_names: list[str], optimized: bool = True) -> None:
        super().__init__()
        self.session = ort_session(path, optimized)
        self.input_names = input_names

    def run(self, *tensors: torch.Tensor) -> list[np.ndarray]:
        return self.session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors)})


class _OnnxPointEncoder(_OnnxModule):
    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        return torch.from_numpy(self.run(voxels, num_points, coors)[0]).to(voxels.device)


class _SparseOnnxBackbone(nn.Module):
    def __init__(self, path: Path, sparse_shape: list[int]) -> None:
        super().__init__()
        from ..export.sparse_check import SparseOnnxRunner
        self.runner = SparseOnnxRunner(path)
        self.sparse_shape = sparse_shape

    def forward(self, voxel_features: torch.Tensor, coors: torch.Tensor, batch_size: int, *args: Any) -> torch.Tensor:
        return self.runner(voxel_features.cpu(), coors.cpu(), int(batch_size)).to(voxel_features.device)


class _PassThrough(nn.Module):
    """Backbone/neck stand-in: the BEV map goes straight to the (ONNX) head."""

    def forward(self, x: Any) -> Any:
        return [x] if isinstance(x, torch.Tensor) else x  # mmdet3d passes feature lists between parts


@contextlib.contextmanager
def deployed_parts(model: nn.Module, export_dir: str | Path, optimized: bool = True) -> Iterator[nn.Module]:
    """Within the block ``model`` runs the exported files; its own parts are restored afterwards.

    ``optimized=False`` runs ONNX Runtime's reference kernels (the file's exact arithmetic) instead of
    its fused INT8 kernels (which round like a real engine)."""
    export_dir = Path(export_dir)
    detector = unwrap_model(model)
    adapter = DetectorAdapter(detector)
    names = adapter.part_names
    originals = {name: getattr(detector, name) for name in names}
    head = adapter.head
    dense = _OnnxModule(export_dir / "dense.onnx", ["bev"], optimized)
    template: dict[str, Any] = {}

    def head_forward(feats: Any) -> Any:
        bev = feats[0] if isinstance(feats, (list, tuple)) else feats
        if "structure" not in template:  # the head's output nesting, from one PyTorch pass
            with torch.no_grad():
                x = originals[names[2]](bev)
                x = originals[names[3]](x) if len(names) == 5 else x
                template["structure"] = type(head).forward(head, x)
        flat = dense.run(bev)
        names_out = [n for n, _ in flatten_outputs(template["structure"])]
        if len(names_out) != len(flat):
            raise RuntimeError(f"dense.onnx has {len(flat)} outputs, the head {len(names_out)}")
        return unflatten_outputs(template["structure"], [torch.from_numpy(a).to(bev.device) for a in flat])

    try:
        if (export_dir / "sparse_backbone.onnx").is_file():
            setattr(detector, names[1], _SparseOnnxBackbone(export_dir / "sparse_backbone.onnx",
                                                            list(originals[names[1]].sparse_shape)))
        for stem in ("pillar_encoder", "voxel_encoder"):
            if (export_dir / f"{stem}.onnx").is_file():
                setattr(detector, names[0], _OnnxPointEncoder(export_dir / f"{stem}.onnx", POINT_ENCODER_INPUTS,
                                                              optimized))
        setattr(detector, names[2], _PassThrough())
        if len(names) == 5:
            setattr(detector, names[3], _PassThrough())
        head.forward = head_forward
        yield model
    finally:
        for name, part in originals.items():
            setattr(detector, name, part)
        head.__dict__.pop("forward", None)

