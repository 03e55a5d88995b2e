"""LiDAR-PTQ pipeline: stage switches map to the right quantizers/reconstruction, and the full
pipeline lowers the task loss of a small BEV detector on sparse inputs."""
import copy

import pytest
import torch
from test_tgpl import TinyCenterHead
from torch import nn

import lidar_ptq
from lidar_ptq.lidar import LidarPTQConfig, run_ptq
from lidar_ptq.lidar.tgpl import TaskGuidedPositiveLoss


class TinyBEVDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.head = TinyCenterHead()

    def forward(self, bev):
        return self.head(self.backbone(bev))


def sparse_bev(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    bev = torch.zeros(n, 4, 12, 12)
    mask = torch.rand(n, 1, 12, 12, generator=g) < 0.05
    return bev + mask * torch.rand(n, 4, 12, 12, generator=g).exp()


def test_stage_switches():
    cfg = LidarPTQConfig(sparse_calibration=False, bias_correction=False, range_search=False, tgpl=False,
                         adaptive_rounding=False)
    q = cfg.quant_config()
    assert q["input"]["observer"] == "minmax" and q["input"]["observer_kwargs"] == {"sparse": False}
    assert cfg.recon_config() is None
    assert cfg.recipe().range_candidates == {} and cfg.recipe().select_loss is None
    # bias correction alone still needs the task loss: it is undone when it raises it
    cfg = LidarPTQConfig(range_search=False, tgpl=False, adaptive_rounding=False, bias_correction=True)
    assert cfg.recipe().bias_correction and isinstance(cfg.recipe().select_loss, TaskGuidedPositiveLoss)
    cfg = LidarPTQConfig(tgpl=True, adaptive_rounding=False)
    assert cfg.quant_config()["input"]["observer"] == "minmax"
    assert cfg.quant_config("lp4")["input"]["observer"] == "lp_search"
    assert cfg.quant_config("lp4")["input"]["observer_kwargs"] == {"sparse": True, "p": 4.0}
    assert cfg.quant_config("pct99.9")["input"]["observer_kwargs"] == {"sparse": True, "percentile": 99.9}
    assert cfg.quant_config("lp2@all")["input"]["observer_kwargs"] == {"sparse": False, "p": 2.0}
    assert cfg.quant_config("maxmin@active")["input"]["observer_kwargs"] == {"sparse": True}
    with pytest.raises(ValueError, match="unknown clipping rule"):
        cfg.quant_config("magic")
    with pytest.raises(ValueError, match="unknown sites 'half'"):
        cfg.quant_config("lp2@half")
    recipe = cfg.recipe()
    assert list(recipe.range_candidates) == ["maxmin", "lp2", "lp3", "lp4", "pct99.9", "pct99.99",
                                             "maxmin@all", "lp2@all", "lp3@all", "pct99.99@all"]
    assert isinstance(recipe.select_loss, TaskGuidedPositiveLoss)
    recon = cfg.recon_config()
    assert recon.rounding == "nearest" and recon.learn_act_scale and recon.output_loss is not None
    # adaptive rounding: on by default at every bit-width, as in the paper
    for w_bits in (8, 4):
        recon = LidarPTQConfig(w_bits=w_bits, tgpl=False).recon_config()
        assert recon.rounding == "adaround" and recon.output_loss is None
    assert LidarPTQConfig(tgpl=False, adaptive_rounding=False).recon_config() is None
    # identical candidates are judged once: without sparse calibration "lp2@all" is "lp2"
    dense = LidarPTQConfig(sparse_calibration=False).recipe().range_candidates
    assert list(dense) == ["maxmin", "lp2", "lp3", "lp4", "pct99.9", "pct99.99"]
    assert LidarPTQConfig(tgpl=False, adaptive_rounding=True).recon_config().rounding == "adaround"
    assert LidarPTQConfig(w_bits=4, tgpl=False, adaptive_rounding=False).recon_config() is None


def test_task_guided_range_search_keeps_the_candidate_with_the_lowest_output_error():
    torch.manual_seed(0)
    model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(3)]
    cfg = LidarPTQConfig(w_bits=4, a_bits=4, tgpl=False, adaptive_rounding=False, calib_frames=3 * data[0].shape[0])
    report = run_ptq(model, data, cfg)
    assert list(report.selection) == list(LidarPTQConfig().ranges.rules)
    chosen = min(report.selection, key=report.selection.get)
    observers = {row["observer"] for row in lidar_ptq.quant_summary(model)}
    expected = {"maxmin": {"minmax"}, "lp": {"lp_search"}, "pct": {"minmax", "percentile"}}
    assert observers == expected[chosen.split("@")[0].rstrip("0123456789.")]
    assert len(set(report.selection.values())) > 1  # the candidates really differ


def test_range_search_judges_each_candidate_after_bias_correction_too():
    """With bias correction on, a candidate scores the better of its loss without and with a correction,
    so no score rises and the correction lowers some (it is what reorders the rules on the pillar model)."""
    torch.manual_seed(0)
    model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(3)]
    stages = dict(w_bits=4, a_bits=4, tgpl=False, adaptive_rounding=False, calib_frames=6)
    plain = run_ptq(copy.deepcopy(model), data, LidarPTQConfig(**stages, bias_correction=False)).selection
    corrected = run_ptq(copy.deepcopy(model), data, LidarPTQConfig(**stages, bias_correction=True)).selection
    assert list(plain) == list(corrected)
    assert all(corrected[k] <= plain[k] for k in plain), (plain, corrected)
    assert sum(corrected[k] < 0.99 * plain[k] for k in plain) >= 2, (plain, corrected)


