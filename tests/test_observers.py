"""Observers on hand-made data: ranges they propose, sparse sites, grid search, histograms."""
import numpy as np
import pytest
import torch

from lidar_ptq import FakeQuantizer, QuantSpec
from lidar_ptq.quant.observers import build_observer


def observer(name, spec=None, axis=None, feature_axis=1, **kwargs):
    spec = (spec or QuantSpec()).updated({"observer": name, "observer_kwargs": kwargs})
    return build_observer(spec, axis, feature_axis)


def sparse_bev(seed=0, channels=4, size=32, active=20):
    """A BEV map with ``active`` non-empty cells holding positive features in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    bev = torch.zeros(1, channels, size, size)
    cells = torch.randperm(size * size, generator=g)[:active]
    bev.view(1, channels, -1)[..., cells] = 0.5 + 1.5 * torch.rand(1, channels, active, generator=g)
    return bev, cells


def test_minmax_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 4.0, -1.0]])
    obs = observer("minmax")
    obs.observe(x)
    obs.observe(x * 0.5)
    lo, hi = obs.compute_range()
    assert lo.tolist() == [-3.0] and hi.tolist() == [4.0]
    obs_c = observer("minmax", axis=1)
    obs_c.observe(x)
    lo, hi = obs_c.compute_range()
    assert lo.tolist() == [0.5, -3.0, -1.0] and hi.tolist() == [1.0, 4.0, 2.0]


def test_sparse_minmax_ignores_empty_sites():
    bev, _ = sparse_bev()
    dense = observer("minmax")
    sparse = observer("sparse_minmax")
    dense.observe(bev)
    sparse.observe(bev)
    assert dense.compute_range()[0].item() == 0.0  # the empty cells drag the minimum to 0
    lo, hi = sparse.compute_range()
    assert lo.item() >= 0.5 and hi.item() <= 2.0
    assert lo.item() == pytest.approx(bev[bev != 0].min().item())


def test_sparse_observer_with_explicit_mask_and_per_feature_channels():
    bev, cells = sparse_bev(channels=3)
    bev.view(1, 3, -1)[0, :, cells[0]] = torch.tensor([50.0, 60.0, 70.0])  # an outlier cell
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask.view(-1)[cells[1:]] = True  # the mask leaves the outlier cell out
    obs = observer("minmax", axis=1, sparse=True)
    obs.observe(bev, mask)
    lo, hi = obs.compute_range()
    assert lo.shape == (3,) and hi.max().item() <= 2.0 and lo.min().item() >= 0.5


def test_sparse_linear_features_use_last_axis():
    feats = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.0, 0.0], [3.0, 0.5]])  # [points, C]
    obs = observer("sparse_minmax", feature_axis=-1)
    obs.observe(feats)
    lo, hi = obs.compute_range()
    assert lo.item() == -2.0 and hi.item() == 3.0
    assert obs.rows(feats).numel() == 4  # the two all-zero rows are dropped


def test_lp_search_clips_outliers_and_beats_minmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[0] = 40.0
    spec = QuantSpec(bits=4)
    lp = observer("lp_search", spec=spec, p=2.0)
    mm = observer("minmax", spec=spec)
    lp.observe(x)
    mm.observe(x)

    def error(obs):
        q = FakeQuantizer(spec)
        q.set_range(*obs.compute_range())
        return ((q(x) - x) ** 2).mean().item(), q.amax().item()

    err_lp, amax_lp = error(lp)
    err_mm, amax_mm = error(mm)
    assert amax_mm == pytest.approx(40.0 * 8 / 7, rel=1e-4)
    assert 2.0 < amax_lp < 15.0
    assert err_lp < 0.25 * err_mm


def test_lp_search_sample_weighs_every_frame_by_its_size():
    """The bounded sample stands for everything observed: three equal frames, the first small-valued
    and the last two large, leave about a third of the sample from the first, whatever the order."""
    for order in ([1.0, 100.0, 100.0], [100.0, 100.0, 1.0]):
        obs = observer("lp_search", max_samples=3000)
        for value in order:
            obs.observe(torch.full((10000,), value))
        share_small = (obs.samples == 1.0).float().mean().item()
        assert obs.samples.shape == (1, 3000) and obs.seen == 30000
        assert share_small == pytest.approx(1 / 3, abs=0.01)


def test_lp_search_is_per_channel_for_weights():
    w = torch.stack([torch.linspace(-1, 1, 101), torch.linspace(-1, 1, 101) * 10])
    w[0, 0] = -8.0  # an outlier only in channel 0
    obs = observer("lp_search", spec=QuantSpec(bits=4, per_channel=True), axis=0)
    obs.observe(w)
    lo, hi = obs.compute_range()
    assert hi[0].item() < 4.0  # channel 0 clips its outlier
    assert hi[1].item() == pytest.approx(10.0, rel=0.15)  # channel 1 keeps (nearly) its range


def test_percentile_on_uniform_data():
    x = torch.arange(1, 10001, dtype=torch.float32)
    obs = observer("percentile", percentile=99.0, num_bins=10000)
    obs.observe(x[:5000])
    obs.observe(x[5000:])  # the range grows: bins are merged, counts kept
    assert obs.hist.sum() == 10000
    lo, hi = obs.compute_range()
    assert hi.item() == pytest.approx(9900.0, rel=3e-3)
    assert lo.item() == -hi.item()


def test_histogram_growth_preserves_counts_and_mass():
    obs = observer("percentile", num_bins=64)
    obs.observe(torch.full((10,), 1.0))
    obs.observe(torch.full((30,), 5.0))
    assert obs.hist.sum() == 40
    assert obs.bin_width == pytest.approx(5.0 / 64)  # range grew 1 -> 5 by merging groups of 5 bins
    cdf = np.cumsum(obs.hist) / 40
    # the 1.0 values (old last bin 63) now sit in bin 63 // 5 = 12; the 5.0 values in the last bin
    assert obs.hist[12] == 10 and obs.hist[63] == 30
    assert cdf[62] == pytest.approx(0.25)


def test_entropy_clips_a_long_tail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g)
    x[:20] = 50.0
    obs = observer("entropy", stride=4)
    obs.observe(x)
    _, hi = obs.compute_range()
    assert 2.5 < hi.item() < 25.0


def test_entropy_and_percentile_are_per_tensor_symmetric_only():
    with pytest.raises(ValueError, match="per-tensor"):
        observer("entropy", spec=QuantSpec(per_channel=True), axis=0)
    with pytest.raises(ValueError, match="symmetric"):
        observer("percentile", spec=QuantSpec(symmetric=False))


def test_unknown_observer_lists_the_registered_ones():
    with pytest.raises(KeyError, match="sparse_minmax"):
        observer("nope")
