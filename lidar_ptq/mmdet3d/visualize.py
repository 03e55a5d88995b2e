"""Bird's-eye-view plot of one frame: points, ground truth, FP32 and INT8 detections."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _corners(boxes: Any) -> np.ndarray:
    """[N, 4, 2] BEV corners of mmdet3d boxes (or an empty array)."""
    if boxes is None or len(boxes) == 0:
        return np.zeros((0, 4, 2))
    return boxes.corners[:, [0, 3, 7, 4], :2].cpu().numpy()  # bottom face, in order around the box


def plot_bev(points: np.ndarray, gt_boxes: Any, detections: dict[str, Any], path: str | Path,
             extent: float | None = None, score_threshold: float = 0.3, title: str = "") -> Path:
    """Save a BEV PNG; ``detections`` maps a label (e.g. 'FP32', 'INT8') to mmdet3d ``pred_instances_3d``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 8))
    ax.scatter(points[:, 0], points[:, 1], s=0.2, c="0.6", linewidths=0)
    styles = [("tab:blue", "-"), ("tab:red", "--"), ("tab:purple", ":")]
    for corners in _corners(gt_boxes):
        ax.fill(corners[:, 0], corners[:, 1], color="tab:green", alpha=0.35, lw=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.35, label="ground truth")]
    for (label, pred), (color, style) in zip(detections.items(), styles):
        keep = pred.scores_3d.cpu().numpy() >= score_threshold
        for corners in _corners(pred.bboxes_3d[keep] if keep.any() else None):
            closed = np.vstack([corners, corners[:1]])
            ax.plot(closed[:, 0], closed[:, 1], color=color, ls=style, lw=1.0)
        handles.append(plt.Line2D([], [], color=color, ls=style, label=f"{label} (score >= {score_threshold})"))
    if extent:
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(title)
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
