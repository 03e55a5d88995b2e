"""Model-level API: config overrides, modes, calibration loop forms, summary, errors."""
import json
import logging

import pytest
import torch
from helpers import image_batches, small_cnn
from torch import nn

import lidar_ptq
from lidar_ptq.quant.modules import QuantModuleMixin


def test_overrides_by_name_pattern_apply_in_order():
    model = lidar_ptq.quantize(small_cnn(), {
        "weight": {"bits": 4},
        "input": {"bits": 4},
        "overrides": {
            "0": {"weight": {"bits": 8}, "input": {"bits": 8}},   # first layer 8-bit
            "1[0-9]": {"enable": False},                          # keep the linear head in float
            "9": {"input": {"observer": "sparse_minmax"}},
        },
    })
    assert model[0].weight_quantizer.spec.bits == 8 and model[0].input_quantizer.spec.bits == 8
    assert model[3].weight_quantizer.spec.bits == 4
    assert not isinstance(model[11], QuantModuleMixin)
    assert model[9].input_quantizer.spec.observer == "sparse_minmax"
    assert model[9].input_quantizer.spec.bits == 4


def test_modes_switch_every_quantizer():
    x = image_batches(1)[0]
    model = small_cnn()
    ref = model(x)
    lidar_ptq.quantize(model, "w4a4")
    missing = lidar_ptq.calibrate(model, lambda m: [m(b) for b in image_batches(2)])
    assert missing == []
    assert not torch.equal(model(x), ref)
    lidar_ptq.set_quant_mode(model, "float")
    assert torch.equal(model(x), ref)
    lidar_ptq.set_quant_mode(model, "quantize")
    assert not torch.equal(model(x), ref)
    with pytest.raises(ValueError):
        lidar_ptq.set_quant_mode(model, "int8")


def test_summary_lists_every_quantizer_with_range():
    model = lidar_ptq.quantize(small_cnn(), "w8a8")
    lidar_ptq.calibrate(model, image_batches(2))
    rows = lidar_ptq.quant_summary(model)
    assert len(rows) == 10  # 5 layers x (weight, input)
    first = rows[0]
    assert first["name"] == "0.weight_quantizer" and first["granularity"] == "per-channel(axis=0)"
    assert first["format"] == "int8 sym" and first["calibrated"] and first["range"].startswith("amax in")
    assert rows[5]["name"] == "6.input_quantizer" and rows[5]["granularity"] == "per-tensor"
    text = lidar_ptq.format_summary(rows)
    assert "10 quantizers, 10 enabled, 10 calibrated" in text


def test_quantizer_without_data_is_reported_and_refuses_to_run(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lidar_ptq.quantize(model)
    with caplog.at_level(logging.WARNING):
        missing = lidar_ptq.calibrate(model)  # no data at all: weights only
    assert missing == ["0.input_quantizer", "1.input_quantizer"]
    assert "saw no calibration data" in caplog.text
    assert model[0].weight_quantizer.calibrated
    with pytest.raises(lidar_ptq.UncalibratedError, match="0.input_quantizer"):
        model(torch.randn(1, 4))


def test_calibrate_accepts_tuples_and_dicts():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b=0.0):
            return self.fc(a + b)

    for data in ([(torch.randn(2, 3), torch.randn(2, 3))], [{"a": torch.randn(2, 3)}]):
        model = lidar_ptq.quantize(TwoInputs())
        assert lidar_ptq.calibrate(model, data) == []


def test_config_errors_and_sources(tmp_path):
    with pytest.raises(KeyError, match="valid keys"):
        lidar_ptq.load_quant_config({"weights": {}})
    with pytest.raises(KeyError, match="enable"):
        lidar_ptq.load_quant_config({"overrides": {"x": {"enabled": False}}})
    with pytest.raises(KeyError, match="unknown quantizer setting"):
        lidar_ptq.load_quant_config({"overrides": {"x": {"weight": {"bit": 4}}}})
    with pytest.raises(ValueError, match="preset"):
        lidar_ptq.load_quant_config("w9a9")
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"weight": {"bits": 4}}))
    assert lidar_ptq.load_quant_config(path).weight.bits == 4
    assert lidar_ptq.load_quant_config("w4a8").input.bits == 8


def test_quantizing_twice_is_refused_and_unsupported_model_warns(caplog):
    layer = lidar_ptq.quantize(nn.Sequential(nn.Linear(2, 2)))[0]
    with pytest.raises(ValueError, match="already quantized"):
        lidar_ptq.quantize(layer)
    with caplog.at_level(logging.WARNING):
        lidar_ptq.quantize(nn.Sequential(nn.ReLU()))
    assert "no supported layer" in caplog.text


def test_nan_calibration_data_is_refused_with_the_quantizer_name():
    model = lidar_ptq.quantize(nn.Sequential(nn.Linear(3, 2)))
    bad = torch.tensor([[1.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match="0.input_quantizer.*NaN"):
        lidar_ptq.calibrate(model, [bad], progress=False)
    assert not model[0].input_quantizer.calibrated  # nothing half-written
    assert model[0].input_quantizer.observer is None  # and no stale statistics for the next run
    assert lidar_ptq.calibrate(model, [torch.ones(1, 3)], progress=False) == []
    assert model[0].input_quantizer.amax().item() == pytest.approx(128 / 127)
