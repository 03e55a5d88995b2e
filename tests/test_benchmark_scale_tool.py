"""tools/benchmark_scale.py report: linearity, the 256-frame projection and the cost-goal verdicts."""
from conftest import load_tool

scale = load_tool("benchmark_scale")


def rows_for(model, seconds_per_frame, fixed=10.0, frames=(1, 8, 32), quadratic_stage=None):
    rows = []
    for n in frames:
        stages = {"calibration": fixed + seconds_per_frame * n, "range search": 2 * seconds_per_frame * n}
        if quadratic_stage:
            stages[quadratic_stage] = 0.5 * n * n
        for stage, seconds in stages.items():
            rows.append({"model": model, "frames": n, "stage": stage, "seconds": seconds, "forwards": 2 * n,
                         "peak_rss_mb": 1000.0 + 100 * n})
        rows.append({"model": model, "frames": n, "stage": "total", "seconds": sum(stages.values()),
                     "forwards": 2 * n * len(stages), "peak_rss_mb": 1000.0 + 100 * n})
    return rows


def test_linearity_projection_and_verdicts():
    rows = rows_for("nus-pillar", 10.0, quadratic_stage="bias correction")
    assert abs(scale.linearity(rows, "nus-pillar", "range search") - 1.0) < 1e-9
    assert scale.linearity(rows, "nus-pillar", "calibration") < 1.0  # a fixed part makes it sub-linear
    assert scale.linearity(rows, "nus-pillar", "bias correction") == 4.0  # quadratic: 16x the time for 4x frames
    assert abs(scale.projection(rows, "nus-pillar", "range search") - 20.0 * 256) < 1e-6
    # a stage bounded by a frame cap (equal times, noise sloping down) is projected at its largest measured time
    capped = [{"model": "nus-pillar", "frames": f, "stage": "range search", "seconds": t, "forwards": 248,
               "peak_rss_mb": 2000.0} for f, t in ((8, 500.0), (32, 450.0))]
    assert scale.projection(capped, "nus-pillar", "range search") == 450.0
    # the total is the sum of its stages' projections
    parts = sum(scale.projection(rows, "nus-pillar", s) for s in ("calibration", "range search", "bias correction"))
    assert abs(scale.projection(rows, "nus-pillar", "total") - parts) < 1e-6
    lines = "\n".join(scale.verdicts(rows, "nus-pillar"))
    assert "missed by bias correction (4.00x)" in lines
    total_32 = next(r for r in rows if r["frames"] == 32 and r["stage"] == "total")["seconds"] / 60
    assert f"total at 32 frames {total_32:.1f} min against 30 min: met (largest stage: range search" in lines
    slow = rows_for("nus-pillar", 100.0)
    assert "against 30 min: missed by" in "\n".join(scale.verdicts(slow, "nus-pillar"))
    assert "peak memory at 32 frames 4.10 GB against 8 GB: met" in lines
    assert scale.verdicts(rows_for("synthetic-pillar", 1.0), "synthetic-pillar") == []  # targets: stock models


def test_report_renders_every_measured_stage_and_run():
    rows = rows_for("nus-pillar", 1.0, frames=(1, 4))
    runs = [{"model": "nus-pillar", "frames": n, "quantized_layers": 93, "frame_source": "synthetic frames",
             "ptq_seconds": 1.0, "range_rule": "lp2", "load_before": 1.5} for n in (1, 4)]
    meta = {"recipe": "r.json", "recipe_options": {"recon.iterations": 4}, "seed": 0, "machine": "m",
            "commands": ["python tools/benchmark_scale.py"]}
    text = scale.render({"meta": meta, "rows": rows, "runs": runs})
    assert "## nus-pillar (93 quantized layers)" in text
    assert "| range search | 2.0 / 2 / 1100 | 8.0 / 8 / 1400 |" in text
    assert "32 frames not measured" in text and 'Recipe overrides: {"recon.iterations": 4}.' in text
    assert "Machine: m." in text  # runs that predate the per-run machine line take the file's
    runs[1]["machine"] = "other"
    assert "Machine: m; other." in scale.render({"meta": meta, "rows": rows, "runs": runs})
