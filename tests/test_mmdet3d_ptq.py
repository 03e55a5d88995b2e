"""mmdet3d integration: tools/quantize.py (PTQLoop) and the LidarPTQHook route, on the synthetic
benchmark's small CenterPoint-Pillar (random weights, a few frames) and bad-input errors."""
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import import_or_skip, load_tool

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import lidar_ptq.mmdet3d  # noqa: E402,F401
from lidar_ptq.mmdet3d.adapter import DetectorAdapter  # noqa: E402
from lidar_ptq.mmdet3d.calibration import build_calibration_loader, check_points, collect_batches, require_points  # noqa: E402
from lidar_ptq.mmdet3d.ptq import CheckpointMismatchError, load_float_checkpoint, load_quantized  # noqa: E402
from lidar_ptq.sim.dataset import DatasetSpec, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PILLAR = ROOT / "configs" / "synthetic" / "centerpoint_pillar_synthetic.py"
VOXEL = ROOT / "configs" / "synthetic" / "centerpoint_voxel_synthetic.py"
FAST = ["--recipe-options", "recon.iterations=3", "recon.output_loss_every=2", "ranges.rules=[maxmin,lp4]",
        "--calib-frames", "3"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 5+3-frame synthetic set, a config pointing at it, and a random-weight float checkpoint."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(DatasetSpec(str(root / "data"), {"train": 5, "val": 3}, seed=3), workers=1, progress=False)
    loader = "num_workers=0, persistent_workers=False, dataset=dict(data_root='{}/')".format(root / "data")
    config = root / "pillar.py"
    config.write_text(f"_base_ = ['{PILLAR}']\ntrain_dataloader = dict({loader})\n"
                      f"val_dataloader = dict({loader})\ntest_dataloader = dict({loader})\n")
    init_default_scope("mmdet3d")
    from mmdet3d.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    checkpoint = root / "float.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return {"root": root, "config": config, "checkpoint": checkpoint}


def run_tool(args):
    tool = load_tool()
    cfg = tool.build_cfg(tool.parse_args(args))
    runner = Runner.from_cfg(cfg)
    runner.test()
    return runner


@pytest.fixture(scope="module")
def quantized_run(synthetic):
    work = synthetic["root"] / "work"
    runner = run_tool([str(synthetic["config"]), str(synthetic["checkpoint"]), "--work-dir", str(work), *FAST])
    return runner, work


def test_tool_writes_metrics_checkpoint_and_params(quantized_run):
    runner, work = quantized_run
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["precision"] == "w8a8"  # the quantized model's metrics are keyed by its bit-widths
    for kind in ("fp32", "w8a8"):
        assert 0.0 <= metrics[kind]["det/mAP"] <= 1.0
        assert {"det/AP_car", "det/AP_pedestrian", "det/AP_bicycle"} <= set(metrics[kind])
    assert metrics["recipe"] == "lidar_ptq_w8a8" and metrics["calib_frames"] == 3 and metrics["tgpl"] is False
    params = json.loads((work / "quant_params.json").read_text())["quantizers"]
    by_name = {p["name"]: p for p in params}
    pfn = by_name["pts_voxel_encoder.pfn_layers.0.linear.weight_quantizer"]
    assert pfn["bits"] == 8 and pfn["granularity"] == "per-channel(axis=0)" and len(pfn["scale"]) == 32
    assert all(p["calibrated"] for p in params)
    assert len(params) >= 2 * 30  # every conv/linear of the PFN, backbone, neck and head: weight + input
    assert metrics["unquantized_layers"] == []
    # every task branch reads the head's shared conv: one tensor, one (learned) step after reconstruction
    branch_inputs = [p["scale"] for n, p in by_name.items()
                     if re.fullmatch(r"pts_bbox_head\.task_heads\.\d+\.\w+\.0\.conv\.input_quantizer", n)]
    assert len(branch_inputs) >= 10 and all(s == branch_inputs[0] for s in branch_inputs)
    assert (work / "bev_fp32_vs_int8.png").stat().st_size > 10_000


def test_quantized_checkpoint_reloads_without_calibration(quantized_run, synthetic):
    runner, work = quantized_run
    cfg = runner.cfg
    batches = collect_batches(runner.model, build_calibration_loader(cfg, 2, seed=5), progress=False)
    quantized = DetectorAdapter(runner.model).eval()
    from mmdet3d.registry import MODELS
    fresh = MODELS.build(cfg.model)
    load_quantized(fresh, work / "quantized.pth")
    reloaded = DetectorAdapter(fresh).eval()
    with torch.no_grad():
        for batch in batches:
            a, b = quantized(batch), reloaded(batch)
            for ta, tb in zip(a[0], b[0]):
                for key in ta:
                    torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0)
    # and it really is quantized: float mode changes the heatmap
    from lidar_ptq import set_quant_mode
    with torch.no_grad():
        q = reloaded(batches[0])[0][0]["heatmap"]
        set_quant_mode(fresh, "float")
        f = reloaded(batches[0])[0][0]["heatmap"]
    assert not torch.equal(q, f)


