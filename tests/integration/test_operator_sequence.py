"""A standing balancer run as an operator would: a Ray cluster started with ``ray start --head`` (in
a subprocess of its own), ``ray-eplb start`` from a process that exits, then from other processes
``status``, traffic, ``rebalance --dry-run``, ``rebalance`` (a new epoch), ``config set``,
``history --plot``, and ``stop``, after which no balancer actor is left. The cluster is always
stopped, by ending the ``ray start --block`` process group this test started (never ``ray stop``,
which would stop every Ray on the machine)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

TRAFFIC = textwrap.dedent("""
    import sys, torch, ray
    from ray_eplb.actors.names import CONTROLLER_NAME, WORKER_NAME
    from ray_eplb.actors.router import Router
    ray.init(address=sys.argv[1], namespace="ray_eplb", log_to_driver=False)
    ctl = ray.get_actor(CONTROLLER_NAME)
    workers = [ray.get_actor(WORKER_NAME.format(rank=r)) for r in range(4)]
    router = Router(workers, controller=ctl)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for layer in range(2):
            x = torch.randn(64, 16, generator=gen)
            ids = torch.stack([torch.zeros(64, dtype=torch.int64), torch.randint(1, 3, (64,), generator=gen)], 1)
            router.dispatch(layer, x, ids, torch.full((64, 2), 0.5))  # experts 0-2 hot, the rest idle
    router.close()
