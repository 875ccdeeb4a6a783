"""Faults injected into a live runtime on a real local Ray cluster, one after the other: the
controller, workers, or both killed idle, in prepare or in commit; lying telemetry; forged, stale
and future maps. A router thread dispatches all the while and every output is checked token by
token against the dense reference; each case ends with one map (epoch and digest) on every rank and
the controller, every slot holding its expert's weights, and a round that commits.

Its own namespace and CPU-sliver ranks, so it runs beside the other tests' runtime.
"""
import sys
import time

import pytest
import ray.cloudpickle
import torch

from ray_eplb.actors.ray_worker import RayExpertWorker
from ray_eplb.topology import Placement, Topology

pytestmark = pytest.mark.timeout(240)

NAMESPACE = "ray_eplb_faults"
TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
HIDDEN = 16
CONVERGE_S = 30.0  # after the last actor of a restart is back: one map everywhere within this


class LyingWorker(RayExpertWorker):
    """A worker whose telemetry can be told to lie (``lie(kind)``), for the validation checks."""

    lie_kind = None

    def lie(self, kind):
        self.lie_kind = kind

    def collect(self):
        import numpy as np

        reply = super().collect()
        if self.lie_kind == "negative":
            counts = np.frombuffer(reply["counts"], dtype=np.int64).copy()
            counts[0] = -970
            reply["counts"] = counts.tobytes()
        elif self.lie_kind == "nan_bytes":
            reply["counts"] = np.full(len(reply["counts"]) // 8, np.nan).tobytes()
        elif self.lie_kind == "shape":
            reply["shape"] = (1, 2, 3)
        return reply


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module


@pytest.fixture(scope="module")
def rt(ray_session):
    from ray_eplb.actors import Router, SyntheticWeightSource, launch_workers
    from ray_eplb.controller import ControllerConfig, start_controller
    from ray_eplb.controller.bench.reference import DenseMoE

    source = SyntheticWeightSource(hidden_size=HIDDEN, ffn_size=32, seed=9)
    placement = Placement.identity(TOPO)
    group = launch_workers(TOPO, placement, source, device="cpu", namespace=NAMESPACE, resource="CPU",
                           worker_cls=LyingWorker)
    cfg = ControllerConfig(interval_s=1.0, collect_timeout_s=0.5, prepare_timeout_s=6.0, commit_timeout_s=4.0,
                           release_timeout_s=5.0, drift_threshold=0.05, min_gain=0.0, trigger="drift")  # rounds: forced
    ctl = start_controller(TOPO, cfg, placement, namespace=NAMESPACE)  # its loop runs
    router = Router(group.handles, controller=ctl, timeout_s=150.0)

    class Rt:
        pass

    r = Rt()
    r.workers, r.controller, r.router, r.group = group.handles, ctl, router, group
    r.dense = DenseMoE(source, TOPO.num_layers, TOPO.num_experts)
    yield r
    router.close()
    ray.get(ctl.stop.remote())
    for h in [ctl, *group.handles]:
        ray.kill(h, no_restart=True)


class Traffic:
    """Live dispatches through the router, checked against the dense reference, while a fault happens."""

    def __init__(self, rt, seed):
        from ray_eplb.controller.bench.runtime import DispatchLoad

        self.load = DispatchLoad(rt.router, rt.dense, TOPO.num_layers, TOPO.num_experts, HIDDEN, 32, top_k=2, seed=seed)

    def __enter__(self):
        self.load.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.load.stop()  # raises if a dispatch failed (e.g. a rank never came back)
        assert self.load.mismatched == 0, f"{self.load.mismatched} tokens computed with a wrong expert"
        assert len(self.load.log) > 0


def status(rt):
    return ray.get(rt.controller.status.remote(), timeout=30)


def answer(handle, method="state", timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(handle, method).remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, f"{handle} did not come back"
            time.sleep(0.5)


def consistent(rt, timeout_s=CONVERGE_S):
    """Seconds until the controller and every worker hold one map (epoch and digest)."""
    t0 = time.monotonic()
    while True:
        st = status(rt)
        maps = {(s["epoch"], s["digest"]) for s in ray.get([w.state.remote() for w in rt.workers], timeout=30)}
        if maps == {(st.epoch, st.digest)}:
            assert ray.get([w.verify.remote() for w in rt.workers], timeout=60) == [[]] * TOPO.num_gpus
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"not one map after {timeout_s} s: controller {st.epoch}, workers {maps}"
        time.sleep(0.5)


def skew_and_commit(rt, seed):
    """Make the load skewed enough to move, then force a round; returns its record (must commit)."""
    gen = torch.Generator().manual_seed(seed)
    hot = torch.randperm(TOPO.num_experts, generator=gen)[:2]
    for _attempt in range(2):
        for _ in range(6):
            x = torch.randn(48, HIDDEN, generator=gen)
            ids = torch.stack([hot[torch.randint(0, 2, (48,), generator=gen)], torch.randint(0, 8, (48,), generator=gen)], 1)
            ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 8, ids[:, 1])
            for layer in range(TOPO.num_layers):
                rt.router.dispatch(layer, x, ids, torch.full((48, 2), 0.5))
        rec = ray.get(rt.controller.rebalance_now.remote(fresh=True), timeout=120)
        # A controller that has just restarted may not have counted a round with tokens yet (its first
        # rounds bring the ranks back onto one map); then it says so, and more load is sent once.
        if rec.get("why") != "no load seen yet":
            break
    assert rec["action"] == "committed", {k: v for k, v in rec.items() if k != "time"}
    return rec


def kill(*handles):
    for h in handles:
        ray.kill(h, no_restart=False)


def restarted(worker, before, timeout_s=90.0):
    """The state of ``worker`` once a new incarnation (not ``before``) answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = answer(worker, timeout_s=timeout_s)
        if st["incarnation"] != before:
            return st
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.3)


def incarnations(rt):
    return [s["incarnation"] for s in ray.get([w.state.remote() for w in rt.workers], timeout=60)]


def controller_back(rt, killed_at, loop="running", timeout_s=90.0):
    """The restarted controller's status once it is up (a new incarnation) with its loop as stored."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            st = status(rt)
            if st.started > killed_at and st.loop == loop:
                return st
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the controller did not come back with its loop"
        time.sleep(0.3)


def changed_map(rt):
    """An explicit new map: half of each layer's slots swapped between ranks."""
    from ray_eplb.controller.bench.runtime import swap_target

    return swap_target(ray.get(rt.controller.current_map.remote(), timeout=30).phy2log, TOPO.slots_per_gpu, 0.5, seed=int(time.time()) % 1000)


def until_committed_on(worker, epoch, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while ray.get(worker.state.remote())["epoch"] <= epoch:
        assert time.monotonic() < deadline, "the round never reached its commit"
        time.sleep(0.02)


def test_controller_killed_idle_comes_back_on_its_map_with_its_loop(rt):
    with Traffic(rt, 1):
        first = skew_and_commit(rt, 1)
        before = status(rt)
        assert before.loop == "running"
        killed = time.time()
        kill(rt.controller)
        after = controller_back(rt, killed)
        assert (after.epoch, after.digest) == (before.epoch, before.digest)
        consistent(rt)
        again = skew_and_commit(rt, 2)
        assert again["epoch"] > first["epoch"]


@pytest.mark.parametrize("phase", ["prepare", "commit"])
def test_controller_killed_mid_round(rt, phase):
    with Traffic(rt, 10):
        before = status(rt)
        slow = rt.workers[1]
        ray.get(slow.inject_delay.remote(phase, 2.0))
        try:
            pending = rt.controller.apply_placement.remote(changed_map(rt))
            if phase == "prepare":
                time.sleep(0.7)  # the others have prepared; rank 1 is still at it
            else:
                until_committed_on(rt.workers[0], before.epoch)  # rank 0 committed, rank 1 not yet
            killed = time.time()
            kill(rt.controller)
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(pending, timeout=60)
        finally:
            ray.get(slow.inject_delay.remote(phase, 0.0))
        after = controller_back(rt, killed)
        took = consistent(rt)
        after = status(rt)
        # cut in prepare: the committed map stays; cut in commit: the prepared map is rolled forward
        assert after.epoch == before.epoch if phase == "prepare" else after.epoch > before.epoch
        assert took < CONVERGE_S
        rec = ray.get(rt.controller.apply_placement.remote(changed_map(rt)), timeout=120)
        assert rec["action"] == "committed" and rec["epoch"] > after.epoch, rec
        consistent(rt)


@pytest.mark.parametrize("victims", [[2], [0, 3]])
def test_workers_killed(rt, victims):
    with Traffic(rt, 20):
        skew_and_commit(rt, 20)
        before, lives = status(rt), incarnations(rt)
        kill(*[rt.workers[r] for r in victims])
        for r in victims:
            assert restarted(rt.workers[r], lives[r])["restored"] == "store"
        consistent(rt)
        assert status(rt).epoch == before.epoch  # they came back on the committed map itself
        skew_and_commit(rt, 21)


def test_worker_killed_in_commit(rt):
    with Traffic(rt, 30):
        before, lives = status(rt), incarnations(rt)
        ray.get(rt.workers[3].inject_delay.remote("commit", 2.0))
        pending = rt.controller.apply_placement.remote(changed_map(rt))
        until_committed_on(rt.workers[0], before.epoch)
        kill(rt.workers[3])
        rec = ray.get(pending, timeout=120)
        assert rec["action"] == "aborted" and rec["phase"] == "commit", rec
        assert restarted(rt.workers[3], lives[3])["restored"] == "store"
        consistent(rt)
        assert status(rt).epoch == before.epoch  # every rank back on the committed map
        skew_and_commit(rt, 31)


def test_controller_and_one_worker_killed_together(rt):
    with Traffic(rt, 40):
        skew_and_commit(rt, 40)
        before = status(rt)
        killed, lives = time.time(), incarnations(rt)
        kill(rt.controller, rt.workers[1])
        controller_back(rt, killed)
        restarted(rt.workers[1], lives[1])
        consistent(rt)
        after = status(rt)
        assert (after.epoch, after.digest) == (before.epoch, before.digest) and after.loop == "running"
        assert skew_and_commit(rt, 41)["epoch"] > before.epoch


def test_controller_and_every_worker_killed_together(rt):
    with Traffic(rt, 50):
        first = skew_and_commit(rt, 50)
        before = status(rt)
        killed, lives = time.time(), incarnations(rt)
        kill(rt.controller, *rt.workers)
        controller_back(rt, killed)
        for w, life in zip(rt.workers, lives):
            assert restarted(w, life)["restored"] == "store"
        took = consistent(rt)
        after = status(rt)
        # the committed map itself, under its own number; nothing renumbered to an old number
        assert (after.epoch, after.digest) == (before.epoch, before.digest), (took, after.recovery)
        rec = skew_and_commit(rt, 51)
        assert rec["epoch"] > first["epoch"]


def test_forged_stale_and_future_maps_are_refused_and_the_router_recovers(rt):
    from ray_eplb.actors import Router

    p = ray.get(rt.controller.current_map.remote())
    forged = Placement.from_phy2log(TOPO, p.phy2log.roll(1, dims=1), p.epoch)  # the epoch in force, other slots
    future = Placement.from_phy2log(TOPO, p.phy2log.roll(2, dims=1), p.epoch + 100)
    stale = Placement.identity(TOPO)  # epoch 0, long released
    for bad in (forged, future, stale):
        router = Router(rt.workers, placement=bad, controller=rt.controller, subscribe=False, timeout_s=60)
        try:
            refused_before = sum(s["stale_dispatches"] for s in ray.get([w.state.remote() for w in rt.workers]))
            load = Traffic(rt, 60)
            load.load.router = router
            with load:
                time.sleep(1.0)
            refused = sum(s["stale_dispatches"] for s in ray.get([w.state.remote() for w in rt.workers])) - refused_before
            now = ray.get(rt.controller.current_map.remote())
            assert refused > 0 and router.map_id == now.map_id()
        finally:
            router.close()


@pytest.mark.parametrize("kind", ["negative", "nan_bytes", "shape"])
def test_lying_telemetry_is_left_out_and_named(rt, kind):
    with Traffic(rt, 70):
        ray.get(rt.workers[2].lie.remote(kind))
        try:
            time.sleep(2.5)  # two rounds of the loop
            st = status(rt)
        finally:
            ray.get(rt.workers[2].lie.remote(None))
        assert 2 in st.rejected and any("rank 2" in e for e in st.errors), st.rejected
        assert st.balancedness_now is None or 0 < st.balancedness_now <= 1
        consistent(rt)