def test_hook_route_gives_the_same_quantized_metrics(quantized_run, synthetic):
    _, work = quantized_run
    loop_metrics = json.loads((work / "metrics.json").read_text())["w8a8"]
    cfg = Config.fromfile(str(synthetic["config"]))
    recipe = str(ROOT / "configs" / "quant" / "ptq" / "lidar_ptq_w8a8.json")  # the CLI's default
    cfg.custom_hooks = [dict(type="LidarPTQHook", recipe=recipe, calib_frames=3,
                             recipe_options={"recon.iterations": 3, "recon.output_loss_every": 2,
                                             "ranges": {"rules": ["maxmin", "lp4"]}})]
    cfg.load_from = str(synthetic["checkpoint"])
    cfg.work_dir = str(synthetic["root"] / "hook")
    metrics = Runner.from_cfg(cfg).test()
    for key, value in loop_metrics.items():  # same quantization; 1e-4 absorbs float summation order
        assert metrics[key] == pytest.approx(value, abs=1e-4), key
    assert (synthetic["root"] / "hook" / "quantized.pth").is_file()


def test_baseline_recipe_and_skip_float_eval(synthetic):
    work = synthetic["root"] / "maxmin"
    run_tool([str(synthetic["config"]), str(synthetic["checkpoint"]), "--work-dir", str(work),
              "--recipe", str(ROOT / "configs" / "quant" / "ptq" / "maxmin_w8a8.json"),
              "--calib-frames", "2", "--skip-float-eval"])
    metrics = json.loads((work / "metrics.json").read_text())
    assert "fp32" not in metrics and metrics["recipe"] == "maxmin_w8a8" and "det/mAP" in metrics["w8a8"]


def user_error_cases(synthetic, tmp):
    """(what the user passed, arguments, what the one-line message must say): docs/quantize.md's table."""
    config, checkpoint = str(synthetic["config"]), str(synthetic["checkpoint"])
    bad_json = tmp / "recipe.json"
    bad_json.write_text("{w_bits: 8")
    from mmdet3d.registry import MODELS
    init_default_scope("mmdet3d")
    other = tmp / "voxel.pth"
    torch.save({"state_dict": MODELS.build(Config.fromfile(str(VOXEL)).model).state_dict()}, other)
    return [
        ("missing config", ["configs/nope.py", checkpoint], "config configs/nope.py does not exist"),
        ("unknown mmdet3d:: config", ["mmdet3d::centerpoint/nope.py", checkpoint], "cannot load 'mmdet3d::"),
        ("not a detector config", [str(ROOT / "configs" / "_base_" / "synthetic_lidar.py"), checkpoint],
         "is not a complete mmdet3d config"),
        ("missing checkpoint", [config, "missing.pth"], "checkpoint missing.pth does not exist"),
        ("checkpoint of another model", [config, str(other)], "does not match the model of this config"),
        ("unknown recipe", [config, checkpoint, "--recipe", "magic"], "neither a file nor a method name"),
        ("recipe file not JSON", [config, checkpoint, "--recipe", str(bad_json)], "is not valid JSON"),
        ("unknown recipe key", [config, checkpoint, "--recipe-options", "w_bitz=4"], "unknown key(s) ['w_bitz']"),
        ("bit-width out of range", [config, checkpoint, "--recipe-options", "w_bits=16"], "w_bits=16"),
        ("FP16 budget of zero", [config, checkpoint, "--fp16-budget", "0"], "fp16_budget=0.0 in the PTQ recipe"),
        ("bit-width not a number", [config, checkpoint, "--recipe-options", "a_bits=x"], "a_bits='x'"),
        ("unknown reconstruction key", [config, checkpoint, "--recipe-options", "recon.iteratons=5"],
         "unknown reconstruction key(s) ['iteratons']"),
        ("a stage's knob at the top level", [config, checkpoint, "--recipe-options", "search_frames=8"],
         "search_frames is now ranges.frames"),
        ("unknown key in a stage's knobs", [config, checkpoint, "--recipe-options", "ranges.frame=8"],
         "unknown key(s) ['frame'] in 'ranges'"),
        ("reconstruction for a calibration-only method",
         [config, checkpoint, "--recipe", "maxmin", "--recipe-options", "recon.iterations=5"],
         "does not reconstruct"),
    ]


