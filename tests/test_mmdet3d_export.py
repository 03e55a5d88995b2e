"""Export of quantized mmdet3d detectors (trained synthetic CenterPoint-Pillar and -Voxel, a few frames):
files, manifest, ONNX Runtime / libspconv-reader verification, the CLI routes and bad input."""
import json
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip, load_tool

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
onnx = import_or_skip("onnx")
import_or_skip("onnxruntime")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import lidar_ptq  # noqa: E402
import lidar_ptq.mmdet3d  # noqa: E402,F401
from lidar_ptq.export.checks import ExportError  # noqa: E402
from lidar_ptq.lidar.recipes import recipe_from_dict  # noqa: E402
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches  # noqa: E402
from lidar_ptq.mmdet3d.deployed import deployed_parts  # noqa: E402
from lidar_ptq.mmdet3d.evaluation import build_test_loader, evaluate  # noqa: E402
from lidar_ptq.mmdet3d.export import export_detector  # noqa: E402
from lidar_ptq.mmdet3d.ptq import load_float_checkpoint, quantize_detector  # noqa: E402
from lidar_ptq.sim.dataset import DatasetSpec, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "benchmarks" / "models"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    generate(DatasetSpec(str(root / "data"), {"train": 4, "val": 2}, seed=5), workers=1, progress=False)
    loader = "num_workers=0, persistent_workers=False, dataset=dict(data_root='{}/')".format(root / "data")
    configs = {}
    for kind in ("pillar", "voxel"):
        configs[kind] = root / f"{kind}.py"
        base = ROOT / "configs" / "synthetic" / f"centerpoint_{kind}_synthetic.py"
        configs[kind].write_text(f"_base_ = ['{base}']\ntrain_dataloader = dict({loader})\n"
                                 f"val_dataloader = dict({loader})\ntest_dataloader = dict({loader})\n")
    init_default_scope("mmdet3d")
    return root, configs


def quantized_model(config, kind, frames=2):
    from mmdet3d.registry import MODELS
    cfg = Config.fromfile(str(config))
    model = MODELS.build(cfg.model)
    load_float_checkpoint(model, MODELS_DIR / f"centerpoint_{kind}_synthetic.pth")
    model.eval()
    batches = collect_batches(model, build_calibration_loader(cfg, frames, 0), progress=False)
    quantize_detector(model, batches, recipe_from_dict({"method": "maxmin", "w_bits": 8, "a_bits": 8,
                                                        "calib_frames": frames}))
    return cfg, model, batches


@pytest.fixture(scope="module")
def pillar_run(data):
    root, configs = data
    tool = load_tool("quantize")
    work = root / "pillar_work"
    assert tool.main([str(configs["pillar"]), str(MODELS_DIR / "centerpoint_pillar_synthetic.pth"), "--work-dir",
                      str(work), "--recipe", "maxmin", "--calib-frames", "2", "--skip-float-eval",
                      "--export"]) == 0
    return work


def check_dense_verification(verification):
    layerwise = verification["dense"]["layerwise"]
    assert layerwise["quantizers"] >= 30 and not layerwise["missing_in_file"]
    assert layerwise["max_code_diff"] <= 1 and layerwise["differing_code_share"] < 1e-3
    reference = verification["dense"]["reference_kernels"]
    det = reference["detections"]
    assert det["boxes_pytorch"] > 0 and det["matched_within_10cm"] >= 0.95 * det["boxes_pytorch"]


