"""Dense ONNX Q/DQ export: graph form TensorRT needs, ONNX Runtime agreement, refusals, TensorRT ranges."""
import numpy as np
import pytest
import torch
from conftest import import_or_skip
from helpers import image_batches, small_cnn

import lidar_ptq
from lidar_ptq.quant.rounding import attach_rounding

onnx = import_or_skip("onnx")
ort = import_or_skip("onnxruntime")
from lidar_ptq.export import ExportError  # noqa: E402
from lidar_ptq.export.onnx_graph import constant_values  # noqa: E402
from lidar_ptq.export.onnx_qdq import export_onnx  # noqa: E402
from lidar_ptq.export.tensorrt import activation_ranges, read_calibration_cache, strip_qdq, write_dynamic_ranges  # noqa: E402


def calibrated_cnn(config="w8a8"):
    model = small_cnn()
    lidar_ptq.fold_batchnorms(model)
    lidar_ptq.quantize(model, config)
    lidar_ptq.calibrate(model, image_batches(), progress=False)
    return model


def run_ort(path, x, optimized=True):
    options = ort.SessionOptions()
    if not optimized:  # reference kernels: the file's arithmetic exactly
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def test_tensorrt_qdq_graph_and_onnxruntime_agreement(tmp_path):
    model = calibrated_cnn()
    x = image_batches(1, seed=5)[0][:2]
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"], dynamic_axes={"x": {0: "n"}})
    ops = [n.op_type for n in proto.graph.node]
    values = constant_values(proto)
    # every conv/linear reads a DequantizeLinear'd weight made of int8 codes with per-output-channel scales
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert len(layers) == 5
    for layer in layers:
        dq = producer[layer.input[1]]
        assert dq.op_type == "DequantizeLinear"
        codes, scale, zero = (values[name] for name in dq.input)
        assert codes.dtype == np.int8 and np.all(zero == 0) and scale.size == codes.shape[dict(
            (a.name, a.i) for a in dq.attribute).get("axis", 1)]
        act = producer[layer.input[0]]
        assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear"
        assert values[act.input[2]].dtype == np.int8 and values[act.input[1]].size == 1
    assert ops.count("QuantizeLinear") == 5 and "BatchNormalization" not in ops
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_ort(tmp_path / "m.onnx", x)
    step = np.abs(ref).max() / 127
    assert np.abs(got - ref).max() < step  # within one int8 step of the output range


def test_onnxruntime_target_makes_post_relu_activations_unsigned(tmp_path):
    model = calibrated_cnn()
    x = image_batches(1)[0][:2]  # calibration data: no value beyond the calibrated ranges
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"], target="onnxruntime")
    values = constant_values(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    quants = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    after_relu = [q for q in quants if producer.get(q.input[0]) is not None and producer[q.input[0]].op_type == "Relu"]
    assert len(after_relu) == 3
    assert all(values[q.input[2]].dtype == np.uint8 for q in after_relu)
    assert values[quants[0].input[2]].dtype == np.int8  # the network input can be negative: stays int8
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_ort(tmp_path / "m.onnx", x) - ref).max() < np.abs(ref).max() / 127