def test_user_errors_end_with_one_line_and_no_traceback(synthetic, capsys, tmp_path):
    tool = load_tool()
    cases = user_error_cases(synthetic, tmp_path)
    assert len(cases) >= 12
    for what, args, message in cases:
        work = tmp_path / "work" / what.replace(" ", "_")
        assert tool.main([*args, "--work-dir", str(work)]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (what, err)
        assert "Traceback" not in err and not work.exists(), what  # failed before writing anything
    with pytest.raises(FileNotFoundError):  # --debug shows the real exception
        tool.main(["configs/nope.py", "x.pth", "--debug"])


def test_default_recipe_is_the_documented_file(synthetic):
    tool = load_tool()
    args = tool.parse_args([str(synthetic["config"]), str(synthetic["checkpoint"])])
    tool.build_cfg(args)
    assert Path(args.recipe) == ROOT / "configs" / "quant" / "ptq" / "lidar_ptq_w8a8.json"


def test_export_tool_refuses_missing_and_float_checkpoints(synthetic, capsys, tmp_path):
    tool = load_tool("export")
    assert tool.main([str(synthetic["config"]), "missing.pth"]) == 2
    assert "checkpoint missing.pth does not exist" in capsys.readouterr().err
    assert tool.main([str(synthetic["config"]), str(synthetic["checkpoint"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a lidar_ptq quantized checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_is_rejected(synthetic):
    from mmdet3d.registry import MODELS
    init_default_scope("mmdet3d")
    voxel = MODELS.build(Config.fromfile(str(VOXEL)).model)
    path = synthetic["root"] / "voxel.pth"
    torch.save({"state_dict": voxel.state_dict()}, path)
    pillar = MODELS.build(Config.fromfile(str(synthetic["config"])).model)
    expected = "missing key.*unexpected key.*shape mismatch.*pass the config the checkpoint was trained with"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_float_checkpoint(pillar, path)


def test_too_few_calibration_frames(synthetic):
    cfg = Config.fromfile(str(synthetic["config"]))
    with pytest.raises(ValueError, match="has 5 frames but 50 were asked for"):
        build_calibration_loader(cfg, 50)


def test_nan_points_raise_and_empty_frames_warn(caplog):
    with pytest.raises(ValueError, match="frame a.bin has 1 point.*NaN"):
        check_points(torch.tensor([[0.0, 1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0, 0.0]]), "a.bin")
    with caplog.at_level(logging.WARNING):
        assert check_points(torch.zeros(0, 4), "b.bin") is False
    assert "frame b.bin has no points" in caplog.text
    with pytest.raises(ValueError, match="test frame c.bin has no points.*remove it from the test set"):
        require_points(torch.zeros(0, 4), "c.bin")  # an evaluated frame: mmdet3d cannot run on it
    with pytest.raises(ValueError, match="frame d.bin has 1 point.*NaN"):
        require_points(torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]), "d.bin")


def test_demo_command_of_the_makefile_is_valid():
    """`make demo`'s tools/quantize.py arguments build a runnable config with the CPU recipe."""
    import re
    make = (ROOT / "Makefile").read_text()
    args = re.search(r"tools/quantize.py (.*?)\n\n", make, re.S).group(1).replace("\\\n", " ").split()
    assert (ROOT / args[1]).is_file(), "the demo checkpoint must be committed"
    tool = load_tool()
    cfg = tool.build_cfg(tool.parse_args([str(ROOT / args[0]), str(ROOT / args[1]), *args[2:]]))
    assert cfg.test_cfg.type == "PTQLoop" and cfg.test_cfg.recipe["recon"]["iterations"] == 8
    # a small set of its own: the CPU recipe's 32 calibration frames, 100 val frames (not the benchmark's)
    assert dict(cfg.synthetic_data) == {"root": "data/synthetic_demo/", "train": 32, "val": 100, "seed": 0}
    assert all(cfg[f"{split}_dataloader"].dataset.data_root == "data/synthetic_demo/" for split in ("train", "test"))
    assert cfg.test_cfg.calib_frames in (None, 32) and cfg.log_level == "WARNING" and cfg.work_dir == "work_dirs/demo"
    assert cfg.test_cfg.export_dir == "work_dirs/demo/export"  # the demo also writes the deployment files
