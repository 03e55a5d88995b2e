"""FakeQuantizer: integer codes, dequantized values, gradients (STE, LSQ), state and errors."""
import math

import pytest
import torch

from lidar_ptq import FakeQuantizer, QuantSpec, UncalibratedError


def make(spec: QuantSpec, lo, hi, axis=None) -> FakeQuantizer:
    q = FakeQuantizer(spec, channel_axis=axis)
    q.set_range(torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32))
    return q


def test_symmetric_int8_codes_and_values():
    q = make(QuantSpec(bits=8), -1.0, 1.0)
    assert q.scale.item() == pytest.approx(1 / 127)
    x = torch.tensor([0.0, 0.25, -1.0, 2.0, -0.0042])
    assert q.to_int(x).tolist() == [0, 32, -127, 127, -1]
    torch.testing.assert_close(q(x), torch.tensor([0, 32, -127, 127, -1]) / 127.0)
    assert q.amax().item() == pytest.approx(128 / 127)  # int8 reaches -128 * scale


def test_unsigned_asymmetric_4bit_codes_and_values():
    q = make(QuantSpec(bits=4, signed=False, symmetric=False), -1.0, 2.0)
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero_point.item() == 5
    x = torch.tensor([-1.0, 0.0, 0.33, 2.5, -3.0])
    assert q.to_int(x).tolist() == [0, 5, 7, 15, 0]
    torch.testing.assert_close(q(x), torch.tensor([-1.0, 0.0, 0.4, 2.0, -1.0]))


def test_unsigned_symmetric_uses_full_positive_range():
    q = make(QuantSpec(bits=8, signed=False), 0.0, 2.55)
    assert q.scale.item() == pytest.approx(0.01)
    assert q.to_int(torch.tensor([-0.5, 1.0, 3.0])).tolist() == [0, 100, 255]


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_scales_follow_the_axis(axis):
    spec = QuantSpec(bits=8, per_channel=True)
    amax = torch.tensor([1.0, 2.0, 4.0])
    q = make(spec, -amax, amax, axis=axis)
    assert q.scale.shape == (3,)
    w = torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 2.0]])  # channels along dim 1
    if axis == 0:
        w = w.t().contiguous()  # channels along dim 0
    codes = q.to_int(w)
    expected = torch.tensor([[127, 127, 127], [64, 64, 64]], dtype=torch.int32)
    assert torch.equal(codes, expected if axis == 1 else expected.t())


def test_ste_gradient_passes_in_range_and_blocks_clipped_values():
    q = make(QuantSpec(bits=8), -1.0, 1.0)
    x = torch.tensor([0.3, -0.7, 1.5, -2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_lsq_step_gradient_matches_formula():
    spec = QuantSpec(bits=4, learn_scale=True)  # qmin -8, qmax 7
    q = make(spec, -0.7, 0.7)  # scale 0.1
    assert isinstance(q.scale, torch.nn.Parameter)
    x = torch.tensor([0.26, -0.31, 5.0, -5.0])
    q.train()
    q(x).sum().backward()
    s = 0.1
    v = x / s
    per_element = torch.where(v > 7, torch.tensor(7.0), torch.where(v < -8, torch.tensor(-8.0), torch.round(v) - v))
    g = 1 / math.sqrt(x.numel() * 7)
    assert q.scale.grad.item() == pytest.approx(per_element.sum().item() * g, rel=1e-4)
    # hand check of the unscaled sum: (0.0-0.4) ... round(2.6)-2.6=0.4, round(-3.1)+3.1=0.1, 7, -8
    assert per_element.sum().item() == pytest.approx(0.4 + 0.1 + 7 - 8, abs=1e-5)


def test_uncalibrated_use_names_the_quantizer_and_the_fix():
    q = FakeQuantizer(QuantSpec())
    q.name = "backbone.conv1.input_quantizer"
    with pytest.raises(UncalibratedError, match="backbone.conv1.input_quantizer.*calibrate"):
        q(torch.ones(3))


@pytest.mark.parametrize("bits", [1, 9, 8.0])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


def test_unknown_spec_key_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown quantizer setting.*bitz"):
        QuantSpec().updated({"bitz": 4})


def test_state_dict_round_trip_restores_calibration():
    q = make(QuantSpec(bits=8, per_channel=True), torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), axis=0)
    fresh = FakeQuantizer(QuantSpec(bits=8, per_channel=True), channel_axis=0)
    assert not fresh.calibrated
    fresh.load_state_dict(q.state_dict())
    assert fresh.calibrated
    torch.testing.assert_close(fresh.scale, q.scale)
    x = torch.randn(2, 5)
    torch.testing.assert_close(fresh(x), q(x))


def test_disabled_quantizer_is_identity_even_uncalibrated():
    q = FakeQuantizer(QuantSpec(enable=False))
    x = torch.randn(4)
    assert q(x) is x


@pytest.mark.parametrize("zero_is_zero", [False, True])
@pytest.mark.parametrize("shape, scale_shape", [((4, 3, 5, 5), (1, 3, 1, 1)), ((7, 9), ())])
def test_fake_quantize_backward_equals_the_composed_ste(shape, scale_shape, zero_is_zero):
    """The memory-lean autograd function gives the values and STE/LSQ gradients of the composed ops."""
    from lidar_ptq.quant.functional import fake_quantize, round_ste

    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).requires_grad_()
    scale = (torch.rand(scale_shape) * 0.1 + 0.02).requires_grad_()
    zero_point = torch.zeros(scale_shape) if zero_is_zero else torch.randint(-20, 20, scale_shape).float()
    upstream = torch.randn(shape)
    lean = fake_quantize(x, scale, zero_point, -128, 127, zero_is_zero)
    grad_x, grad_scale = torch.autograd.grad((lean * upstream).sum(), (x, scale))
    codes = torch.clamp(round_ste(x / scale) + zero_point, -128, 127)
    composed = (codes - zero_point) * scale
    ref_x, ref_scale = torch.autograd.grad((composed * upstream).sum(), (x, scale))
    assert torch.equal(lean, composed)
    assert torch.allclose(grad_x, ref_x, atol=1e-6)
    assert torch.allclose(grad_scale, ref_scale, rtol=1e-5, atol=1e-4)
    unclamped = torch.round(x / scale).detach() + zero_point
    assert torch.equal(grad_x != 0, (unclamped >= -128) & (unclamped <= 127))  # clipped codes pass no gradient
    assert not torch.equal(grad_x != 0, torch.ones_like(grad_x, dtype=torch.bool))
    fixed = fake_quantize(x, scale.detach(), zero_point, -128, 127, zero_is_zero)  # a fixed step: a saved mask
    (fixed_x,) = torch.autograd.grad((fixed * upstream).sum(), x)
    assert torch.equal(fixed, composed) and torch.equal(fixed_x, grad_x)
