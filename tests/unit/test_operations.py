"""What an operator asks a balancer, without Ray: the typed status, the dry-run plan, the timeline
and per-GPU loads behind the plots, swap progress, the metric views, the CLI's input handling and
the shipped Grafana dashboard against the metric catalogue."""
import asyncio
import json
import re
from pathlib import Path

import pytest
import torch
from fakes import TOPO, make, serve

from ray_eplb.controller.cli import ops
from ray_eplb.controller.cli.main import COMMANDS
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.metrics import DESCRIPTIONS, KINDS
from ray_eplb.controller.status import ControllerStatus
from ray_eplb.topology import Placement

# Rounds never rebalance by themselves (the period is far off): only rebalance_now() does.
QUIET = ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, prepare_timeout_s=0.5, commit_timeout_s=0.5,
                         release_timeout_s=0.5, trigger="periodic", rebalance_period_s=600)
DASHBOARD = Path(ops.__file__).parents[1] / "grafana_dashboard.json"


class Recorder:
    """A metrics sink that keeps every value by (name, tags)."""

    def __init__(self):
        self.values, self.observed = {}, []

    def gauge(self, name, value, tags=None):
        self.values[(name, tuple(sorted((tags or {}).items())))] = value

    def observe(self, name, value, tags=None):
        self.observed.append((name, value))

    def count(self, name, value=1.0, tags=None):
        pass

    def refresh(self):
        pass


def _skewed(workers, rounds=3):
    p0 = Placement.identity(TOPO)
    for _ in range(rounds):
        serve(workers, p0, 0, 0, 60)
        serve(workers, p0, 1, 3, 60)
        serve(workers, p0, 1, 5, 2)


def test_status_is_typed_json_and_tracks_a_rebalance():
    ctl, workers, _ = make(QUIET)

    async def go():
        before = await ctl.status()
        _skewed(workers)
        await ctl.step()  # a round without a rebalance (no trigger due): the workers report
        seen = await ctl.status()
        rec = await ctl.rebalance_now()
        return before, seen, rec, await ctl.status()

    before, seen, rec, after = asyncio.run(go())
    assert isinstance(after, ControllerStatus)
    assert [w.health for w in before.workers] == ["not seen"] * TOPO.num_gpus and before.last_rebalance is None
    assert [w.health for w in seen.workers] == ["ok"] * TOPO.num_gpus
    assert rec["action"] == "committed"
    assert after.epoch == rec["epoch"] and after.rebalances == 1
    assert after.last_rebalance.epoch == rec["epoch"] and after.last_rebalance.moved == rec["moved"] > 0
    assert after.swap.done and after.swap.batches == rec["batches"] and after.swap.epoch == rec["epoch"]
    assert after.transfer_batches == rec["batches"] and after.missing == after.off_map == [] and after.rejected == {}
    assert asyncio.run(ctl.report()) == asyncio.run(ctl.status())  # one call under two names
    back = ControllerStatus.model_validate_json(after.model_dump_json())  # JSON round trip, no tensors
    assert back == after and json.loads(after.model_dump_json())["epoch"] == rec["epoch"]
    assert not any(isinstance(v, torch.Tensor) for v in _leaves(after.model_dump()))
    text = "\n".join(after.lines())
    assert f"epoch {rec['epoch']}" in text and "last rebalance" in text and text.count("rank ") == TOPO.num_gpus


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_plan_only_predicts_without_applying():
    ctl, workers, _ = make()

    async def go():
        assert (await ctl.plan_only())["action"] == "no_load"
        _skewed(workers)
        await ctl.telemetry()
        plan = await ctl.plan_only()
        return plan, await ctl.rebalance_now()

    phy_before = ctl.placement.phy2log.clone()
    # Plan, then the same forced rebalance on the same forecast: the plan is what gets applied.
    plan, rec = asyncio.run(go())
    assert plan["action"] == "plan" and plan["from_epoch"] == 0
    assert plan["predicted_after"] > plan["predicted_before"] and plan["gain"] == pytest.approx(
        plan["predicted_after"] - plan["predicted_before"])
    assert plan["moved"] == sum(plan["moved_per_layer"]) > 0 and plan["would_apply"]
    assert torch.equal(torch.tensor(plan["phy2log"]), ctl.placement.phy2log)
    assert rec["moved"] == plan["moved"] and rec["predicted_after"] == pytest.approx(plan["predicted_after"])
    assert not torch.equal(phy_before, ctl.placement.phy2log)
    json.dumps(plan)  # JSON as it is