def test_quantize_export_writes_verified_pillar_files(pillar_run):
    export = pillar_run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    expected = {f"{stem}{suffix}" for stem in ("pillar_encoder", "dense")
                for suffix in (".onnx", ".fp32.onnx", ".calib.cache", ".ranges.json")}
    assert set(manifest["files"]) == expected and expected | {"manifest.json"} == {p.name for p in export.iterdir()}
    dense = onnx.load(str(export / "dense.onnx"))
    onnx.checker.check_model(dense)
    assert manifest["files"]["dense.onnx"]["inputs"] == [{"name": "bev", "shape": [1, 32, 240, 240],
                                                          "dtype": "float32"}]
    assert [o["name"] for o in manifest["files"]["dense.onnx"]["outputs"]][:6] == \
        ["task0_reg", "task0_height", "task0_dim", "task0_rot", "task0_vel", "task0_heatmap"]
    pfe = manifest["files"]["pillar_encoder.onnx"]
    assert [i["name"] for i in pfe["inputs"]] == ["voxels", "num_points", "coors"]
    assert pfe["inputs"][0]["shape"][0] == "num_pillars"
    verification = manifest["verification"]
    check_dense_verification(verification)
    assert verification["pillar_encoder"]["diff_in_steps_of_next_quantizer"] < 0.01
    assert manifest["voxelization"]["max_num_points"] > 0 and manifest["scatter"]["done_by"] == "application"
    # the calibration cache names tensors of the float graph
    float_graph = onnx.load(str(export / "dense.fp32.onnx"))
    tensors = {o for n in float_graph.graph.node for o in n.output} | {"bev"}
    names = [line.split(": ")[0] for line in (export / "dense.calib.cache").read_text().splitlines()[1:]]
    assert names and set(names) <= tensors
    metrics = json.loads((pillar_run / "metrics.json").read_text())
    assert metrics["export"]["verification"]["dense"]["layerwise"] == verification["dense"]["layerwise"]


