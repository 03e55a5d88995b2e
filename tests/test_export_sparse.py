"""libspconv ONNX export of a quantized sparse backbone, read back by the independent spconv checker."""
import pytest
import torch
from conftest import import_or_skip
from torch import nn

import lidar_ptq

spconv = import_or_skip("spconv.pytorch")
onnx = import_or_skip("onnx")
from lidar_ptq.export.sparse_check import SparseOnnxRunner  # noqa: E402
from lidar_ptq.export.sparse_onnx import emit_module, emit_scatter_dense, export_sparse_onnx  # noqa: E402

SHAPE = [9, 16, 16]  # z, y, x as in mmdet3d


def frame(seed=0, num=400, channels=4):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.stack([torch.randint(0, s, (num,), generator=g) for s in SHAPE], 1), dim=0)
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    return torch.randn(len(indices), channels, generator=g), indices


def backbone():
    """SubM -> strided sparse conv -> SubM, each with BN + ReLU (folded before quantization)."""
    torch.manual_seed(0)
    model = spconv.SparseSequential(
        spconv.SubMConv3d(4, 16, 3, indice_key="subm1", bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, indice_key="spconv2", bias=False), nn.BatchNorm1d(32),
        nn.ReLU(),
        spconv.SubMConv3d(32, 32, 3, indice_key="subm2", bias=False), nn.BatchNorm1d(32), nn.ReLU())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def run_dense(model, feats, coords):
    out = model(spconv.SparseConvTensor(feats, coords, SHAPE, 1)).dense()
    n, c, d, h, w = out.shape
    return out.reshape(n, c * d, h, w)


def export(model, path, overrides=None):
    feats, coords = frame()
    return export_sparse_onnx(
        model, lambda: model(spconv.SparseConvTensor(feats, coords, SHAPE, 1)), path, in_channels=4,
        spatial_shape=SHAPE, batch_size=1, precision_overrides=overrides,
        emit=lambda g, x: emit_scatter_dense(g, "scatter", emit_module(g, "", model, x), [5, 8, 8], 1, 32))


def quantized_backbone():
    model = backbone()
    lidar_ptq.fold_batchnorms(model)
    lidar_ptq.quantize(model, "w8a8")
    lidar_ptq.calibrate(model, [(spconv.SparseConvTensor(f, c, SHAPE, 1),) for f, c in (frame(s) for s in range(3))],
                        progress=False)
    return model


def test_sparse_onnx_attributes_follow_libspconv(tmp_path):
    model = quantized_backbone()
    proto = export(model, tmp_path / "scn.onnx")
    convs = [n for n in proto.graph.node if n.op_type == "SparseConvolution"]
    assert [n.op_type for n in proto.graph.node] == ["SparseConvolution"] * 3 + ["ScatterDense", "Reshape"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
    required = {"ndim", "input_spatial_shape", "output_spatial_shape", "in_channels", "out_channels", "kernel_size",
                "stride", "dilation", "padding", "transposed", "inverse", "output_padding", "groups", "subm",
                "rulebook", "activation", "input_dynamic_range", "weight_dynamic_ranges", "precision",
                "output_precision"}
    assert all(required <= set(a) for a in attrs)
    assert [a["subm"] for a in attrs] == [1, 0, 1]
    assert [a["rulebook"] for a in attrs] == [b"subm1", b"spconv2", b"subm2"]
    assert attrs[1]["input_spatial_shape"] == SHAPE and attrs[1]["output_spatial_shape"] == [5, 8, 8]
    assert all(a["activation"] == b"ReLU" and a["precision"] == b"int8" for a in attrs)
    # a conv writes int8 when its only reader is an int8 conv; the last one feeds the FP16 scatter
    assert [a["output_precision"] for a in attrs] == [b"int8", b"int8", b"fp16"]
    for a, m in zip(attrs, [m for m in model.modules() if hasattr(m, "indice_key")]):
        assert a["input_dynamic_range"] == pytest.approx(float(m.input_quantizer.scale) * 127, rel=1e-6)
        assert len(a["weight_dynamic_ranges"]) == m.out_channels
    inits = {i.name: i for i in proto.graph.initializer}
    weight = inits[convs[0].input[1]]
    assert weight.data_type == onnx.TensorProto.FLOAT16 and list(weight.dims) == [16, 3, 3, 3, 4]


def test_checker_reproduces_the_quantized_pytorch_backbone(tmp_path):
    model = quantized_backbone()
    export(model, tmp_path / "scn.onnx")
    runner = SparseOnnxRunner(tmp_path / "scn.onnx")
    feats, coords = frame(7)  # a frame not used for calibration
    with torch.no_grad():
        ref = run_dense(model, feats, coords)
    got = runner(feats, coords, 1)
    assert got.shape == ref.shape == (1, 32 * 5, 8, 8)
    # the only rounding the file adds is FP16 storage of the biases (weights are on their int8 grid)
    assert float((got - ref).abs().max()) < 0.01 * float(ref.abs().max())
    for m in model.modules():
        if isinstance(m, spconv.conv.SparseConvolution):
            m.bias.data = m.bias.data.half().float()
    with torch.no_grad():
        ref16 = run_dense(model, feats, coords)
    assert torch.equal(got, ref16)  # bit-exact: every attribute, layout and range was read as meant


def test_fp16_override_keeps_the_first_layer_float(tmp_path):
    model = quantized_backbone()
    proto = export(model, tmp_path / "scn.onnx", overrides={"0": "fp16"})
    first = {a.name: onnx.helper.get_attribute_value(a) for a in proto.graph.node[0].attribute}
    assert first["precision"] == b"fp16" and first["input_dynamic_range"] == 0.0
    for q in (model[0].input_quantizer, model[0].weight_quantizer):  # the PyTorch model the file now means
        q.spec = q.spec.updated({"enable": False})
    feats, coords = frame(7)
    with torch.no_grad():
        ref = run_dense(model, feats, coords)
    got = SparseOnnxRunner(tmp_path / "scn.onnx")(feats, coords, 1)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_sparse_export_refuses_uncalibrated_layers(tmp_path):
    model = quantized_backbone()
    model[3].input_quantizer.scale = torch.empty(0)
    with pytest.raises(lidar_ptq.UncalibratedError, match="3.input_quantizer"):
        export(model, tmp_path / "scn.onnx")
    assert not (tmp_path / "scn.onnx").exists()
