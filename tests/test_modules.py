"""Fake-quant twins: float equivalence, shared parameters, state dicts, W8A8 vs W2A2 accuracy."""
import pytest
import torch
from helpers import image_batches, small_cnn, sqnr_db
from torch import nn

import lidar_ptq
from lidar_ptq.quant.modules import QUANT_MODULES
from lidar_ptq.quant.spec import QuantSpec

CASES = [
    (nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 9)),
    (nn.Conv2d(4, 6, 3, stride=2), torch.randn(2, 4, 9, 9)),
    (nn.Conv3d(4, 6, 3), torch.randn(2, 4, 5, 6, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), torch.randn(2, 4, 5, 5)),
    (nn.Linear(4, 6), torch.randn(2, 3, 4)),
]


@pytest.mark.parametrize("layer,x", CASES, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "")
def test_twin_is_exactly_float_in_float_mode(layer, x):
    ref = layer(x)
    twin = QUANT_MODULES[type(layer)].from_float(layer, QuantSpec(per_channel=True), QuantSpec())
    assert isinstance(twin, type(layer))
    assert twin.weight is layer.weight  # shared, not copied
    lidar_ptq.set_quant_mode(twin, "float")
    assert torch.equal(twin(x), ref)
    assert set(layer.state_dict()) <= set(twin.state_dict())


def test_transposed_conv_keeps_output_size_argument_and_per_output_channel_axis():
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2)
    x = torch.randn(1, 4, 5, 5)
    twin = QUANT_MODULES[nn.ConvTranspose2d].from_float(layer, QuantSpec(per_channel=True), QuantSpec())
    lidar_ptq.calibrate(twin, [x])
    assert twin.weight_quantizer.scale.shape == (6,)
    assert twin(x, output_size=[12, 12]).shape == (1, 6, 12, 12)


def test_weight_quantization_is_exact_on_grid_and_input_quantized():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.5, 0.25], [2.0, 1.0, -1.0]]))
    twin = QUANT_MODULES[nn.Linear].from_float(layer, QuantSpec(bits=8, per_channel=True), QuantSpec(bits=8))
    lidar_ptq.calibrate(twin, [torch.tensor([[1.0, 1.0, 1.0]])])
    torch.testing.assert_close(twin.weight_quantizer.scale, torch.tensor([1 / 127, 2 / 127]))
    # row 0: 0.25 * 127 = 31.75 -> 32 ; row 1: exact
    expected_w = torch.tensor([[127, -64, 32], [127, 64, -64]]) * torch.tensor([[1 / 127], [2 / 127]])
    torch.testing.assert_close(twin.quantized_weight(), expected_w)
    out = twin(torch.tensor([[1.0, 0.5, -0.3]]))
    x_q = torch.round(torch.tensor([[1.0, 0.5, -0.3]]) * 127) / 127
    torch.testing.assert_close(out, x_q @ expected_w.t())


def test_float_checkpoint_loads_strictly_and_quantized_checkpoint_restores_outputs():
    float_model = small_cnn()
    x = image_batches(1)[0]
    quantized = lidar_ptq.quantize(small_cnn(seed=5), "w8a8")
    quantized.load_state_dict(float_model.state_dict(), strict=True)  # float checkpoint: fine
    lidar_ptq.calibrate(quantized, image_batches(2))
    out = quantized(x)
    restored = lidar_ptq.quantize(small_cnn(seed=7), "w8a8")
    restored.load_state_dict(quantized.state_dict(), strict=True)  # no recalibration needed
    assert torch.equal(restored(x), out)


def test_w8a8_stays_close_to_float_and_w2a2_does_not():
    x_cal, x_test = image_batches(4), image_batches(1, seed=9)[0]
    ref = small_cnn()(x_test)
    results = {}
    for bits in (8, 2):
        model = small_cnn()
        lidar_ptq.fold_batchnorms(model)
        lidar_ptq.quantize(model, {"weight": {"bits": bits}, "input": {"bits": bits}})
        lidar_ptq.calibrate(model, x_cal)
        with torch.no_grad():
            results[bits] = sqnr_db(ref, model(x_test))
    assert results[8] > 30.0, results
    assert results[2] < 5.0, results