def test_export_tool_reexports_and_refuses_a_float_checkpoint(pillar_run, data, capsys):
    root, configs = data
    tool = load_tool("export")
    out = root / "reexport"
    assert tool.main([str(configs["pillar"]), str(pillar_run / "quantized.pth"), "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == \
        json.loads((pillar_run / "export" / "manifest.json").read_text())["files"].keys()
    assert tool.main([str(configs["pillar"]), str(MODELS_DIR / "centerpoint_pillar_synthetic.pth"),
                      "--out", str(root / "bad")]) == 2
    assert "not a lidar_ptq quantized checkpoint" in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_deployed_files_reproduce_the_pytorch_int8_map(data, tmp_path):
    _, configs = data
    cfg, model, batches = quantized_model(configs["pillar"], "pillar")
    export_detector(model, batches[0], tmp_path / "export", verify=False)
    loader = build_test_loader(cfg)
    pytorch = evaluate(model, loader, cfg.test_evaluator)
    with deployed_parts(model, tmp_path / "export", optimized=False):
        deployed = evaluate(model, loader, cfg.test_evaluator)
    assert pytorch["det/mAP"] > 0.1
    assert deployed["det/mAP"] == pytest.approx(pytorch["det/mAP"], abs=1e-6)
    assert evaluate(model, loader, cfg.test_evaluator)["det/mAP"] == pytorch["det/mAP"]  # parts restored


def test_asking_for_more_test_frames_than_the_set_holds_is_an_error(data):
    """mmengine keeps the frames there are when ``indices`` exceeds them; a benchmark would then report
    a mAP over fewer frames than it says."""
    from mmengine.config import Config
    _, configs = data
    cfg = Config.fromfile(str(configs["pillar"]))
    assert len(build_test_loader(cfg, 2).dataset) == 2
    with pytest.raises(ValueError, match="holds 2 frames but 3 were asked for"):
        build_test_loader(cfg, 3)


def test_voxel_export_sparse_backbone_with_fp16_first_layer(data, tmp_path):
    _, configs = data
    _, model, batches = quantized_model(configs["voxel"], "voxel")
    manifest = export_detector(model, batches[0], tmp_path / "export",
                               sparse_precision={"*conv_input*": "fp16"})
    # the synthetic voxel model's encoder is learned (HardVFE): it gets its own Q/DQ file
    assert {"voxel_encoder.onnx", "sparse_backbone.onnx", "dense.onnx"} <= set(manifest["files"])
    assert "pillar_encoder.onnx" not in manifest["files"]
    encoder = manifest["files"]["voxel_encoder.onnx"]
    assert encoder["inputs"][0]["shape"][0] == "num_voxels" and encoder["outputs"][0]["name"] == "voxel_features"
    sparse = manifest["files"]["sparse_backbone.onnx"]
    assert sparse["fp16_layers"] == ["pts_middle_encoder.conv_input.0"] and sparse["layers_int8"] >= 10
    proto = onnx.load(str(tmp_path / "export" / "sparse_backbone.onnx"))
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert adds  # basic blocks: residual adds with one shared range, each followed by a Relu
    for add in adds:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in add.attribute}
        assert attrs["precision"] == b"int8" and attrs["input0_dynamic_range"] == attrs["input1_dynamic_range"] > 0
        assert any(n.op_type == "Relu" and n.input[0] == add.output[0] for n in proto.graph.node)
    assert proto.graph.node[-2].op_type == "ScatterDense" and proto.graph.node[-1].op_type == "Reshape"
    verification = manifest["verification"]
    assert verification["voxel_encoder"]["layerwise"]["max_code_diff"] <= 1
    assert verification["voxel_encoder"]["diff_in_steps_of_next_quantizer"] < 1.0
    assert verification["sparse_backbone"]["share_over_1_step"] < 0.01
    check_dense_verification(verification)


def test_fp16_budget_plans_layers_that_the_files_keep_out_of_int8(data):
    import spconv.pytorch as spconv
    from mmdet3d.registry import MODELS

    from lidar_ptq.mmdet3d.adapter import DetectorAdapter
    from lidar_ptq.mmdet3d.ptq import load_quantized
    from lidar_ptq.quant.quantizer import FakeQuantizer

    root, configs = data
    work = root / "voxel_plan"
    assert load_tool("quantize").main([str(configs["voxel"]), str(MODELS_DIR / "centerpoint_voxel_synthetic.pth"),
                                       "--work-dir", str(work), "--recipe", "maxmin", "--calib-frames", "4",
                                       "--skip-float-eval", "--export", "--fp16-budget", "0.3"]) == 0
    plan = json.loads((work / "metrics.json").read_text())["precision_plan"]
    assert plan["frames"] == {"sensitivity": 2, "held_out": 2}
    assert 0 < len(plan["fp16_layers"]) < len(plan["layers"]) and plan["loss"] <= 0.3 * plan["loss_int8"]
    assert json.loads((work / "quant_params.json").read_text())["precision_plan"]["layers"] == plan["layers"]
    detector = MODELS.build(Config.fromfile(str(configs["voxel"])).model)
    load_quantized(detector, work / "quantized.pth")  # the checkpoint rebuilds the plan
    modules = dict(DetectorAdapter(detector).named_modules())
    for name, precision in plan["layers"].items():
        own = [q for q in modules[name].children() if isinstance(q, FakeQuantizer)]
        assert own and all(q.enabled == (precision == "int8") for q in own), name
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    sparse_fp16 = {n for n in plan["fp16_layers"] if isinstance(modules[n], spconv.conv.SparseConvolution)}
    assert sparse_fp16 and set(manifest["files"]["sparse_backbone.onnx"]["fp16_layers"]) == sparse_fp16
    proto = onnx.load(str(work / "export" / "sparse_backbone.onnx"))
    precision = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["precision"]
                 for n in proto.graph.node if n.op_type == "SparseConvolution"}
    assert sorted(precision.values()).count(b"fp16") == len(sparse_fp16)
    dense_fp16 = manifest["files"]["dense.onnx"]["fp16_layers"]
    dense = onnx.load(str(work / "export" / "dense.onnx"))
    producer = {o: n for n in dense.graph.node for o in n.output}
    convs = [n for n in dense.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    int8 = [c for c in convs if c.input[1] in producer and producer[c.input[1]].op_type == "DequantizeLinear"]
    assert dense_fp16 and len(int8) == len(convs) - len(dense_fp16)  # no Q/DQ around the FP16 layers
    dense_check = manifest["verification"]["dense"]
    assert 0 < dense_check["layerwise"]["quantizers"] and dense_check["layerwise"]["max_code_diff"] <= 1
    detections = dense_check["reference_kernels"]["detections"]
    assert detections["boxes_pytorch"] > 0 and detections["matched_within_10cm"] >= 0.95 * detections["boxes_pytorch"]


def test_export_refuses_float_and_partly_calibrated_models(data, tmp_path):
    from mmdet3d.registry import MODELS
    _, configs = data
    cfg, model, batches = quantized_model(configs["pillar"], "pillar")
    quantizer = model.pts_backbone.blocks[1][0].input_quantizer
    quantizer.scale = torch.empty(0)
    with pytest.raises(lidar_ptq.UncalibratedError, match="pts_backbone.blocks.1.0.input_quantizer"):
        export_detector(model, batches[0], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(ExportError, match="not quantized"):
        export_detector(MODELS.build(cfg.model), batches[0], tmp_path / "out")
