"""The linear-cost stages give what the per-layer / per-candidate algorithms they replace give, with a
number of forwards that does not grow with depth or candidates, and a killed run resumes to the same model."""
import copy

import pytest
import torch
from test_bias_correction import TinyBEV, bev_frames, quantized
from test_lidar_pipeline import TinyBEVDetector, sparse_bev
from torch import nn

import lidar_ptq
from lidar_ptq.batches import StopForward, run_batches
from lidar_ptq.lidar import LidarPTQConfig, run_ptq
from lidar_ptq.lidar.stage_log import StageLog
from lidar_ptq.quant.bias_correction import correct_biases, correctable_layers
from lidar_ptq.quant.equalize import equalize_inputs
from lidar_ptq.quant.quantizer import QuantMode, temporary_quant_mode


def per_layer_bias_correction(model, data):
    """The quadratic algorithm: one float pass, then one quantized pass per layer stopped at that layer."""
    layers = correctable_layers(model)
    sums, counts, order = {}, {}, []

    def measure(mode, only=None, stop=None):
        sums.clear(), counts.clear()

        def hook(module, args, out, name):
            flat = out.detach().movedim(1, -1).reshape(-1, out.shape[1]).double()
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
            if name not in order:
                order.append(name)
            if name == stop:
                raise StopForward
        handles = [m.register_forward_hook(lambda mod, a, o, _n=n: hook(mod, a, o, _n))
                   for n, m in layers.items() if only is None or n == only]
        with torch.no_grad(), temporary_quant_mode(model, mode):
            run_batches(model, data)
        for h in handles:
            h.remove()
        return {n: sums[n] / counts[n] for n in sums}
    target = measure(QuantMode.FLOAT)
    for name in list(order):
        twice = getattr(model, "shared_twice", False) and name == "body"
        error = measure(QuantMode.QUANTIZE, only=name, stop=None if twice else name)[name] - target[name]
        layer = layers[name]
        if "bias_shift" not in layer._buffers:
            layer.register_buffer("bias_shift", torch.zeros_like(layer.bias.detach()))
        layer.bias_shift.sub_(error.to(layer.bias.dtype))


@pytest.mark.parametrize("shared_twice", [False, True])
def test_lockstep_bias_correction_equals_one_pass_per_layer(shared_twice):
    expected, model = quantized(shared_twice), quantized(shared_twice)
    per_layer_bias_correction(expected, bev_frames())
    changes = correct_biases(model, bev_frames(), progress=False, fold=False)
    assert list(changes) == ["stem", "body", "head"]
    for name in changes:
        shift, reference = getattr(model, name).bias_shift, getattr(expected, name).bias_shift
        assert reference.abs().max() > 1e-4
        torch.testing.assert_close(shift, reference, rtol=1e-5, atol=1e-7)


def test_lockstep_groups_refine_the_correction_by_the_later_frames():
    one, grouped = quantized(), quantized()
    correct_biases(one, bev_frames(), progress=False, fold=False)
    correct_biases(grouped, bev_frames(), progress=False, fold=False, group_frames=2)  # 3 groups of 2 batches
    for name in ("stem", "body", "head"):
        a, b = getattr(one, name).bias_shift, getattr(grouped, name).bias_shift
        assert float((a - b).abs().max()) < 0.02 * float(a.abs().max()), name


class DeepBEV(nn.Module):
    """``depth`` conv+ReLU layers (forward counts must not grow with it)."""

    def __init__(self, depth):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[m for i in range(depth) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())])

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("depth", [2, 8])
def test_bias_correction_makes_two_passes_whatever_the_depth(depth):
    model = DeepBEV(depth).eval()
    frames = bev_frames()
    lidar_ptq.quantize(model, "w8a8")
    lidar_ptq.calibrate(model, frames, progress=False)
    log = StageLog()
    log.watch(model)
    with log.stage("bias correction"):
        changes = correct_biases(model, frames, progress=False)
    assert len(changes) == depth
    assert log.records["bias correction"].forwards == 2 * len(frames)