def test_observe_round_exports_views_and_keeps_loads():
    ctl, workers, _ = make(QUIET)
    ctl.metrics = rec_metrics = Recorder()

    async def go():
        _skewed(workers)
        r1 = await ctl.step()
        ctl.observe_round(r1)
        r2 = await ctl.rebalance_now()
        ctl.observe_round(r2)
        return r2

    r2 = asyncio.run(go())
    layers = {k[1][0][1]: v for k, v in rec_metrics.values.items() if k[0] == "eplb_layer_balancedness"}
    ranks = {k[1][0][1]: v for k, v in rec_metrics.values.items() if k[0] == "eplb_rank_load"}
    assert sorted(layers) == ["0", "1"] and all(0 < v <= 1 for v in layers.values())
    assert sorted(ranks) == [str(r) for r in range(TOPO.num_gpus)]
    assert sum(ranks.values()) == pytest.approx(float(ctl.window_load().sum()))
    assert rec_metrics.values[("eplb_swap_progress", ())] == 1.0
    timeline = asyncio.run(ctl.timeline())
    assert [s["epoch"] for s in timeline] == [0, r2["epoch"]] and timeline[1]["action"] == "committed"
    (loads,) = asyncio.run(ctl.rebalance_loads())
    before, after = torch.tensor(loads["before"]), torch.tensor(loads["after"])  # [L, G]
    assert before.shape == after.shape == (TOPO.num_layers, TOPO.num_gpus)
    assert loads["from_epoch"] == 0 and loads["epoch"] == r2["epoch"]
    assert float(after.max(1).values.sum()) < float(before.max(1).values.sum())  # the peak fell
    assert float(after.sum()) == pytest.approx(float(before.sum()))  # same tokens, placed differently


def test_plots_write_pngs(tmp_path):
    from ray_eplb.controller.cli.plots import history_figure, write_plots

    timeline = [{"time": 100.0 + i, "balancedness_now": 0.5 + 0.04 * i, "epoch": int(i > 4)} for i in range(10)]
    hist = [{"action": "committed", "time": 104.5, "epoch": 1, "bytes_moved": 3 * 2**20}]
    loads = [{"epoch": 1, "from_epoch": 0, "before": [[4, 1], [3, 1]], "after": [[2.5, 2.5], [2, 2]]}]
    path = history_figure(timeline, hist, loads, tmp_path / "h.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    written = write_plots(tmp_path / "out", timeline, hist, loads)
    assert [Path(p).name for p in written] == ["balancedness.png", "gpu_load_heatmap.png"]
    assert write_plots(tmp_path / "none", timeline, [], []) == [str(tmp_path / "none" / "balancedness.png")]


def test_cli_settings_and_config_files(tmp_path):
    assert ops.parse_settings(["max_moves=8", "min_gain=0.05", "forecast=ema:0.3", "max_moves=null"]) == {
        "max_moves": None, "min_gain": 0.05, "forecast": "ema:0.3"}
    with pytest.raises(ValueError, match="'oops'"):
        ops.parse_settings(["oops"])
    (tmp_path / "c.json").write_text(json.dumps({"interval_s": 3.0, "max_moves": 0.25}))
    (tmp_path / "c.yaml").write_text("interval_s: 3.0\nmax_moves: 4\n")
    cfg = ops.load_config(str(tmp_path / "c.json"), ["min_gain=0.2"])
    assert (cfg.interval_s, cfg.max_moves, cfg.min_gain) == (3.0, 0.25, 0.2)
    assert ops.load_config(str(tmp_path / "c.yaml"), []).max_moves == 4
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        ops.load_config(str(tmp_path / "bad.json"), [])
    with pytest.raises(ValueError, match="interval_s"):
        ops.load_config(None, ["interval_s=-1"])


def test_cli_bad_input_exits_2_before_ray(capsys):
    # Each fails on its arguments: one line on stderr, exit code 2, no cluster needed (unit tests forbid Ray).
    cases = [["start", "--weights", "synthetic:16"], ["start", "--weights", "nowhere:1"],
             ["start", "--set", "interval_s=0"], ["start", "--weights", "synthetic:8:8"],
             ["history", "--plot", "h.jpg"], ["config", "set"], ["grafana", "extra"], ["rebalance", "--bogus"]]
    for argv in cases:
        code = getattr(ops, argv[0])(argv[1:])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.strip(), argv
    assert all(cmd in COMMANDS for cmd in ("start", "status", "history", "rebalance", "config", "stop", "grafana"))


def test_grafana_dashboard_covers_the_catalogue_exactly(capsys):
    from ray_eplb.controller.cli.main import main

    assert main(["grafana"]) == 0
    dash = json.loads(capsys.readouterr().out)
    assert dash == json.loads(DASHBOARD.read_text())
    names = re.compile(r"\bray_(eplb_[a-z_]+?)(?:_bucket|_sum|_count)?\b(?=[{\[)\s])")
    by_panel = []
    for panel in dash["panels"]:
        assert panel["datasource"] == "${datasource}"
        found = {m for t in panel["targets"] for m in names.findall(t["expr"])}
        assert found and found <= set(DESCRIPTIONS), (panel["title"], found)
        for t in panel["targets"]:
            assert 'balancer=~"$Balancer"' in t["expr"]  # the instance filter on every query
            if KINDS[next(iter(found))] == "histogram":
                assert "_bucket{" in t["expr"] and "histogram_quantile" in t["expr"]
        by_panel.append(found)
    assert sorted(m for f in by_panel for m in f) == sorted(DESCRIPTIONS)  # one panel per metric, every metric
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "SessionName", "Balancer"} <= variables
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dash["panels"]]
    assert len(set(boxes)) == len(boxes)  # no two panels on top of each other


