"""Deployment precision plan: per-layer task sensitivity, the fewest FP16 layers under a task-loss budget,
a clear error for a budget that cannot be met, resume, and an export without Q/DQ around FP16 layers."""
import copy

import numpy as np
import pytest
import torch
from conftest import import_or_skip
from test_lidar_pipeline import TinyBEVDetector, sparse_bev

from lidar_ptq.errors import RecipeError
from lidar_ptq.lidar import LidarPTQConfig, run_ptq
from lidar_ptq.lidar.precision_plan import (
    PrecisionBudgetError,
    own_quantizers,
    plan_precision,
    planned_layers,
    rank_layers,
)
from lidar_ptq.lidar.range_search import task_loss
from lidar_ptq.lidar.recipes import recipe_from_dict
from lidar_ptq.lidar.tgpl import TaskGuidedPositiveLoss

W4A4_MAXMIN = dict(w_bits=4, a_bits=4, sparse_calibration=False, equalize_inputs=False, range_search=False,
                   tgpl=False, adaptive_rounding=False, calib_frames=16, ranges={"frames": 8})


def frames():
    return [sparse_bev(s) for s in range(8)]  # 16 frames: 8 measure the layers, 8 are held out


def float_outputs(model, data):
    with torch.no_grad():
        return [model(x) for x in data]


def quantized(budget=None):
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    model, data = copy.deepcopy(float_model), frames()
    report = run_ptq(model, data, LidarPTQConfig(**W4A4_MAXMIN, fp16_budget=budget))
    return float_model, model, data, report


def held_out_loss(float_model, model, data):
    held = data[4:]
    return task_loss(model, held, float_outputs(float_model, held), TaskGuidedPositiveLoss())


def test_plan_meets_the_budget_with_the_fewest_layers_of_its_ranking():
    float_model, int8_model, data, _ = quantized()
    all_int8 = held_out_loss(float_model, int8_model, data)
    counts = {}
    for budget in (0.9, 0.3, 0.05):
        _, model, _, report = quantized(budget)
        plan = report.precision_plan
        assert set(plan.layers) == set(planned_layers(int8_model)) and len(plan.layers) == 8
        assert all(s["alone"] > 0 for s in plan.sensitivity.values())  # every layer adds error at W4A4
        assert plan.loss_int8 == pytest.approx(all_int8, rel=1e-5)
        # the plan as applied (quantizers disabled) meets the budget on the held-out frames
        assert held_out_loss(float_model, model, data) == pytest.approx(plan.loss, rel=1e-5)
        assert plan.loss <= budget * plan.loss_int8
        counts[budget] = len(plan.fp16_layers)
        # one layer fewer (the last of the ranking's prefix back in INT8) misses the budget
        if plan.fp16_layers:
            ranking = rank_layers(plan.sensitivity)
            assert set(plan.fp16_layers) == set(ranking[:len(plan.fp16_layers)])
            modules = dict(int8_model.named_modules())
            fewer = own_quantizers(*(modules[n] for n in ranking[:len(plan.fp16_layers) - 1]))
            held = data[4:]
            assert task_loss(int8_model, held, float_outputs(float_model, held), TaskGuidedPositiveLoss(),
                             float_modules=fewer) > budget * plan.loss_int8
        for name, module in model.named_modules():
            if name in plan.layers:
                assert module.weight_quantizer.enabled == (plan.layers[name] == "int8")
    assert counts[0.9] <= counts[0.3] <= counts[0.05] and counts[0.05] > counts[0.9], counts
    assert report.recipe.quant["overrides"]  # the plan travels with the recipe (quantized.pth rebuilds it)


def test_a_budget_met_by_int8_keeps_every_layer_int8():
    _, _, _, report = quantized(1.0)
    assert report.precision_plan.fp16_layers == []
    assert report.recipe.quant["overrides"] == {}


