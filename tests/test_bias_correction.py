"""Empirical bias correction: removes the systematic output shift that INT8 rounding of BEV maps causes."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lidar_ptq
from lidar_ptq.quant.bias_correction import correct_biases


class TinyBEV(nn.Module):
    """conv+ReLU stack whose first layer leaves a small constant on every empty site (as BN+ReLU does)."""

    def __init__(self, shared_twice: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(4, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 3, 1)
        self.shared_twice = shared_twice
        with torch.no_grad():
            self.stem.bias.uniform_(0.01, 0.08)  # background value, below half an 8-bit step of the objects

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x))
        if self.shared_twice:  # one module called twice per forward
            x = torch.relu(self.body(x))
        return self.head(x)


def bev_frames(n=6, seed=0):
    """Sparse 32x32 maps: a few 'objects' with large features on an empty (zero) background."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(n):
        x = torch.zeros(2, 4, 32, 32)
        sites = torch.randint(0, 32, (2, 12, 2), generator=g)
        for b in range(2):
            for i, j in sites[b]:
                x[b, :, i, j] = torch.rand(4, generator=g) * 30
        frames.append(x)
    return frames


def quantized(shared_twice=False):
    model = TinyBEV(shared_twice).eval()
    lidar_ptq.quantize(model, "w8a8")
    lidar_ptq.calibrate(model, bev_frames(), progress=False)
    return model


def mean_shift(model, reference, frames):
    """Largest per-channel mean error of the output against the float model over ``frames``."""
    with torch.no_grad():
        error = torch.stack([(model(x) - reference(x)).mean(dim=(0, 2, 3)) for x in frames])
    return float(error.mean(0).abs().max())


def test_bias_correction_removes_the_mean_output_shift_on_held_out_frames():
    reference = TinyBEV().eval()
    held_out = bev_frames(4, seed=7)
    plain = quantized()
    corrected = quantized()
    changes = correct_biases(corrected, bev_frames(), progress=False)
    assert list(changes) == ["stem", "body", "head"]  # execution order
    assert all(v > 0 for v in changes.values())
    before, after = mean_shift(plain, reference, held_out), mean_shift(corrected, reference, held_out)
    assert before > 1e-3, before  # the toy really has the systematic shift
    assert after < 0.3 * before, (after, before)
    with torch.no_grad():  # and the output as a whole moves closer to the float model
        mse = [sum(float((m(x) - reference(x)).pow(2).mean()) for x in held_out) for m in (plain, corrected)]
    assert mse[1] < mse[0], mse


def test_bias_correction_measures_a_module_called_twice_over_both_calls():
    reference = TinyBEV(shared_twice=True).eval()
    model = quantized(shared_twice=True)
    before = mean_shift(model, reference, bev_frames(4, seed=3))
    correct_biases(model, bev_frames(), progress=False)
    after = mean_shift(model, reference, bev_frames(4, seed=3))
    assert after < before, (after, before)


def test_bias_correction_rejects_no_data_and_skips_unmatched_layers():
    model = quantized()
    with pytest.raises(ValueError, match="calibration data"):
        correct_biases(model, [], progress=False)
    bias = model.head.bias.clone()
    assert correct_biases(model, bev_frames(), patterns=["nothing*"], progress=False) == {}
    assert torch.equal(model.head.bias, bias)


def test_recipes_switch_bias_correction():
    from lidar_ptq.lidar.recipes import recipe_from_dict

    assert not recipe_from_dict({"method": "lidar_ptq"}).bias_correction  # off by default (docs/method.md)
    assert recipe_from_dict({"method": "lidar_ptq", "bias_correction": True}).bias_correction
    assert recipe_from_dict({"method": "percentile", "bias_correction": True}).bias_correction
    assert not recipe_from_dict({"method": "maxmin"}).bias_correction


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs/quant/ptq").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_file_loads(path):
    from lidar_ptq.lidar.recipes import load_recipe

    recipe = load_recipe(path)
    spec = json.loads(path.read_text())
    assert (recipe.quant["weight"]["bits"], recipe.quant["input"]["bits"]) == (spec.get("w_bits", 8),
                                                                              spec.get("a_bits", 8))
    assert recipe.bias_correction == spec.get("bias_correction", False)
    equalized = spec.get("equalize_inputs", spec["method"] == "lidar_ptq")
    assert recipe.equalize == (("*voxel_encoder*",) if equalized else ())
    assert recipe.guards == spec.get("guards", False)
    assert (recipe.recon is not None and recipe.recon.output_loss is not None) == spec.get("tgpl", False)


class _ScriptedLoss:
    """A select loss that returns the scripted values in turn (one per batch call)."""

    def __init__(self, values_per_pass, batches):
        self.values = [v for v in values_per_pass for _ in range(batches)]

    def __call__(self, quant_output, float_output, batch=None):
        return torch.tensor(self.values.pop(0))


@pytest.mark.parametrize("before, after, kept", [(1.0, 0.5, True), (0.5, 1.0, False)])
def test_run_ptq_keeps_bias_correction_only_when_the_task_loss_drops(before, after, kept):
    from lidar_ptq.lidar.pipeline import PTQRecipe, run_ptq

    model = TinyBEV().eval()
    original = {n: m.bias.detach().clone() for n, m in model.named_children() if isinstance(m, nn.Conv2d)}
    frames = bev_frames()
    recipe = PTQRecipe("w8a8_bc", {"input": {"bits": 8}}, calib_frames=12, bias_correction=True, guards=True,
                       select_loss=_ScriptedLoss([before, after], len(frames)))
    report = run_ptq(model, frames, recipe)
    assert report.bias_correction_loss == {"before": before, "after": after}
    assert bool(report.bias_corrections) is kept
    changed = [not torch.equal(model.get_submodule(n).bias, b) for n, b in original.items()]
    assert all(changed) if kept else not any(changed)


def test_unfolded_corrections_leave_the_float_model_untouched_until_folded():
    """Reconstruction after bias correction needs FLOAT mode to still be the float model."""
    from lidar_ptq.quant.bias_correction import fold_bias_shifts
    from lidar_ptq.quant.quantizer import QuantMode, temporary_quant_mode

    reference, model, frames = TinyBEV().eval(), quantized(), bev_frames(seed=1)
    with torch.no_grad():
        before = model(frames[0])
    changes = correct_biases(model, bev_frames(), progress=False, fold=False)
    layers = ("stem", "body", "head")
    assert changes and all(torch.equal(getattr(model, n).bias, getattr(reference, n).bias) for n in layers)
    with torch.no_grad(), temporary_quant_mode(model, QuantMode.FLOAT):
        assert torch.equal(model(frames[0]), reference(frames[0]))
    with torch.no_grad():
        corrected = model(frames[0])
    assert not torch.equal(corrected, before)
    assert mean_shift(model, reference, frames) < 0.5 * mean_shift(quantized(), reference, frames)
    assert fold_bias_shifts(model) == len(changes)
    assert not any("bias_shift" in key for key in model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(frames[0]), corrected, atol=1e-6)  # folded: the same quantized model