def test_weight_specs(tmp_path):
    from ray_eplb.actors import SafetensorsWeightSource, SyntheticWeightSource, write_checkpoint
    from ray_eplb.controller.service import weight_source

    src, layers, experts = weight_source("synthetic:16:32:7")
    assert isinstance(src, SyntheticWeightSource) and (src.hidden_size, src.ffn_size) == (16, 32)
    assert (layers, experts) == (None, None)
    assert torch.equal(src.expert(1, 2), SyntheticWeightSource(16, 32, seed=7).expert(1, 2))
    path = write_checkpoint(tmp_path / "w.safetensors", SyntheticWeightSource(8, 8), 1, 2)
    assert isinstance(weight_source(str(path))[0], SafetensorsWeightSource)
    for bad, why in [("synthetic:16", "HIDDEN:FFN"), ("synthetic:a:b", "integers"), ("synthetic:0:8", "positive"),
                     (f"hf:{tmp_path}", "config.json"), ("nowhere", "expected")]:
        with pytest.raises(ValueError, match=why):
            weight_source(bad)


def test_connect_fails_fast_where_nothing_listens():
    import socket
    import time

    from ray_eplb.controller.service import NoBalancer, _probe

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(NoBalancer, match=f"no Ray cluster at 127.0.0.1:{port}"):
            _probe(f"127.0.0.1:{port}")
        assert time.monotonic() - t0 < 3
    _probe("auto")  # left to Ray
    _probe(None)