""")
LEFT = textwrap.dedent("""
    import sys, ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    print(sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("ray_eplb")))
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # Tests only: the cluster runs without token authentication; the product keeps Ray's default.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def _eplb(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_eplb.controller.cli.main", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cluster():
    """A one-node Ray cluster (2 CPUs, 4 rank slots) in its own process group; its address."""
    tmp = tempfile.mkdtemp(prefix="eplb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, metrics_port = _port(), _port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", '--resources={"eplb_rank": 4}',
         f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats", f"--metrics-export-port={metrics_port}",
         "--block"],
        env={**_env(), "RAY_metrics_report_interval_ms": "1000"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not come up in 60 s")
        yield address, metrics_port, tmp
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # the head's process group: ray start and what it started
            head.wait(5)  # gcs_server outlives SIGTERM for >10 s: the group is killed below
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this cluster still running
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_standing_balancer_end_to_end(cluster, tmp_path):
    cluster, metrics_port, tmp = cluster
    addr = ["--address", cluster]
    t0 = time.monotonic()
    # No balancer yet: 3, with the command that starts one.
    r = _eplb("status", *addr)
    assert r.returncode == 3 and "ray-eplb start" in r.stderr, r.stderr
    # The periodic trigger is far off: only `ray-eplb rebalance` moves experts in this test.
    start = ["start", *addr, "--weights", "synthetic:16:32", "--experts", "8", "--layers", "2", "--device", "cpu",
             "--set", "trigger=periodic", "--set", "rebalance_period_s=600", "--set", "interval_s=1.0",
             "--set", "collect_timeout_s=0.5", "--set", "window=100", "--json"]
    r = _eplb(*start)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["started"] is True and out["topology"]["num_nodes"] * out["topology"]["gpus_per_node"] == 4
    # The starting process has exited; a second start finds the running balancer and starts nothing.
    r = _eplb(*start)
    assert r.returncode == 0 and json.loads(r.stdout)["started"] is False, r.stderr
    traffic = subprocess.run([sys.executable, "-c", TRAFFIC, cluster], env=_env(), capture_output=True, text=True,
                             timeout=90)
    assert traffic.returncode == 0, traffic.stderr[-2000:]
    time.sleep(1.5)  # a loop round collects the counts
    st = json.loads(_eplb("status", *addr, "--json").stdout)
    assert st["loop"] == "running" and st["epoch"] == 0 and st["rounds"] >= 1
    assert [w["health"] for w in st["workers"]] == ["ok"] * 4
    assert st["tokens_seen"] > 0 and st["balancedness_now"] < 0.9
    assert st["config"]["trigger"] == "periodic"
    # Steer: a bad field is refused (2, one line), a good one applied.
    r = _eplb("config", "set", *addr, "no_such_field=1")
    assert r.returncode == 2 and "no_such_field" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _eplb("config", "set", *addr, "min_gain=0.02")
    assert r.returncode == 0 and json.loads(r.stdout)["min_gain"] == 0.02, r.stderr
    # Dry run: a plan with a predicted gain, nothing applied (the rebalance below still starts from epoch 0).
    r = _eplb("rebalance", *addr, "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert plan["action"] == "plan" and plan["moved"] > 0 and plan["predicted_after"] > plan["predicted_before"]
    # Rebalance: commits a new epoch.
    r = _eplb("rebalance", *addr, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["action"] == "committed" and rec["from_epoch"] == 0 and rec["epoch"] >= 1 and rec["moved"] > 0
    st = json.loads(_eplb("status", *addr, "--json").stdout)
    assert st["epoch"] == rec["epoch"] and st["rebalances"] == 1 and st["config"]["min_gain"] == 0.02
    assert st["last_rebalance"]["epoch"] == rec["epoch"] and st["last_rebalance"]["moved"] == rec["moved"]
    # The controller's log (the Log link of its row on the Actors page) has a line for the epoch.
    logs = "".join(p.read_text(errors="replace") for p in Path(tmp).glob("session_*/logs/worker-*.err"))
    assert f"epoch {rec['epoch']} committed" in logs
    # History and its plot.
    png = tmp_path / "h.png"
    r = _eplb("history", *addr, "--plot", str(png), "--json")
    assert r.returncode == 0, r.stderr
    hist = json.loads(r.stdout)
    assert [h["epoch"] for h in hist["history"] if h["action"] == "committed"] == [rec["epoch"]]
    assert len(hist["rebalance_loads"]) == 1 and len(hist["rebalance_loads"][0]["after"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # The Grafana dashboard against a live scrape: every series a panel queries is on the endpoint,
    # with the labels its filters use.
    _check_dashboard_against_scrape(metrics_port)
    # Stop: nothing of ours is left.
    r = _eplb("stop", *addr, "--json")
    assert r.returncode == 0, r.stderr
    stopped = json.loads(r.stdout)
    assert sorted(stopped["actors"]) == sorted(["ray_eplb_controller"] + [f"ray_eplb_worker_{i}" for i in range(4)])
    assert stopped["placement_groups"] == ["ray_eplb_ray_eplb_node0"]  # the one node's group, detached
    left = subprocess.run([sys.executable, "-c", LEFT, cluster], env=_env(), capture_output=True, text=True, timeout=60)
    assert left.stdout.strip() == "[]", left.stdout + left.stderr[-1000:]
    print(f"standing balancer sequence: {time.monotonic() - t0:.1f} s")


def _check_dashboard_against_scrape(port: int) -> None:
    from ray_eplb.controller.metrics import DESCRIPTIONS

    dash = json.loads(_eplb("grafana").stdout)
    wanted = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            wanted.update(re.findall(r"\b(ray_eplb_[a-z_]+)\{", t["expr"]))
    assert {w.removeprefix("ray_").removesuffix("_bucket") for w in wanted} == set(DESCRIPTIONS)
    deadline, seen = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        seen = {}
        for line in text.splitlines():
            m = re.match(r"^(ray_eplb_\w+)\{(.*)\}\s", line)
            if m:
                seen.setdefault(m.group(1), m.group(2))
        if wanted <= set(seen):
            break
        time.sleep(1.0)
    assert wanted <= set(seen), sorted(wanted - set(seen))
    for name in wanted:
        assert 'balancer="ray_eplb"' in seen[name] and "SessionName=" in seen[name], (name, seen[name])
