"""nuScenes-style detection mAP (centre-distance matching) for any mmdet3d LiDAR dataset.

Matching and AP come from nuscenes-devkit itself (``nuscenes.eval.detection.algo``:
greedy matching by score within a centre distance, AP over recall above 10% and
precision above 10%), averaged over the distance thresholds 0.5, 1, 2, 4 m and
the classes, as nuScenes' mAP is. The nuScenes-only parts (map, ego range per
class, attributes, NDS) are left out: a box needs only a class, a centre, a size,
a yaw and a score.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mmdet3d.registry import METRICS
from mmengine.evaluator import BaseMetric

DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def devkit_name(classes: Sequence[str], label: int) -> str:
    """The nuScenes class name the devkit matches label ``label`` under. The devkit accepts only its own
    ten names and its AP does not depend on which name a class has, so a class list that is not made of
    them (KITTI's 'Car', a dataset's own names) is scored under stand-in names, one per class."""
    from nuscenes.eval.detection.constants import DETECTION_NAMES
    if all(name in DETECTION_NAMES for name in classes):
        return classes[label]
    if len(classes) > len(DETECTION_NAMES):
        raise ValueError(f"CenterDistanceMAP scores at most {len(DETECTION_NAMES)} classes, got {len(classes)}")
    return DETECTION_NAMES[label]


def _eval_boxes(frames: list[dict[str, Any]], classes: Sequence[str], kind: str) -> Any:
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox
    from pyquaternion import Quaternion

    boxes = EvalBoxes()
    for frame in frames:
        token = frame["token"]
        data = frame[kind]
        items = []
        for centre, size, yaw, label, score in zip(data["centres"], data["sizes"], data["yaws"],
                                                   data["labels"], data["scores"]):
            items.append(DetectionBox(
                sample_token=token, translation=tuple(float(v) for v in centre),
                size=(float(size[1]), float(size[0]), float(size[2])),  # nuScenes order: width, length, height
                rotation=tuple(Quaternion(axis=[0.0, 0.0, 1.0], radians=float(yaw)).elements),
                velocity=(0.0, 0.0), detection_name=devkit_name(classes, int(label)),
                detection_score=float(score)))
        boxes.add_boxes(token, items)
    return boxes


def center_distance_map(frames: list[dict[str, Any]], classes: Sequence[str],
                        thresholds: Sequence[float] = DIST_THRESHOLDS) -> dict[str, float]:
    """mAP and per-class / per-threshold AP (0..1) of collected frames."""
    from nuscenes.eval.common.utils import center_distance
    from nuscenes.eval.detection.algo import accumulate, calc_ap

    gt, pred = _eval_boxes(frames, classes, "gt"), _eval_boxes(frames, classes, "pred")
    results: dict[str, float] = {}
    class_aps = []
    for label, name in enumerate(classes):
        aps = [calc_ap(accumulate(gt, pred, devkit_name(classes, label), center_distance, th), 0.1, 0.1)
               for th in thresholds]
        for th, ap in zip(thresholds, aps):
            results[f"AP_{name}@{th:g}m"] = ap
        results[f"AP_{name}"] = float(np.mean(aps))
        class_aps.append(results[f"AP_{name}"])
    results["mAP"] = float(np.mean(class_aps))
    return results


def box_record(boxes: Any, labels: Any, scores: Any | None, limit: float | None) -> dict[str, np.ndarray]:
    centres = boxes.gravity_center.detach().cpu().numpy()
    dims = boxes.dims.detach().cpu().numpy()
    yaws = boxes.yaw.detach().cpu().numpy()
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    scores = np.ones(len(labels)) if scores is None else scores.detach().cpu().numpy()
    keep = np.ones(len(labels), dtype=bool) if limit is None else np.all(np.abs(centres[:, :2]) <= limit, axis=1)
    keep &= labels >= 0
    return {"centres": centres[keep], "sizes": dims[keep], "yaws": yaws[keep], "labels": labels[keep],
            "scores": scores[keep]}


@METRICS.register_module()
class CenterDistanceMAP(BaseMetric):
    """nuScenes-style mAP (centre distance 0.5/1/2/4 m) from ``pred_instances_3d`` and ``eval_ann_info``.

    ``eval_range``: only boxes whose centre has |x|, |y| <= this count (both ground
    truth and predictions), like nuScenes' per-class detection ranges.
    """

    default_prefix = "det"

    def __init__(self, classes: Sequence[str] | None = None, eval_range: float | None = None,
                 thresholds: Sequence[float] = DIST_THRESHOLDS, collect_device: str = "cpu",
                 prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = list(classes) if classes is not None else None
        self.eval_range = eval_range
        self.thresholds = tuple(thresholds)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            pred = sample["pred_instances_3d"]
            ann = sample.get("eval_ann_info")
            if ann is None:
                raise ValueError("CenterDistanceMAP needs ground truth: build the test dataset with "
                                 "test_mode=True and load_eval_anns=True")
            token = str(sample.get("sample_idx", len(self.results)))
            self.results.append({
                "token": token,
                "gt": box_record(ann["gt_bboxes_3d"], ann["gt_labels_3d"], None, self.eval_range),
                "pred": box_record(pred["bboxes_3d"], pred["labels_3d"], pred["scores_3d"], self.eval_range),
            })

    def compute_metrics(self, results: list[dict[str, Any]]) -> dict[str, float]:
        classes = self.classes or list(self.dataset_meta["classes"])
        return center_distance_map(results, classes, self.thresholds)