def test_full_pipeline_lowers_tgpl_loss_versus_max_min():
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    data, test = [sparse_bev(s) for s in range(4)], [sparse_bev(10 + s) for s in range(2)]
    loss_fn = TaskGuidedPositiveLoss()

    def task_loss(model):
        with torch.no_grad():
            return sum(loss_fn(model(x), float_model(x)).item() for x in test)

    results = {}
    for name, cfg in {
        "max_min": LidarPTQConfig(w_bits=4, a_bits=4, sparse_calibration=False, equalize_inputs=False,
                                  bias_correction=False, range_search=False, tgpl=False, adaptive_rounding=False,
                                  calib_frames=8),
        "lidar_ptq": LidarPTQConfig(w_bits=4, a_bits=4, recon={"iterations": 150, "progress": False},
                                    calib_frames=8),
    }.items():
        model = copy.deepcopy(float_model)
        report = run_ptq(model, data, cfg)
        assert report.uncalibrated == []
        results[name] = task_loss(model)
    assert results["lidar_ptq"] < results["max_min"], results


def test_calibration_frames_are_counted_and_too_few_is_a_clear_error():
    from lidar_ptq.lidar.pipeline import frames_in, take_frames

    data = [sparse_bev(s) for s in range(4)]  # 2 frames each
    assert frames_in(data[0]) == 2 and frames_in((data[0], 1)) == 2 and frames_in({"bev": data[0]}) == 2
    assert len(take_frames(iter(data), 3)) == 2  # stops once enough frames are in
    with pytest.raises(ValueError, match="holds 8 frames but calib_frames=256"):
        run_ptq(TinyBEVDetector(), data, LidarPTQConfig())


@pytest.mark.parametrize("sabotage", [False, True])
def test_reconstruction_is_undone_when_it_raises_the_task_loss(monkeypatch, sabotage):
    """Like bias correction, reconstruction is kept only if it lowers TGPL on the calibration frames; when
    undone, the model is exactly the calibrated one (no learned rounding left attached)."""
    from lidar_ptq.lidar import pipeline
    from lidar_ptq.quant.quantizer import FakeQuantizer
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(4)]
    stages = dict(w_bits=4, a_bits=4, equalize_inputs=False, bias_correction=False, range_search=False,
                  calib_frames=8)
    calibrated = copy.deepcopy(float_model)
    run_ptq(calibrated, data, LidarPTQConfig(**stages, tgpl=False, adaptive_rounding=False))
    real = pipeline.reconstruct

    def reconstruct(model, batches, cfg, **kwargs):
        report = real(model, batches, cfg, **kwargs)
        if sabotage:  # activation steps 8x too coarse: the task loss must rise
            for q in model.modules():
                if isinstance(q, FakeQuantizer) and q.channel_axis is None and q.scale.numel():
                    q.scale.mul_(8)
        return report
    monkeypatch.setattr(pipeline, "reconstruct", reconstruct)
    model = copy.deepcopy(float_model)
    report = run_ptq(model, data, LidarPTQConfig(**stages, tgpl=True, guards=True,
                                                 recon={"iterations": 60, "progress": False}))
    assert report.reconstruction is not None and set(report.recon_loss) == {"before", "after"}
    assert report.recon_kept == (report.recon_loss["after"] <= report.recon_loss["before"]) == (not sabotage)
    state, reference = model.state_dict(), calibrated.state_dict()
    if sabotage:
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
    else:
        assert any(not torch.equal(state[k], reference[k]) for k in reference)
    if sabotage:  # without guards (the default) the sabotaged reconstruction stays
        unguarded = copy.deepcopy(float_model)
        report = run_ptq(unguarded, data, LidarPTQConfig(**stages, tgpl=True,
                                                               recon={"iterations": 60, "progress": False}))
        assert report.recon_kept and report.recon_loss == {}
        assert any(not torch.equal(unguarded.state_dict()[k], reference[k]) for k in reference)


def test_reconstruction_sees_the_untouched_float_model():
    """Reconstruction matches FLOAT-mode outputs; a bias correction made before it would shift that reference."""
    from lidar_ptq.lidar import pipeline
    from lidar_ptq.quant.quantizer import QuantMode, temporary_quant_mode
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(4)]
    seen = []

    def reconstruct(model, batches, cfg, **kwargs):
        with torch.no_grad(), temporary_quant_mode(model, QuantMode.FLOAT):
            seen.append(model(data[0]))
    model = copy.deepcopy(float_model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "reconstruct", reconstruct)
        report = run_ptq(model, data, LidarPTQConfig(w_bits=4, a_bits=4, range_search=False, bias_correction=True,
                                                     recon={"iterations": 5, "progress": False}, calib_frames=8))
    assert report.bias_corrections  # bias correction ran (before reconstruction)
    with torch.no_grad():
        reference = float_model(data[0])
    assert all(torch.equal(a, b) for a, b in zip(reference[0].values(), seen[0][0].values()))


