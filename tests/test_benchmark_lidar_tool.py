"""tools/benchmark_lidar.py bookkeeping: which rows run, which rows are the same run, merging parallel jobs."""
import argparse
import json

import pytest
from conftest import import_or_skip, load_tool

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from test_mmdet3d_ptq import ROOT  # noqa: E402

bench = load_tool("benchmark_lidar")
ARGS = argparse.Namespace(iterations=40, seed=0, output_loss_every=4, calib_frames=16)


def test_rows_filtered_by_method_and_bits_and_explicit_pairs_outside_the_table():
    assert bench.selected_rows(["lidar_ptq"], None) == [("lidar_ptq", 8, 8), ("lidar_ptq", 4, 8), ("lidar_ptq", 4, 4)]
    assert bench.selected_rows(None, ["w4a8"]) == [("maxmin", 4, 8), ("qdrop", 4, 8), ("lidar_ptq_paper", 4, 8),
                                                   ("lidar_ptq+tgpl+guards", 4, 8), ("lidar_ptq", 4, 8),
                                                   ("lidar_ptq@64x200", 4, 8)]
    # both named: every pair, also rows the table only has at W8A8
    assert bench.selected_rows(["paper:+tgpl"], ["w4a8"]) == [("paper:+tgpl", 4, 8)]


def test_paper_recipe_rows_follow_the_recipe_file_and_same_recipes_are_found():
    spec = lambda method, w=8: bench.recipe_spec(method, w, 8, ARGS)  # noqa: E731
    paper = json.loads(bench.PAPER_RECIPE.read_text())
    keys = ("equalize_inputs", "bias_correction", "guards", "tgpl", "ranges")
    assert {k: spec("lidar_ptq_paper")[k] for k in keys} == {k: paper[k] for k in keys}
    assert spec("paper:maxmin")["range_search"] is False and spec("paper:+tgpl")["adaptive_rounding"] is False
    # explicit defaults resolve to the default: a leave-one-out row that leaves nothing out is the default
    assert bench.same_recipe(spec("lidar_ptq"), {**spec("lidar_ptq"), "guards": False, "adaptive_rounding": True})
    assert not bench.same_recipe(spec("lidar_ptq"), spec("lidar_ptq+guards"))
    for w in (8, 4):
        assert not bench.same_recipe(spec("lidar_ptq", w), spec("lidar_ptq_paper", w))
        assert not bench.same_recipe(spec("lidar_ptq", w), spec("lidar_ptq+tgpl+bias_correction", w))
    assert not bench.same_recipe(spec("brecq"), spec("qdrop"))
    assert not bench.same_recipe({}, spec("qdrop"))


def test_merge_replaces_rerun_rows_and_refuses_other_settings(tmp_path):
    meta = {"val_frames": 100, "calib_frames": 16, "iterations": 40, "machine": "a", "note": "n"}
    row = lambda method, value: {"model": "m", "method": method, "w_bits": 8, "a_bits": 8, "value": value}  # noqa: E731
    base = {"meta": meta, "rows": [row("maxmin", 0.5), row("lidar_ptq", 0.6)]}
    rerun = tmp_path / "rerun.json"
    rerun.write_text(json.dumps({"meta": {**meta, "machine": "b"}, "rows": [row("lidar_ptq", 0.7), row("qdrop", 0.4)]}))
    merged = bench.merge_results(json.loads(json.dumps(base)), [rerun])
    assert [(r["method"], r["value"]) for r in merged["rows"]] == [("maxmin", 0.5), ("lidar_ptq", 0.7), ("qdrop", 0.4)]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"meta": {**meta, "iterations": 200}, "rows": []}))
    with pytest.raises(ValueError, match="iterations"):
        bench.merge_results(base, [other])


