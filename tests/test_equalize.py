"""Input-channel equalization: float output unchanged, balanced quantizer input, saved and exported."""
import pytest
import torch
from torch import nn

import lidar_ptq
from lidar_ptq.quant.equalize import equalize_inputs


class Decorated(nn.Module):
    """A pillar-encoder-like first layer: coordinate channels (+-40) next to offset channels (+-0.15)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():  # as in a trained pillar encoder, the fine offsets matter
            self.linear.weight[:, 3:] *= 100

    def forward(self, x):
        return self.head(torch.relu(self.linear(x)))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coords = (torch.rand(256, 3, generator=g) - 0.5) * 80
        offsets = (torch.rand(256, 3, generator=g) - 0.5) * 0.3
        out.append(torch.cat([coords, offsets], 1))
    return out


def quantized(equalize, alpha=0.75):
    model = Decorated().eval()
    lidar_ptq.quantize(model, "w8a8")
    data = batches()
    scales = equalize_inputs(model, ["linear"], data, alpha) if equalize else {}
    lidar_ptq.calibrate(model, data, progress=False)
    return model, scales


def test_equalization_keeps_the_float_model_and_cuts_the_quantization_error():
    reference = Decorated().eval()
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        expected = reference(x)
    plain, _ = quantized(False)
    model, scales = quantized(True)
    assert list(scales) == ["linear"] and min(scales["linear"]) < 0.05 and max(scales["linear"]) == 1.0
    lidar_ptq.set_quant_mode(model, "float")
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-4)  # the same function in float
    lidar_ptq.set_quant_mode(model, "quantize")
    with torch.no_grad():
        err_plain = (plain(x) - expected).pow(2).mean()
        err_equal = (model(x) - expected).pow(2).mean()
    assert err_equal < 0.25 * err_plain, (float(err_equal), float(err_plain))


def test_equalized_layer_reloads_from_its_state_dict():
    model, _ = quantized(True)
    fresh = lidar_ptq.quantize(Decorated().eval(), "w8a8")
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_equalization_validates_alpha_and_skips_unmatched_layers():
    model = lidar_ptq.quantize(Decorated().eval(), "w8a8")
    assert equalize_inputs(model, ["nothing*"], batches()) == {}
    with pytest.raises(ValueError, match="alpha"):
        equalize_inputs(model, ["linear"], batches(), alpha=1.5)


def test_equalized_layer_exports_as_a_div_before_the_quantizer(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lidar_ptq.export.onnx_qdq import export_onnx
    from lidar_ptq.export.verify import layerwise_agreement
    model, _ = quantized(True)
    x = batches(1)[0]
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"])
    producer = {o: n for n in proto.graph.node for o in n.output}
    first_q = next(n for n in proto.graph.node if n.name == "linear.input_quantizer/QuantizeLinear")
    assert producer[first_q.input[0]].op_type == "Div"
    assert layerwise_agreement(model, (x,), tmp_path / "m.onnx", ["x"])["max_code_diff"] <= 1
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert abs(got - model(x).numpy()).max() < 1e-3
