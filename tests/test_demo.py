"""The built-in demo runs end to end and ranks bit-widths sensibly."""
import json

from lidar_ptq.demo import main, parse_wa, run_demo


def test_demo_quantizes_and_reports(tmp_path):
    w8 = run_demo(8, 8, calib_batches=2, out_dir=tmp_path)
    w4 = run_demo(4, 4, calib_batches=2)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == [r["method"] for r in w8["rows"]]
    assert 0.01 < w8["meta"]["bev_occupancy"] < 0.05  # LiDAR-like sparsity
    by_method = {r["method"]: r["sqnr_db"] for r in w8["rows"]}
    assert by_method["minmax"] > 40.0
    assert by_method["sparse_lp_search"] >= by_method["minmax"]
    for r8, r4 in zip(w8["rows"], w4["rows"]):
        assert r8["sqnr_db"] > r4["sqnr_db"] + 10, (r8, r4)
    assert all(row["calibrated"] for row in w8["summary"])


def test_demo_cli(tmp_path, caplog):
    caplog.set_level("INFO")
    assert main(["--settings", "w8a8", "--calib-batches", "1", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "w8a8" / "demo_results.json").is_file()
    assert "W8A8 on sparse BEV maps" in caplog.text
    assert parse_wa("W4A8") == (4, 8)
