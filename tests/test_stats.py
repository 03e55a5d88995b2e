"""Paired bootstrap intervals of a per-item metric (the hard digits benchmark's accuracy)."""
import numpy as np
import torch

from lidar_ptq.stats import bootstrap_mean, paired_interval, resample_weights
from lidar_ptq.zoo.digits import distort, load_hard_digits_split


def test_bootstrap_mean_is_the_mean_on_the_items_and_on_each_resample():
    values = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    weights = resample_weights(len(values), 50, seed=3)
    samples = bootstrap_mean(values, weights)
    assert samples.point == values.mean()
    assert np.allclose(samples.replicates, [(w * values).sum() / w.sum() for w in weights])


def test_paired_accuracy_interval_resolves_a_real_gap_and_not_a_relabelled_draw():
    rng = np.random.default_rng(0)
    good = rng.random(4000) < 0.95
    worse = good & (rng.random(4000) > 0.02)  # about 2 points fewer correct, on the same images
    weights = resample_weights(4000, 400, seed=0)
    gap = paired_interval([bootstrap_mean(good, weights)], [bootstrap_mean(worse, weights)])
    assert gap.resolved and 1.0 < gap.delta < 3.0 and gap.low > 0
    other_draw = good.copy()  # another draw: ten images turn wrong, ten others turn right
    flip = np.concatenate([rng.choice(np.flatnonzero(good), 10, replace=False),
                           rng.choice(np.flatnonzero(~good), 10, replace=False)])
    other_draw[flip] = ~other_draw[flip]
    same = paired_interval([bootstrap_mean(other_draw, weights)], [bootstrap_mean(good, weights)])
    assert not same.resolved and abs(same.delta) < 0.6


def test_hard_digits_are_seeded_distortions_of_the_test_split():
    images = torch.rand(5, 1, 8, 8)
    first = distort(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, distort(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, distort(images, torch.Generator().manual_seed(2)))
    assert first.min() >= 0 and first.max() <= 1
    data = load_hard_digits_split(0, test_copies=3)
    plain = load_hard_digits_split(0, test_copies=1)
    assert len(data["x_test"]) == 3 * len(plain["x_test"]) == len(data["y_test"])
    assert torch.equal(data["y_test"][: len(plain["y_test"])], plain["y_test"])
