"""Paired bootstrap intervals of mAP: matching once reproduces the devkit, resamples reweight frames."""
import os
import time

import numpy as np
import pytest
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("nuscenes")
import_or_skip("mmdet3d")
from lidar_ptq.mmdet3d.intervals import MatchTable, bootstrap_map, bootstrap_map_file, match_frames, mean_ap  # noqa: E402
from lidar_ptq.mmdet3d.metrics import center_distance_map  # noqa: E402
from lidar_ptq.stats import paired_interval, resample_weights  # noqa: E402

CLASSES = ["car", "pedestrian", "bicycle"]


def noisy_frames(frames: int, noise: float, seed: int, misses: float = 0.2) -> list[dict]:
    """Ground truth of a fixed seed; predictions jittered by ``noise`` m, some missed, some false."""
    truth, rng = np.random.default_rng(100), np.random.default_rng(seed)
    out = []
    for i in range(frames):
        n = int(truth.integers(0, 9))
        centres, labels = truth.uniform(-40, 40, (n, 3)), truth.integers(0, 3, n)
        keep = rng.uniform(size=n) > misses
        false = int(rng.integers(0, 4))
        pred = np.concatenate([centres[keep] + rng.normal(0, noise, (keep.sum(), 3)), rng.uniform(-40, 40, (false, 3))])
        pred_labels = np.concatenate([labels[keep], rng.integers(0, 3, false)])
        scores = np.round(rng.uniform(0.1, 1.0, len(pred)), 2)  # rounded: ties in score happen

        def record(c, lab, s):
            return {"centres": c, "sizes": np.tile([4.0, 1.8, 1.6], (len(c), 1)), "yaws": np.zeros(len(c)),
                    "labels": lab, "scores": s}
        out.append({"token": str(i), "gt": record(centres, labels, np.ones(n)),
                    "pred": record(pred, pred_labels, scores)})
    return out


@pytest.mark.parametrize("noise", [0.3, 1.2])
def test_matching_once_gives_the_devkit_map(noise):
    frames = noisy_frames(40, noise, seed=1)
    assert mean_ap(match_frames(frames, CLASSES)) == pytest.approx(center_distance_map(frames, CLASSES)["mAP"],
                                                                  abs=1e-12)


def test_a_resample_equals_the_devkit_on_the_repeated_frames():
    frames = noisy_frames(30, 0.8, seed=2)
    weights = resample_weights(len(frames), 1, seed=5)[0]
    repeated = [{**frames[f], "token": f"{f}-{k}"} for f in range(len(frames)) for k in range(weights[f])]
    assert mean_ap(match_frames(frames, CLASSES), weights) == pytest.approx(
        center_distance_map(repeated, CLASSES)["mAP"], abs=1e-9)


def test_paired_interval_resolves_a_real_gap_and_not_a_draw(tmp_path):
    good = match_frames(noisy_frames(200, 0.2, seed=3), CLASSES)
    worse = match_frames(noisy_frames(200, 0.2, seed=3, misses=0.45), CLASSES)
    other_draw = match_frames(noisy_frames(200, 0.2, seed=4), CLASSES)
    weights = resample_weights(200, 200, seed=0)
    good_map, worse_map, draw_map = (bootstrap_map(t, weights) for t in (good, worse, other_draw))
    gap = paired_interval([worse_map], [good_map])
    assert gap.delta == pytest.approx(100 * (mean_ap(worse) - mean_ap(good)))
    assert gap.delta < -5 and gap.high < 0 and gap.resolved
    same = paired_interval([draw_map], [good_map])
    assert same.low < 0 < same.high and not same.resolved  # two draws of one method
    # two very different calibration draws: resampling the draws widens the interval to hold both
    mixed = paired_interval([good_map, worse_map], [good_map])
    assert mixed.delta == pytest.approx(gap.delta / 2)
    assert mixed.high - mixed.low > 2 * (gap.high - gap.low) and not mixed.resolved
    good.save(tmp_path / "good.npz")
    assert mean_ap(MatchTable.load(tmp_path / "good.npz")) == mean_ap(good)
    with pytest.raises(ValueError, match="same frames"):
        bootstrap_map(match_frames(noisy_frames(50, 0.2, seed=3), CLASSES), weights)


def test_kept_bootstrap_samples_follow_their_table_and_resamples(tmp_path):
    path = tmp_path / "row.npz"
    match_frames(noisy_frames(60, 0.3, seed=1), CLASSES).save(path)
    weights = resample_weights(60, 50, seed=0)
    first = bootstrap_map_file(path, weights)
    assert (tmp_path / "row.bootstrap.npz").is_file()
    again = bootstrap_map_file(path, weights)
    assert again.point == first.point and np.array_equal(again.replicates, first.replicates)
    other = resample_weights(60, 50, seed=1)  # other resamples: computed anew, not read back
    assert not np.array_equal(bootstrap_map_file(path, other).replicates, first.replicates)
    match_frames(noisy_frames(60, 1.5, seed=2), CLASSES).save(path)  # the table rewritten: computed anew
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert bootstrap_map_file(path, other).point == pytest.approx(mean_ap(MatchTable.load(path)))
    assert bootstrap_map_file(path, other).point != pytest.approx(first.point)