def per_candidate_search(model, data, recipe):
    """The algorithm the one-pass search replaces: a model copy calibrated per candidate."""
    with torch.no_grad():
        float_outputs = [model(b) for b in data]
    scores = {}
    for name, candidate in recipe.range_candidates.items():
        trial = copy.deepcopy(model)
        lidar_ptq.quantize(trial, candidate)
        equalize_inputs(trial, recipe.equalize, data, recipe.equalize_alpha)
        lidar_ptq.calibrate(trial, data, progress=False)
        with torch.no_grad():
            judged = data[:recipe.search_frames // 2]  # two frames per batch
            score = sum(float(recipe.select_loss(trial(b), f)) for b, f in zip(judged, float_outputs)) / len(judged)
            correct_biases(trial, judged, progress=False, fold=False)
            corrected = sum(float(recipe.select_loss(trial(b), f)) for b, f in zip(judged, float_outputs)) / len(judged)
        scores[name] = min(score, corrected)
    return scores


def test_one_pass_range_search_scores_every_candidate_as_a_calibrated_copy_would():
    torch.manual_seed(0)
    model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(3)]
    cfg = LidarPTQConfig(w_bits=4, a_bits=4, tgpl=False, adaptive_rounding=False, calib_frames=6,
                         equalize={"patterns": ("backbone.0",)}, ranges={"frames": 4}, bias_correction=True,
                         guards=True)
    recipe = cfg.recipe()
    expected = per_candidate_search(copy.deepcopy(model), data, recipe)
    log = StageLog()
    report = run_ptq(model, data, recipe, stages=log)
    assert list(report.selection) == list(expected)
    for name in expected:
        assert report.selection[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-7), name
    assert min(report.selection, key=report.selection.get) == min(expected, key=expected.get)
    # one calibration pass (+ the equalization pass, stopped after the equalized layer) for all candidates;
    # per candidate, on the search frames only: judge, correct, judge
    records = log.records
    assert records["calibration"].forwards == 2 * len(data)
    assert records["range search"].forwards == len(recipe.range_candidates) * 3 * 2 + 2
    assert {row["stage"] for row in report.stages} >= {"calibration", "float outputs", "range search",
                                                      "bias correction", "guard", "freezing", "total"}


def test_a_candidate_that_changes_more_than_the_observers_is_an_error():
    model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(2)]
    recipe = LidarPTQConfig(tgpl=False, adaptive_rounding=False, calib_frames=4).recipe()
    recipe.range_candidates = {"w4": {**recipe.quant, "weight": {**recipe.quant["weight"], "bits": 4}}}
    with pytest.raises(ValueError, match="differ only in their observers"):
        run_ptq(model, data, recipe)


def test_equalization_statistics_stop_after_the_equalized_layers():
    model = TinyBEVDetector().eval()
    lidar_ptq.quantize(model, LidarPTQConfig().quant_config())
    head_calls = []
    model.head.register_forward_hook(lambda *_: head_calls.append(1))
    scales = equalize_inputs(model, ("backbone.0",), [sparse_bev(s) for s in range(3)])
    assert list(scales) == ["backbone.0"] and len(scales["backbone.0"]) == 4
    assert head_calls == []  # nothing after the equalized layer ran


def test_reconstruction_fits_on_its_first_recon_frames(monkeypatch):
    from lidar_ptq.lidar import pipeline
    seen = []
    real = pipeline.reconstruct

    def watched(model, data, cfg, float_outputs=None):
        seen.append((len(data), len(float_outputs)))
        return real(model, data, cfg, float_outputs=float_outputs)

    monkeypatch.setattr(pipeline, "reconstruct", watched)
    data = [sparse_bev(s) for s in range(3)]  # two frames a batch
    cfg = LidarPTQConfig(range_search=False, bias_correction=False, tgpl=True, calib_frames=6,
                         recon={"frames": 3, "iterations": 2, "progress": False})
    report = run_ptq(TinyBEVDetector().eval(), data, cfg.recipe())
    assert seen == [(2, 2)]  # the first batches holding 3 frames
    assert report.frames == 6 and report.reconstruction is not None


class Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["bias correction", "reconstruction"])
def test_a_killed_run_resumes_to_the_same_model(tmp_path, monkeypatch, stage):
    from lidar_ptq.lidar import pipeline
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    data = [sparse_bev(s) for s in range(3)]
    cfg = LidarPTQConfig(w_bits=4, a_bits=4, calib_frames=6, bias_correction=True,
                         ranges={"rules": ("maxmin", "lp2", "pct99.9"), "frames": 4},
                         recon={"iterations": 20, "progress": False})
    expected = copy.deepcopy(float_model)
    reference = run_ptq(expected, data, cfg.recipe(), freeze_weights=False)

    target = "correct_biases" if stage == "bias correction" else "reconstruct"
    real = getattr(pipeline, target)
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        raise Killed
    monkeypatch.setattr(pipeline, target, dies)
    with pytest.raises(Killed):
        run_ptq(copy.deepcopy(float_model), data, cfg.recipe(), freeze_weights=False, resume_dir=str(tmp_path))
    monkeypatch.setattr(pipeline, target, real)
    searched = []
    monkeypatch.setattr(pipeline, "judge_candidates", lambda *a, **k: searched.append(1))
    resumed_model = copy.deepcopy(float_model)
    resumed = run_ptq(resumed_model, data, cfg.recipe(), freeze_weights=False, resume_dir=str(tmp_path))
    assert calls and not searched  # the range search was not run again
    assert resumed.selection == reference.selection
    assert resumed.bias_correction_loss == pytest.approx(reference.bias_correction_loss)
    assert resumed.recon_loss == pytest.approx(reference.recon_loss)
    state, want = resumed_model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resuming_with_other_frames_is_an_error(tmp_path):
    cfg = LidarPTQConfig(w_bits=4, a_bits=4, calib_frames=4, range_search=False, tgpl=False, adaptive_rounding=False)
    run_ptq(TinyBEVDetector().eval(), [sparse_bev(s) for s in range(2)], cfg.recipe(), resume_dir=str(tmp_path))
    with pytest.raises(ValueError, match="another recipe or other calibration frames"):
        run_ptq(TinyBEVDetector().eval(), [sparse_bev(s + 5) for s in range(2)], cfg.recipe(),
                resume_dir=str(tmp_path))


def test_stage_log_attributes_nested_stages_exclusively():
    log = StageLog()
    model = TinyBEV().eval()
    log.watch(model)
    with torch.no_grad(), log.stage("outer"):
        model(bev_frames(1)[0])
        with log.stage("inner"):
            model(bev_frames(1)[0])
            model(bev_frames(1)[0])
    log.close()
    rows = {row["stage"]: row for row in log.rows()}
    assert rows["outer"]["forwards"] == 1 and rows["inner"]["forwards"] == 2 and rows["total"]["forwards"] == 3
    # each of the three is rounded to the millisecond
    assert rows["total"]["seconds"] == pytest.approx(rows["outer"]["seconds"] + rows["inner"]["seconds"], abs=2e-3)
    assert rows["total"]["peak_rss_mb"] > 10


def per_unit_reconstruction(model, data, cfg):
    """The quadratic algorithm: for each unit, one forward per batch (stopped at the unit) in float mode
    for its targets and one in quantized mode for its inputs, then the same optimisation."""
    from dataclasses import replace

    from lidar_ptq.quant.model import set_quant_mode
    from lidar_ptq.recon import engine
    from lidar_ptq.recon.cache import capture
    from lidar_ptq.recon.units import find_units

    float_outputs = {}
    for index, unit in enumerate(find_units(model, cfg.granularity)):
        torch.manual_seed(cfg.seed + index)
        set_quant_mode(model, QuantMode.FLOAT)
        target = capture(model, unit.module, data)
        set_quant_mode(model, QuantMode.QUANTIZE)
        inputs_q = capture(model, unit.module, data, want_output=False)
        engine._optimise_unit(model, unit, data, replace(cfg, seed=cfg.seed + index), target, inputs_q, None,
                              torch.device("cpu"), float_outputs)
    set_quant_mode(model, QuantMode.QUANTIZE)


@pytest.mark.parametrize("method", ["adaround", "qdrop"])
def test_lockstep_reconstruction_equals_one_capture_per_unit(method):
    from test_recon import tiny_data, w4a8_tiny

    from lidar_ptq.recon.engine import ReconConfig, reconstruct

    cfg = ReconConfig.from_method(method, iterations=30, progress=False, tie_shared_inputs=False,
                                  output_loss=lambda q, f, b: (q - f).pow(2).mean(), output_loss_every=5)
    expected, model = w4a8_tiny(), w4a8_tiny()
    per_unit_reconstruction(expected, tiny_data(), cfg)
    log = StageLog()
    log.watch(model)
    with log.stage("reconstruction"):
        report = reconstruct(model, tiny_data(), cfg)
    assert [u.name for u in report.units] == ["0", "2", "5"]
    state, want = model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    # the captures: one float and one quantized forward per batch for all units together; the rest are
    # the output loss's steps (6 per unit) and its float references (one per batch used); block units are
    # first checked by one forward (refine_units)
    assert log.records["reconstruction"].forwards == 2 * 4 + 3 * 6 + 4 + (method == "qdrop")