def test_range_rule_cell_names_the_picked_rule():
    assert bench.range_rule_cell(None) == "-" and bench.range_rule_cell({}) == "-"
    assert bench.range_rule_cell({"maxmin": 0.3, "lp2@all": 0.0125, "lp4": 0.05}) == "lp2@all (0.013)"


def test_guard_cell_states_the_guards_verdict():
    assert bench.guard_cell(None) == "-"
    assert bench.guard_cell({"kept": False}) == "-"
    assert bench.guard_cell({"before": 0.3, "after": 0.02, "kept": True}) == "0.300 -> 0.020, kept"
    assert bench.guard_cell({"before": 0.1, "after": 0.2, "kept": False}).endswith("undone")


def test_seed_runs_are_kept_apart_and_summarised_as_mean_and_spread(tmp_path):
    row = lambda method, value, seed=None: {"model": "m", "method": method, "w_bits": 8, "a_bits": 8, "value": value,  # noqa: E731
                                            "fp32": 0.75, "seconds": 10.0, **({} if seed is None else {"seed": seed})}
    # a row without a seed ran with the file's meta.seed: merging seed 1 keeps it, a seed-0 rerun replaces it
    base = {"meta": {"seed": 0, "iterations": 40}, "rows": [row("lidar_ptq", 0.70)]}
    rerun = tmp_path / "rerun.json"
    rerun.write_text(json.dumps({"meta": {"seed": 0, "iterations": 40},
                                 "rows": [row("lidar_ptq", 0.74, seed=1), row("lidar_ptq", 0.72, seed=0)]}))
    merged = bench.merge_results(base, [rerun])
    assert sorted((r.get("seed", 0), r["value"]) for r in merged["rows"]) == [(0, 0.72), (1, 0.74)]
    # a file run with another --seed merges too: its seed-less rows are stamped with it, its FP32 row is a repeat
    other_seed = tmp_path / "seed2.json"
    other_seed.write_text(json.dumps({"meta": {"seed": 2, "iterations": 40},
                                      "rows": [row("fp32", 0.75), row("lidar_ptq", 0.71)]}))
    merged = bench.merge_results({"meta": {"seed": 0, "iterations": 40}, "rows": [row("fp32", 0.75)]}, [other_seed])
    assert [(r["method"], r.get("seed")) for r in merged["rows"]] == [("fp32", None), ("lidar_ptq", 2)]
    rows = [row("fp32", 0.75), row("lidar_ptq", 0.72, 0), row("maxmin", 0.60, 0), row("lidar_ptq", 0.74, 1)]
    groups = bench.seed_groups(rows)
    assert [[r["method"] for r in g] for g in groups] == [["fp32"], ["lidar_ptq", "lidar_ptq"], ["maxmin"]]
    mean, std = bench.spread(groups[1])
    assert mean == pytest.approx(0.73) and std == pytest.approx(0.0141421, rel=1e-4)
    intervals = {"m|lidar_ptq|W8A8": {"delta": -2.0, "low": -3.1, "high": -0.9}}
    table = bench.seed_table(rows, [0, 1], intervals)
    assert table[3] == "| lidar_ptq | 8/8 | 72.00 | 74.00 | 73.00 +- 1.41 (2) | -2.00 [-3.10, -0.90] | 10 |"
    assert table[4].startswith("| maxmin | 8/8 | 60.00 | - | 60.00 +- 0.00 (1) | -15.00 (no interval) |")