class SharedHead(torch.nn.Module):
    """One head applied to two feature levels, as the FPN anchor heads of mmdet3d do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        fine = self.stem(x)
        coarse = self.down(fine).relu()
        return torch.cat([self.head(fine).flatten(1), self.head(coarse).flatten(1)], 1)


def test_a_layer_applied_twice_exports_its_qdq_at_each_call(tmp_path):
    model = SharedHead().eval()
    lidar_ptq.quantize(model, "w8a8")
    lidar_ptq.calibrate(model, image_batches(), progress=False)
    x = image_batches(1, seed=5)[0][:1]
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"], simplify=False)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in proto.graph.node for o in n.output}
    assert len(convs) == 4  # the head twice
    assert all(producer[c.input[0]].op_type == "DequantizeLinear" for c in convs)
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_ort(tmp_path / "m.onnx", x, optimized=False)
    assert np.abs(got - ref).max() < np.abs(ref).max() / 127


def test_export_refuses_uncalibrated_quantizers_and_writes_nothing(tmp_path):
    model = calibrated_cnn()
    model[3].input_quantizer.scale = torch.empty(0)  # as if no calibration frame reached this layer
    with pytest.raises(lidar_ptq.UncalibratedError, match=r"1 quantizer\(s\) were never calibrated: "
                                                          r"3.input_quantizer.*calibrat"):
        export_onnx(model, (torch.randn(1, 3, 16, 16),), tmp_path / "m.onnx", ["x"], ["y"])
    assert not list(tmp_path.iterdir())


def test_export_refuses_what_tensorrt_cannot_run(tmp_path):
    asym = calibrated_cnn({"input": {"symmetric": False, "signed": False}})
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ExportError, match="zero point"):
        export_onnx(asym, (x,), tmp_path / "a.onnx", ["x"], ["y"])
    export_onnx(asym, (x,), tmp_path / "a.onnx", ["x"], ["y"], target="onnxruntime")  # ORT takes zero points
    model = calibrated_cnn()
    attach_rounding(model[0].weight_quantizer, model[0].weight, "adaround")
    with pytest.raises(ExportError, match="freeze"):
        export_onnx(model, (x,), tmp_path / "b.onnx", ["x"], ["y"])
    lidar_ptq.freeze(model)
    export_onnx(model, (x,), tmp_path / "b.onnx", ["x"], ["y"])


def test_tensorrt_dynamic_ranges_and_float_graph(tmp_path):
    model = calibrated_cnn()
    x = image_batches(1, seed=3)[0][:1]
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"])
    ranges = activation_ranges(proto)
    # TensorRT's dynamic range is scale * 127 (symmetric int8)
    amaxes = sorted(float(m.input_quantizer.scale) * 127 for m in model.modules() if hasattr(m, "input_quantizer"))
    assert sorted(ranges.values()) == pytest.approx(amaxes, rel=1e-6)
    assert "x" in ranges  # the network input keeps its name
    float_graph = strip_qdq(proto)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in float_graph.graph.node}
    graph_tensors = {o for n in float_graph.graph.node for o in n.output} | {"x"}
    assert set(ranges) <= graph_tensors  # every range names a tensor of the float graph
    onnx.save(float_graph, str(tmp_path / "f.onnx"))
    for name, q in lidar_ptq.iter_quantizers(model):  # float activations, weights still on their int8 grid
        if name.endswith("input_quantizer"):
            q.mode = lidar_ptq.QuantMode.FLOAT
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_ort(tmp_path / "f.onnx", x) - ref).max() < 1e-4
    paths = write_dynamic_ranges(ranges, tmp_path, "m")
    assert paths["calibration_cache"].read_text().startswith("TRT-")
    scales = read_calibration_cache(paths["calibration_cache"])
    assert scales == pytest.approx({k: v / 127 for k, v in ranges.items()}, rel=1e-6)


class FanOutConcat(torch.nn.Module):
    """One feature map read by two convs (fan-out) whose outputs are concatenated, as in SECONDFPN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_rewrites_let_every_conv_end_in_one_quantizer_and_keep_the_values(tmp_path):
    model = FanOutConcat().eval()
    lidar_ptq.quantize(model, "w8a8")
    data = image_batches(3)
    lidar_ptq.calibrate(model, data, progress=False)
    x = data[0][:2]
    plain = export_onnx(model, (x,), tmp_path / "plain.onnx", ["x"], ["y"], simplify=False)
    simple = export_onnx(model, (x,), tmp_path / "simple.onnx", ["x"], ["y"])
    users = {}
    for node in simple.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    relus = [n for n in simple.graph.node if n.op_type == "Relu"]
    assert len(relus) == 3
    # plain: the stem's output feeds two Q nodes, the concat sits between convs and Q; simplified: one Q each
    assert all([u.op_type for u in users[r.output[0]]] == ["QuantizeLinear"] for r in relus)
    plain_users = {}
    for node in plain.graph.node:
        for name in node.input:
            plain_users.setdefault(name, []).append(node.op_type)
    assert sorted(plain_users[[n for n in plain.graph.node if n.op_type == "Relu"][0].output[0]]) == \
        ["QuantizeLinear", "QuantizeLinear"]
    outputs = [run_ort(tmp_path / name, x, optimized=False) for name in ("plain.onnx", "simple.onnx")]
    assert np.array_equal(outputs[0], outputs[1])  # exact: the rewrites do not change any value
    from lidar_ptq.export.verify import layerwise_agreement
    report = layerwise_agreement(model, (x,), tmp_path / "simple.onnx", ["x"])
    assert report["quantizers"] == 4 and not report["missing_in_file"]  # merged quantizers still found
    assert report["max_code_diff"] <= 1 and report["differing_code_share"] < 1e-3


def test_layerwise_verification_catches_a_wrong_scale(tmp_path):
    model = calibrated_cnn()
    x = image_batches(1)[0][:2]
    proto = export_onnx(model, (x,), tmp_path / "m.onnx", ["x"], ["y"])
    from lidar_ptq.export.verify import layerwise_agreement
    assert layerwise_agreement(model, (x,), tmp_path / "m.onnx", ["x"])["max_code_diff"] <= 1
    quant = next(n for n in proto.graph.node if n.name == "3.input_quantizer/QuantizeLinear")
    values = constant_values(proto)
    bad = onnx.numpy_helper.from_array((values[quant.input[1]] * 1.5).astype(np.float32), "bad_scale")
    proto.graph.initializer.append(bad)
    quant.input[1] = "bad_scale"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    report = layerwise_agreement(model, (x,), tmp_path / "bad.onnx", ["x"])
    assert report["worst_quantizer"] == "3.input_quantizer" and report["max_code_diff"] > 10
