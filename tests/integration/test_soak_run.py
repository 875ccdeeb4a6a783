"""The soak benchmark end to end, short (fresh process): it samples every process and reports slopes."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_short_soak_reports_slopes_for_every_process():
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    cmd = [sys.executable, "-m", "ray_eplb.controller.cli.main", "bench-runtime", "--soak", "0.4", "--warmup", "0.1",
           "--sample-s", "4", "--workers", "2", "--layers", "2", "--experts", "8", "--hidden", "32", "--ffn", "64", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["samples"] >= 6 and got["mismatched_tokens"] == 0 and got["dispatches"] > 0
    series = set(got["slopes_mb_per_min"])
    ours = {"ray_eplb_controller", "ray_eplb_worker_0", "ray_eplb_worker_1", "driver"}
    assert ours | {f"{k} (uss)" for k in ours} | {"gcs_server", "raylet", "dashboard", "object_store"} <= series, series
    assert all(0 < got["last_mb"][k] < 10_000 for k in ours)  # real sizes in MB, not bytes or zeros
    # One router lives throughout and one more is made (and closed) per sample.
    assert got["routers_made"] == got["samples"] and got["routers_live_end"] == 1
    assert 1 <= got["routers_tracked_end"] <= got["routers_made"]