def test_invalid_and_unmeetable_budgets_are_clear_errors():
    for bad in (0, -0.1, "x", True):
        with pytest.raises(RecipeError, match="fp16_budget"):
            recipe_from_dict({"method": "lidar_ptq", "fp16_budget": bad})
    float_model, model, data, _ = quantized()
    measure, held = data[:4], data[4:]
    with pytest.raises(PrecisionBudgetError, match="fraction > 0"):
        plan_precision(model, measure, float_outputs(float_model, measure), held, float_outputs(float_model, held),
                       TaskGuidedPositiveLoss(), 0.0)

    def offset_loss(q, f, batch=None):  # a loss the float model itself does not bring to zero
        return TaskGuidedPositiveLoss()(q, f) + 1.0
    with pytest.raises(PrecisionBudgetError, match=r"cannot be met: with all 8 layers in FP16 the held-out task "
                                                   r"loss is 1, above .*raise the budget"):
        plan_precision(model, measure, float_outputs(float_model, measure), held, float_outputs(float_model, held),
                       offset_loss, 0.5)


def test_baselines_take_a_budget_and_a_rerun_resumes_the_plan(tmp_path):
    recipe = recipe_from_dict({"method": "maxmin", "w_bits": 4, "a_bits": 4, "calib_frames": 16,
                               "fp16_budget": 0.3})
    assert recipe.guards is False and recipe.select_loss is not None
    torch.manual_seed(0)
    float_model = TinyBEVDetector().eval()
    first, again = copy.deepcopy(float_model), copy.deepcopy(float_model)
    plan = run_ptq(first, frames(), recipe, resume_dir=str(tmp_path)).precision_plan
    assert (tmp_path / "precision_plan.pth").is_file()
    resumed = run_ptq(again, frames(), recipe, resume_dir=str(tmp_path))
    assert "precision plan" not in {row["stage"] for row in resumed.stages}  # loaded, not measured again
    assert resumed.precision_plan.layers == plan.layers
    x = sparse_bev(99)
    with torch.no_grad():
        for a, b in zip(first(x), again(x)):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_has_no_qdq_around_fp16_layers(tmp_path):
    import_or_skip("onnxruntime")
    from lidar_ptq.export.onnx_qdq import export_onnx

    _, model, data, report = quantized(0.3)
    fp16 = report.precision_plan.fp16_layers
    assert 0 < len(fp16) < 8

    class Flat(torch.nn.Module):  # ONNX outputs: the head's maps as a flat tuple
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return tuple(v for task in self.inner(x) for v in task.values())

    proto = export_onnx(Flat(model), (data[0][:1],), tmp_path / "m.onnx", ["bev"], [f"y{i}" for i in range(6)],
                        simplify=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    quantized_weights = [c for c in convs if producer.get(c.input[1]) is not None
                         and producer[c.input[1]].op_type == "DequantizeLinear"]
    quantized_inputs = [c for c in convs if producer.get(c.input[0]) is not None
                        and producer[c.input[0]].op_type == "DequantizeLinear"]
    assert len(convs) == 8
    assert len(quantized_weights) == len(quantized_inputs) == 8 - len(fp16)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = data[1][:1]
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), options).run(None, {"bev": x.numpy()})
    with torch.no_grad():
        ref = [t.numpy() for t in Flat(model)(x)]
    for g, r in zip(got, ref):  # the file computes the planned model: FP16 layers unquantized
        assert np.abs(g - r).max() <= 1e-3 * max(np.abs(r).max(), 1.0)


def test_one_sensitivity_measurement_serves_several_budgets():
    float_model, model, data, _ = quantized()
    measure, held = data[:4], data[4:]
    args = (model, measure, float_outputs(float_model, measure), held, float_outputs(float_model, held),
            TaskGuidedPositiveLoss())
    fresh = plan_precision(*args, 0.3)
    reused = plan_precision(*args, 0.3, sensitivity=fresh.sensitivity)
    assert reused.layers == fresh.layers and reused.loss == fresh.loss
    assert reused.forwards < fresh.forwards  # the held-out passes only
    assert rank_layers({"a": {"gain": -0.04, "alone": 0.02}, "b": {"gain": 0.01, "alone": 0.0}}) == ["a", "b"]
