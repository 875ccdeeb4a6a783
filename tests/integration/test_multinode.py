"""Node placement on a real multi-raylet cluster, and the demo end to end (fresh processes)."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run(cmd, timeout, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(150)
def test_ranks_of_a_node_share_a_ray_node_and_moves_prefer_it():
    got = json.loads(run([sys.executable, str(HERE / "multinode_script.py")], 140).strip().splitlines()[-1])
    assert got["topology"] == [2, 2]
    n = got["nodes"]
    assert n[0] == n[1] and n[2] == n[3] and n[0] != n[2]
    assert got["record"] == "committed" and got["wrong_slots"] == 0 and len(set(got["epochs"])) == 1
    t = got["transfers"]
    assert t["moves"] == 3 and t["intra_node"] == 1 and t["inter_node"] == 2


@pytest.mark.timeout(200)
def test_demo_runs_end_to_end_with_token_auth_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the product path: auth on
    cmd = [sys.executable, "-m", "ray_eplb.controller.cli.main", "demo", "--workers", "4", "--nodes", "2",
           "--windows", "6", "--layers", "4", "--batches-per-window", "2", "--batch-tokens", "64",
           "--interval", "0.3", "--rebalance-period", "0.6", "--out", str(tmp_path / "plots"), "--json"]
    # With a Chromium here (.ci/run installs Debian's), also look at the Actors page and the controller's
    # log page the way a person does.
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser:
        cmd += ["--screenshot", str(tmp_path / "actors.png")]
    else:
        warnings.warn("no chromium on PATH: the demo's dashboard is checked through its APIs only, not in a browser", stacklevel=1)
    out = run(cmd, 190, env)
    assert "[demo] token authentication on (token: " in out  # tests/integration/test_auth.py: what that means
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"balancedness_before", "balancedness_after", "balancedness_run", "planning", "max_moves",
                            "rebalance_period_s", "rebalances", "experts_moved", "bytes_moved", "transfer_batches",
                            "aborted", "swap_s_mean", "tokens", "mismatched_tokens", "max_stall_ms",
                            "wrong_weight_slots", "dashboard", "plots", "ok"}
    assert sorted(Path(p).name for p in summary["plots"]) == ["balancedness.png", "gpu_load_heatmap.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in summary["plots"])
    assert summary["tokens"] == 6 * 2 * 64 and summary["mismatched_tokens"] == 0 and summary["ok"]
    assert summary["rebalances"] >= 1 and summary["experts_moved"] > 0 and summary["bytes_moved"] > 0
    # What a person finds on the dashboard: the named actors (Actors page) and the metrics (Prometheus).
    dash = summary["dashboard"]
    assert dash["url"] and dash["actors"] == ["ray_eplb_controller"] + [f"ray_eplb_worker_{r}" for r in range(4)]
    assert {"ray_eplb_epoch", "ray_eplb_rebalances_total", "ray_eplb_experts_moved_total",
            "ray_eplb_balancedness", "ray_eplb_phase_seconds"} <= set(dash["metrics"])
    if browser:  # what headless Chromium found on the Actors page and behind the controller's Log link
        assert "browser" in dash, dash.get("browser_error")
        seen = dash["browser"]
        assert seen["actors"] == dash["actors"] and (tmp_path / "actors.png").stat().st_size > 10_000
        assert seen["log"]["page"].startswith("#/actors/") and (tmp_path / "actors_log.png").stat().st_size > 10_000
        # One line per committed and aborted epoch of the controller's history, as the log viewer renders it.
        assert dash["epochs"]["committed"] and seen["log"]["lines"] >= len(dash["epochs"]["committed"])
        assert set(dash["epochs"]["committed"]) <= set(seen["log"]["committed"]), (dash["epochs"], seen["log"])
        assert set(dash["epochs"]["aborted"]) <= set(seen["log"]["aborted"]), (dash["epochs"], seen["log"])
        print(f"browser check: {seen['seconds']:.1f} s")