def load_study(name):
    """A script of benchmarks/studies/ as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_study", ROOT / "benchmarks" / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_range_rule_study_reports_rank_agreement_per_seed(tmp_path):
    study = load_study("range_rules")
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    rows = [{"seed": 0, "sparse": True, "rule": rule, "bias_correction": bc, "val_map": val, "tgpl": tgpl,
             "pseudo_map": pseudo, "seconds": 1.0}
            for rule, bc, val, tgpl, pseudo in [("maxmin", False, 0.60, 0.30, 0.80), ("maxmin", True, 0.74, 0.02, 0.97),
                                                ("lp2", False, 0.70, 0.10, 0.90), ("lp2", True, 0.73, 0.01, 0.96)]]
    out = tmp_path / "study.json"
    study.write_report({"meta": {"val_frames": 10, "calib_frames": 2, "pseudo_gt_score": 0.3}, "rows": rows}, out)
    table = (tmp_path / "study.md").read_text()
    assert "| 0 | active | lp2 | yes | 73.00 | 0.0100 | 96.00 |" in table
    # over all four TGPL ranks the first three right (+0.80); among the two corrected ones it is wrong (-1)
    assert "| 0 | 4 | +0.80 | +1.00 | -1.00 | +1.00 | 73.00 - 74.00 |" in table


def test_report_gives_intervals_against_fp32_and_for_each_stage(tmp_path):
    from test_map_intervals import CLASSES, noisy_frames

    from lidar_ptq.mmdet3d.intervals import match_frames

    out = tmp_path / "lidar.json"
    model = "centerpoint_pillar_synthetic"
    fp32 = {"model": model, "method": "fp32", "w_bits": 32, "a_bits": 32, "value": 0.8, "fp32": 0.8, "seconds": 1.0}
    rows = [fp32]
    with_bc, without = "lidar_ptq+tgpl+guards+bias_correction", "lidar_ptq+tgpl+bias_correction"
    quality = {with_bc: 0.2, without: 0.2, "maxmin": 0.45}  # share of objects missed
    for method, misses in quality.items():
        for seed in (0, 1):
            row = {"model": model, "method": method, "w_bits": 8, "a_bits": 8, "seed": seed, "value": 0.7,
                   "fp32": 0.8, "seconds": 2.0}
            frames = noisy_frames(150, 0.2, seed=3 + seed, misses=misses)
            match_frames(frames, CLASSES).save(bench.table_path(out, row))
            rows.append(row)
    match_frames(noisy_frames(150, 0.2, seed=3, misses=0.15), CLASSES).save(bench.table_path(out, fp32))
    result = {"meta": {"note": "n", "seeds": [0, 1]}, "rows": rows}
    bench.write_outputs(result, out)
    saved = json.loads(out.read_text())
    assert saved["intervals"][f"{model}|maxmin|W8A8"]["resolved"]
    assert saved["intervals"][f"{model}|maxmin|W8A8"]["high"] < 0
    guards = saved["comparisons"][f"{model}|{with_bc}|{without}|W8A8"]
    assert guards["stage"].startswith("guards") and guards["delta"] == 0.0 and not guards["resolved"]
    text = out.with_suffix(".md").read_text()
    assert f"| {guards['stage']} | {with_bc} | {without} | W8A8 | +0.00 [" in text and "(unresolved)" in text
    # without the per-frame matches (a clean clone) the report keeps the intervals the JSON holds
    import shutil
    shutil.rmtree(bench.frames_dir(out))
    bench.write_outputs(json.loads(out.read_text()), out)
    assert json.loads(out.read_text())["intervals"] == saved["intervals"]


def test_earlier_rows_show_until_a_full_row_replaces_them_and_the_readme_table_follows_the_json(tmp_path):
    model = "centerpoint_pillar_synthetic"

    def row(method, value, w=8, seed=0, **extra):
        return {"model": model, "method": method, "w_bits": w, "a_bits": 8, "seed": seed, "value": value,
                "fp32": 0.74, "seconds": 1.0, **extra}
    earlier = [row(m, 0.70 + 0.01 * s, seed=s, val_frames=100, calib_frames=16, iterations=40)
               for m in ("qdrop", "lidar_ptq") for s in (0, 1)]
    earlier.append(row("lidar_ptq", 0.69, val_frames=100, calib_frames=64, iterations=200))
    result = {"meta": {"note": "n", "seeds": [0, 1], "calib_frames": 16, "iterations": 40}, bench.EARLIER: earlier,
              "rows": [{**row("fp32", 0.7338), "w_bits": 32, "a_bits": 32}, row("lidar_ptq", 0.7321),
                       row("lidar_ptq", 0.7301, seed=1)],
              "intervals": {f"{model}|lidar_ptq|W8A8": {"delta": -0.27, "low": -0.62, "high": 0.22,
                                                        "resolved": False}}}
    table = "\n".join(bench.earlier_table(result, model))
    assert "| qdrop | 8/8 | 100 | 16 x 40 | 70.00 / 71.00 | 70.50 +- 0.71 | -3.50 (no interval) |" in table
    assert "| lidar_ptq | 8/8 | 100 | 16 x" not in table  # measured in full: the earlier rows give way
    assert "| lidar_ptq | 8/8 | 100 | 64 x 200 | 69.00 |" in table  # another budget: no full row yet
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{bench.README_BEGIN}\nold\n{bench.README_END}\nafter\n")
    bench.update_readme(result, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{bench.README_END}\nafter\n")
    assert f"| Pillar (FP32 73.38) | W8A8 | {bench.README_ROWS[('lidar_ptq', 8, 8)]} " \
           "| 73.11 | -0.27 [-0.62, +0.22] (unresolved) |" in text


def test_readme_results_table_is_the_one_the_committed_json_renders():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(bench.README_BEGIN, 1)[1].split(bench.README_END, 1)[0].strip()
    assert block == "\n".join(bench.readme_table(json.loads(bench.DEFAULT_OUT.read_text())))


def test_budget_rows_run_their_method_with_their_own_frames_and_iterations():
    default, larger = bench.recipe_spec("lidar_ptq", 4, 8, ARGS), bench.recipe_spec("lidar_ptq@64x200", 4, 8, ARGS)
    assert (default["calib_frames"], default["recon"]["iterations"]) == (16, 40)
    assert (larger["calib_frames"], larger["recon"]["iterations"]) == (64, 200)
    assert {k: v for k, v in larger.items() if k not in ("calib_frames", "recon")} == \
        {k: v for k, v in default.items() if k not in ("calib_frames", "recon")}
    assert ("lidar_ptq@64x200", 4, 8) in bench.selected_rows(None, ["w4a8"])
    with pytest.raises(ValueError, match="<frames>x<iterations>"):
        bench.recipe_spec("lidar_ptq@64", 4, 8, ARGS)


def test_a_table_run_with_other_settings_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "lidar.json"
    out.write_text(json.dumps({"meta": {"val_frames": 1000, "calib_frames": 16, "iterations": 200,
                                        "output_loss_every": 4, "seed": 0, "seeds": [0]}, "rows": []}))
    before = out.read_text()
    monkeypatch.setattr("sys.argv", ["benchmark_lidar.py", "--out", str(out), "--iterations", "40", "--seeds", "1"])
    assert bench.main() == 2
    assert out.read_text() == before
    assert "iterations 200" in capsys.readouterr().err


def test_a_rerun_row_takes_the_place_of_the_row_of_the_same_run():
    row = lambda method, seed, value: {"model": "m", "method": method, "w_bits": 8, "a_bits": 8,  # noqa: E731
                                       "seed": seed, "value": value}
    rows = [row("maxmin", 0, 0.5), row("lidar_ptq", 0, 0.6), row("lidar_ptq", 1, 0.61)]
    again = bench.put_row(rows, row("lidar_ptq", 0, 0.7), default_seed=0)
    assert [(r["method"], r["seed"], r["value"]) for r in again] == [("maxmin", 0, 0.5), ("lidar_ptq", 0, 0.7),
                                                                      ("lidar_ptq", 1, 0.61)]
    assert bench.put_row(rows, row("lidar_ptq", 2, 0.62), default_seed=0)[-1]["seed"] == 2
    assert len(rows) == 3  # the list it was given is left as it was
