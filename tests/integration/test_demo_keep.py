"""``ray-eplb demo --keep`` with the dashboard's default port taken: the demo still starts (Ray's
dashboard binds the next port itself), leaves the cluster, its workers and the controller running,
and prints how to reach them, log in and stop them; what it prints works. The cluster is ended by
the ids of its own processes afterwards (found by the temporary folder this test gives it), never
by ``ray stop``, which would end every Ray on the machine."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def _hold(port: int) -> socket.socket | None:
    """A socket listening on 127.0.0.1:``port``, where the dashboard binds; ``None`` when another
    program listens there already (the same condition for the demo)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed dashboard's TIME_WAIT must not stop it
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
        return s
    except OSError:
        s.close()
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return None


def _http(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _processes_of(tmp: str) -> list[int]:
    """Processes whose environment names this test's Ray temporary folder: the kept cluster's."""
    mine = f"RAY_TMPDIR={tmp}".encode()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mine in f.read().split(b"\0") and int(pid) != os.getpid():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _end(tmp: str) -> list[int]:
    """Kill the kept cluster's processes by id; the ones still there after 20 s."""
    deadline = time.monotonic() + 20
    while (pids := _processes_of(tmp)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    return _processes_of(tmp)


def test_demo_keep_leaves_a_cluster_the_printed_commands_reach_and_stop(tmp_path):
    holder = _hold(8265)
    tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}  # auth on, as shipped
    env.update(RAY_TMPDIR=tmp, PYTHONUNBUFFERED="1")
    eplb = [sys.executable, "-m", "ray_eplb.controller.cli.main"]
    out_path = tmp_path / "demo.txt"
    try:
        with open(out_path, "w") as out:  # a file, not a pipe: the kept cluster's processes may hold it open
            demo = subprocess.run(
                [*eplb, "demo", "--keep", "--workers", "2", "--nodes", "1", "--windows", "3", "--layers", "2",
                 "--batches-per-window", "1", "--batch-tokens", "32", "--interval", "0.3", "--rebalance-period", "0.6",
                 "--json"], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=200)
        text = out_path.read_text()
        assert demo.returncode == 0, text[-3000:]
        summary = json.loads(text.strip().splitlines()[-1])
        kept = summary["kept"]
        assert summary["ok"] and summary["tokens"] == 3 * 32
        # 8265 was taken: the dashboard is up on another port, at the URL printed.
        url = kept["dashboard"]
        assert url and url.startswith("http://") and not url.endswith(":8265"), url
        assert f"[demo] dashboard {url}: log in with the token in {kept['token']}" in text
        assert f"ray-eplb status --address {kept['address']}" in text
        assert f"{kept['stop'][0]} (the balancer), then `ray stop`" in text
        # Log in as printed: the dashboard answers with the token from that file, refuses without it.
        token = Path(kept["token"]).read_text().strip()
        assert _http(f"{url}/api/v0/actors", token) == 200 and _http(f"{url}/api/v0/actors", None) == 401
        # The demo's driver is gone; the balancer is not: the printed status command reaches it.
        shell = {**env, "RAY_AUTH_MODE": "token"}
        st = subprocess.run([*eplb, "status", "--address", kept["address"], "--json"], env=shell, capture_output=True,
                            text=True, timeout=90)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["loop"] == "stopped" and status["rebalances"] == summary["rebalances"] >= 1
        assert [w["health"] for w in status["workers"]] == ["ok", "ok"]
        stop = subprocess.run([*eplb, "stop", "--address", kept["address"], "--json"], env=shell, capture_output=True,
                              text=True, timeout=90)
        assert stop.returncode == 0, stop.stderr
        removed = sorted(json.loads(stop.stdout)["actors"])
        assert removed == ["ray_eplb_controller", "ray_eplb_worker_0", "ray_eplb_worker_1"]
    finally:
        if holder is not None:
            holder.close()
        left = _end(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert left == [], f"processes of the kept cluster still running: {left}"