def test_ray_metrics_catalogue_tags_and_zeroes(monkeypatch):
    """RayMetrics over stand-ins for ray.util.metrics: one metric per catalogue entry, of its kind,
    tagged with the balancer; every gauge and counter series recorded at 0 by register()."""
    import ray.util.metrics as ray_metrics

    from ray_eplb.controller.metrics import RayMetrics

    made, points = {}, []

    class Fake:
        def __init__(self, name, description="", tag_keys=(), boundaries=None):
            self.kind, self.name, self.tag_keys, self.default = type(self).__name__.lower(), name, tag_keys, {}
            assert description and (boundaries is None) == (self.kind != "histogram")
            made[name] = self

        def set_default_tags(self, tags):
            self.default = tags

        def _point(self, how, value, tags):
            final = {**self.default, **(tags or {})}
            assert set(final) == set(self.tag_keys), (self.name, final)  # Ray refuses a missing tag
            points.append((self.name, how, value, tuple(sorted(final.items()))))

        def set(self, value, tags=None):
            self._point("set", value, tags)

        def inc(self, value, tags=None):
            assert value > 0  # as Ray's Counter.inc
            self._point("inc", value, tags)

        def _record(self, value, tags=None):
            self._point("record", value, tags)

        def observe(self, value, tags=None):
            self._point("observe", value, tags)

    for kind in ("Gauge", "Counter", "Histogram"):
        monkeypatch.setattr(ray_metrics, kind, type(kind, (Fake,), {}))
    m = RayMetrics("team_a")
    assert {n: f.kind for n, f in made.items()} == KINDS
    assert all(f.default == {"balancer": "team_a"} and f.tag_keys[0] == "balancer" for f in made.values())
    m.register(num_layers=3, num_ranks=2)
    zeros = {(n, how, tags) for n, how, v, tags in points if v == 0}
    assert {n for n, *_ in zeros} == {n for n, k in KINDS.items() if k != "histogram"}
    assert sum(n == "eplb_layer_balancedness" for n, *_ in zeros) == 3
    assert sum(n == "eplb_rank_load" for n, *_ in zeros) == 2
    assert ("eplb_aborts_total", "record", (("balancer", "team_a"),)) in zeros
    points.clear()
    m.gauge("eplb_solve_seconds", 0.5)  # a histogram: the value is an observation
    m.gauge("eplb_phase_seconds", 0.1, {"phase": "collect"})
    m.count("eplb_aborts_total")
    assert [(n, how) for n, how, *_ in points] == [("eplb_solve_seconds", "observe"), ("eplb_phase_seconds", "observe"),
                                                  ("eplb_aborts_total", "inc")]


def test_an_aborted_swap_is_reported_over_with_its_reason():
    from ray_eplb.controller.config import ControllerConfig as Config

    # One expert per rank and batch: the skewed plan from scratch needs several batches; rank 2 stalls the second.
    ctl, workers, handles = make(Config(**{**QUIET.model_dump(), "transfer_batch_bytes": 1}))
    _skewed(workers)
    calls = {"n": 0}
    real = handles[2].worker.prepare

    def slow_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            import time

            time.sleep(1.0)  # past prepare_timeout_s=0.5
        return real(*args)

    handles[2].worker.prepare = slow_second
    rec = asyncio.run(ctl.rebalance_now(fresh=True))  # a plan from scratch: many moves, so many batches
    st = asyncio.run(ctl.report())
    assert rec["action"] == "aborted" and rec["batches"] >= 2
    assert st.swap is not None and st.swap.done and st.swap.epoch == rec["epoch"]
    assert 1 <= st.swap.batch < st.swap.batches == rec["batches"]  # it stopped part way
    assert st.aborts == 1 and st.last_abort.startswith(f"epoch {rec['epoch']} in prepare") and st.epoch == 0
    assert not any("swap to epoch" in line for line in st.lines())


def test_browser_check_ends_chromium_and_its_children_and_removes_the_profile(tmp_path, monkeypatch):
    """A stand-in 'chromium' that forks a helper writing into the profile and exits without a
    DevTools endpoint: the check fails with RuntimeError, the helper is ended, the profile is gone."""
    import os
    import stat
    import sys
    import time

    from ray_eplb.controller.cli.dashboard import browser_check

    pidfile = tmp_path / "helper.pid"
    fake = tmp_path / "bin" / "chromium"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import subprocess, sys
profile = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--user-data-dir="))
assert "--remote-debugging-port=0" in sys.argv
helper = subprocess.Popen([sys.executable, "-c",
    "import os, sys, time\\nwhile True:\\n    open(os.path.join(sys.argv[1], str(time.monotonic_ns())), 'w').close()\\n    time.sleep(0.01)",
    profile])
open({str(pidfile)!r}, "w").write(str(helper.pid))
import time; time.sleep(0.5)
sys.exit(3)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # pick up TMPDIR
    with pytest.raises(RuntimeError, match="exited with 3"):
        browser_check("127.0.0.1:1", timeout_s=20)
    helper = int(pidfile.read_text())

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(helper)
    assert list((tmp_path / "t").iterdir()) == []  # the profile folder is gone
