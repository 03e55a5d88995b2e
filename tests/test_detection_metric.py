"""nuScenes-style centre-distance mAP (nuscenes-devkit's matching and AP)."""
import numpy as np
import pytest
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("nuscenes")
import_or_skip("mmdet3d")
from lidar_ptq.mmdet3d.metrics import center_distance_map  # noqa: E402

CLASSES = ["car", "pedestrian", "bicycle"]


def record(centres, labels, scores=None):
    centres = np.asarray(centres, dtype=float)
    n = len(centres)
    return {"centres": centres, "sizes": np.tile([4.0, 1.8, 1.6], (n, 1)), "yaws": np.zeros(n),
            "labels": np.asarray(labels), "scores": np.ones(n) if scores is None else np.asarray(scores)}


def frames(shift: float, drop_class: int | None = None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        centres = rng.uniform(-30, 30, (9, 3))
        labels = np.arange(9) % 3
        pred = centres + np.array([shift, 0.0, 0.0])
        keep = labels != drop_class if drop_class is not None else np.ones(9, bool)
        out.append({"token": str(i), "gt": record(centres, labels),
                    "pred": record(pred[keep], labels[keep], rng.uniform(0.2, 1.0, keep.sum()))})
    return out


def test_perfect_predictions_score_one():
    result = center_distance_map(frames(0.0), CLASSES)
    assert result["mAP"] == pytest.approx(1.0)


def test_distance_thresholds_decide_matches():
    result = center_distance_map(frames(1.5), CLASSES)  # matches at 2 and 4 m only
    assert result["AP_car@0.5m"] == 0.0 and result["AP_car@1m"] == 0.0
    assert result["AP_car@2m"] == pytest.approx(1.0) and result["AP_car@4m"] == pytest.approx(1.0)
    assert result["mAP"] == pytest.approx(0.5)


def test_a_missed_class_scores_zero():
    result = center_distance_map(frames(0.0, drop_class=2), CLASSES)
    assert result["AP_bicycle"] == 0.0
    assert result["mAP"] == pytest.approx(2 / 3)


def test_classes_outside_the_devkits_names_score_like_their_nuscenes_twins():
    """KITTI's 'Car'/'Pedestrian'/'Cyclist' get stand-in devkit names: the same AP as the same boxes
    scored under nuScenes names."""
    frames = [{"token": "f0",
               "gt": {"centres": np.array([[1.0, 2.0, 0.0], [5.0, 5.0, 0.0]]), "sizes": np.ones((2, 3)),
                      "yaws": np.zeros(2), "labels": np.array([0, 2]), "scores": np.ones(2)},
               "pred": {"centres": np.array([[1.2, 2.0, 0.0], [9.0, 9.0, 0.0], [5.1, 5.0, 0.0]]),
                        "sizes": np.ones((3, 3)), "yaws": np.zeros(3), "labels": np.array([0, 0, 2]),
                        "scores": np.array([0.9, 0.8, 0.7])}}]
    kitti = center_distance_map(frames, ["Car", "Pedestrian", "Cyclist"])
    nus = center_distance_map(frames, ["car", "pedestrian", "bicycle"])
    assert kitti["mAP"] == nus["mAP"] > 0
    assert kitti["AP_Car"] == nus["AP_car"] and kitti["AP_Cyclist"] == nus["AP_bicycle"]
