"""tools/benchmark_peers.py report: a rewrite on a machine without the per-frame matches keeps the intervals."""
import json

import pytest
from conftest import import_or_skip, load_tool

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")

peers = load_tool("benchmark_peers")


def test_report_keeps_intervals_whose_matches_are_not_on_disk(tmp_path):
    gap = {"delta": -4.22, "low": -4.69, "high": -3.77, "resolved": True}
    result = {"meta": {"note": "n", "command": "c", "machine": "m", "load_before": 1.0, "fp32_map": 0.7338,
                       "seeds": [0]},
              "rows": [{"peer": "modelopt", "version": "0.47.0", "seed": 0, "status": "ok", "map": 0.6932,
                        "ptq_seconds": 10.0},
                       {"peer": "aimet_quantsim", "version": "2.42", "seed": 0, "status": "failed",
                        "reason": "ImportError: no aimet"}],
              "intervals": {"modelopt": {"fp32": gap}}}
    out = tmp_path / "peers.json"
    peers.write_outputs(result, out)
    assert json.loads(out.read_text())["intervals"] == {"modelopt": {"fp32": gap}}
    text = out.with_suffix(".md").read_text()
    assert "| modelopt | 0.47.0 | 69.32 | -4.22 [-4.69, -3.77] | - | 10 |" in text
    assert "| aimet_quantsim | 2.42 | did not run: ImportError: no aimet |" in text


def test_command_of_a_resumed_table_names_every_peer_in_it():
    args = peers.argparse.Namespace(peers=["aimet_adaround"], seeds=[0, 1, 2], val_frames=1000)
    rows = [{"peer": "aimet_quantsim"}, {"peer": "modelopt"}]
    assert peers.table_command(rows, args) == ("python tools/benchmark_peers.py --peers modelopt aimet_quantsim "
                                               "aimet_adaround --seeds 0 1 2 --val-frames 1000")
    assert "--peers aimet_adaround --seeds" in peers.table_command([], args)
