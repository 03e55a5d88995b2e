"""mmcv's deformable convolution as standard ops: equal to mmcv's kernel in float, quantized, exportable."""
import pytest
import torch
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from mmcv.ops import DeformConv2d, DeformConv2dPack  # noqa: E402

import lidar_ptq  # noqa: E402
from lidar_ptq.mmdet3d.deform_conv import QuantDeformConv2dPack  # noqa: E402
from lidar_ptq.quant.quantizer import QuantMode, temporary_quant_mode  # noqa: E402


@pytest.mark.parametrize("stride, deform_groups, dilation", [(1, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_float_mode_equals_mmcvs_kernel(stride, deform_groups, dilation):
    torch.manual_seed(0)
    layer = DeformConv2dPack(8, 6, 3, stride=stride, padding=dilation, dilation=dilation,
                             deform_groups=deform_groups).eval()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)  # offsets of a few pixels, many off-grid
    torch.nn.init.normal_(layer.conv_offset.bias, std=1.0)
    x = torch.randn(2, 8, 11, 13)
    with torch.no_grad():
        expected = layer(x)
        twin = lidar_ptq.quantize(torch.nn.Sequential(layer), {})[0]
        assert isinstance(twin, QuantDeformConv2dPack)
        with temporary_quant_mode(twin, QuantMode.FLOAT):
            got = twin(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_plain_deform_conv_takes_its_offsets_as_an_argument():
    torch.manual_seed(1)
    layer = DeformConv2d(4, 4, 3, padding=1).eval()
    x, offset = torch.randn(1, 4, 7, 7), torch.randn(1, 18, 7, 7) * 2
    with torch.no_grad():
        expected = layer(x, offset)
        twin = lidar_ptq.quantize(torch.nn.Sequential(layer), {})[0]
        with temporary_quant_mode(twin, QuantMode.FLOAT):
            got = twin(x, offset)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_quantized_deform_conv_quantizes_its_kernel_and_offsets_and_stays_close():
    torch.manual_seed(2)
    layer = DeformConv2dPack(16, 16, 3, padding=1).eval()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    # smooth maps, as features are (on white noise a small offset error moves every sample a lot)
    data = [torch.nn.functional.avg_pool2d(torch.randn(2, 16, 16, 16), 5, 1) for _ in range(3)]
    with torch.no_grad():
        expected = layer(data[0])
        model = torch.nn.Sequential(layer)
        lidar_ptq.quantize(model, {})
        lidar_ptq.calibrate(model, data)
        got = model(data[0])
    twin = model[0]
    assert twin.weight_quantizer.calibrated and twin.input_quantizer.calibrated
    assert twin.conv_offset.weight_quantizer.calibrated  # the offset branch is an ordinary quantized conv
    assert not torch.equal(got, expected)
    assert (got - expected).abs().mean() < 0.02 * expected.abs().mean()


def test_quantized_deform_conv_exports_standard_onnx_that_onnxruntime_runs(tmp_path):
    import_or_skip("onnx")
    import_or_skip("onnxruntime")
    from lidar_ptq.export.onnx_qdq import export_onnx
    from lidar_ptq.export.runtime import ort_session
    torch.manual_seed(3)
    model = torch.nn.Sequential(DeformConv2dPack(8, 8, 3, padding=1)).eval()
    data = [torch.randn(1, 8, 10, 10) for _ in range(2)]
    lidar_ptq.quantize(model, {})
    lidar_ptq.calibrate(model, data)
    proto = export_onnx(model, (data[0],), tmp_path / "dcn.onnx", ["x"], ["y"])
    ops = {n.op_type for n in proto.graph.node}
    assert "GridSample" in ops and {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # no custom op
    got = ort_session(tmp_path / "dcn.onnx", False).run(None, {"x": data[0].numpy()})[0]
    with torch.no_grad():
        expected = model(data[0]).numpy()
    assert abs(got - expected).max() < 1e-3 * abs(expected).max() + 1e-5


def test_stock_dcn_head_is_quantized_whole_and_reports_no_float_layer():
    """The DCN CenterHead of mmdet3d's nuScenes config: every deformable kernel gets its twin (not only
    the ``conv_offset`` child), nothing stays float, and the quantized head runs on a BEV map."""
    from mmdet3d.registry import MODELS
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    from lidar_ptq.mmdet3d.ptq import _unquantized_layers
    init_default_scope("mmdet3d")
    cfg = get_config("mmdet3d::centerpoint/centerpoint_voxel01_second_secfpn_head-dcn-circlenms_8xb4-cyclic-20e_"
                     "nus-3d.py")
    torch.manual_seed(0)
    head = MODELS.build(cfg.model.pts_bbox_head).eval()
    deformable = [n for n, m in head.named_modules() if isinstance(m, DeformConv2dPack)]
    assert len(deformable) == 12  # two per task, six tasks
    bev = [torch.nn.functional.avg_pool2d(torch.randn(1, 512, 20, 20), 3, 1, 1) for _ in range(2)]
    lidar_ptq.quantize(head, {})
    lidar_ptq.calibrate(head, [([b],) for b in bev])  # CenterHead takes a list of feature maps
    assert all(isinstance(head.get_submodule(n), QuantDeformConv2dPack) for n in deformable)
    assert _unquantized_layers(head) == []
    with torch.no_grad():
        out = head([bev[0]])
    assert torch.isfinite(out[0][0]["heatmap"]).all()


def test_a_parent_whose_own_weight_stays_float_is_reported():
    from lidar_ptq.mmdet3d.ptq import _unquantized_layers

    class Parent(torch.nn.Module):  # a float weight of its own beside a quantizable child
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.conv = torch.nn.Conv2d(4, 4, 1)

    model = torch.nn.Sequential(Parent())
    lidar_ptq.quantize(model, {})
    assert _unquantized_layers(model) == ["0 (Parent)"]


def test_a_layer_that_traces_to_a_custom_op_is_refused_by_name(tmp_path):
    import_or_skip("onnx")
    from lidar_ptq.export.checks import ExportError
    from lidar_ptq.export.onnx_qdq import export_onnx
    model = torch.nn.Sequential(DeformConv2dPack(4, 4, 3, padding=1)).eval()  # float: mmcv's own op
    with pytest.raises(ExportError, match="outside the ONNX standard: mmcv::MMCVDeformConv2d"):
        export_onnx(model, (torch.randn(1, 4, 8, 8),), tmp_path / "float.onnx", ["x"], ["y"], quantized=False)
    assert not (tmp_path / "float.onnx").exists()
