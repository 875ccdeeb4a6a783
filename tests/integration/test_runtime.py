"""The runtime on a real local Ray cluster: telemetry, forced rebalance, swap under load, faults, stale epochs."""
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.timeout(120)


def skewed_batch(n=64, hot=(0, 1), top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(8, generator=gen)[:top_k] for _ in range(n)])  # [N, K]
    ids[: 3 * n // 4, 0] = hot[0]
    ids[: 3 * n // 4, 1] = hot[1]
    return torch.randn(n, 16, generator=gen), ids, torch.full((n, top_k), 1.0 / top_k)


def drive(rt, batches=4, seed=0):
    from ray_eplb.controller.bench.reference import mismatched

    bad = 0
    for b in range(batches):
        x, ids, w = skewed_batch(seed=seed + b)
        for layer in range(rt.topology.num_layers):
            bad += int(mismatched(rt.router.dispatch(layer, x, ids, w), rt.dense(layer, x, ids, w)).sum())
    return bad


def until_back(worker, timeout_s=60.0):
    """The state of a worker Ray is restarting, once it answers (calls fail fast meanwhile)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(worker.state.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.5)


def states(rt):
    import ray

    return ray.get([w.state.remote() for w in rt.workers])


def test_workers_and_controller_are_named_and_placed(runtime):
    import ray

    from ray_eplb.actors.ray_worker import NAMESPACE

    for rank in range(runtime.topology.num_gpus):
        h = ray.get_actor(f"ray_eplb_worker_{rank}", namespace=NAMESPACE)
        assert ray.get(h.ping.remote()) == rank
    ctl = ray.get_actor("ray_eplb_controller", namespace=NAMESPACE)
    st = ray.get(ctl.status.remote())
    assert st.epoch == runtime.router.placement.epoch
    assert {s["device"] for s in states(runtime)} == {"cpu"}


def test_telemetry_aggregation_is_exact(runtime):
    import ray

    ray.get(runtime.controller.telemetry.remote())  # drain what earlier tests routed
    want = torch.zeros(runtime.topology.num_layers, 8, dtype=torch.float64)
    for b in range(3):
        x, ids, w = skewed_batch(n=40, seed=100 + b)
        for layer in range(runtime.topology.num_layers):
            runtime.router.dispatch(layer, x, ids, w)
            want[layer] += torch.bincount(ids.reshape(-1), minlength=8).double()
    got = ray.get(runtime.controller.telemetry.remote())
    assert torch.equal(got, want)


def test_forced_rebalance_moves_weights_and_every_slot_holds_its_expert(runtime):
    import ray

    assert drive(runtime, seed=10) == 0
    before = states(runtime)[0]["epoch"]
    rec = ray.get(runtime.controller.rebalance_now.remote())
    assert rec["action"] == "committed", rec
    assert rec["epoch"] > before and rec["moved"] > 0
    st = ray.get(runtime.controller.current_map.remote())
    assert st.epoch == rec["epoch"] and all(s["epoch"] == rec["epoch"] for s in states(runtime))
    assert torch.equal(torch.cat([s["experts"] for s in states(runtime)], 1), st.phy2log)
    assert int(st.phy2log[0].eq(0).sum()) > 1  # the hot expert has replicas now
    assert ray.get([w.verify.remote() for w in runtime.workers]) == [[]] * runtime.topology.num_gpus
    # cpu workers keep what peers sent in the object store (zero-copy) and serve from it
    after = states(runtime)
    assert sum(s["borrowed_total"] for s in after) > 0 and sum(s["borrowed_bytes"] for s in after) > 0
    table = runtime.topology.num_layers * runtime.topology.slots_per_gpu * after[0]["expert_bytes"]
    share = 0.5 * 512 * 2**20 / runtime.topology.gpus_per_node  # the test cluster's object store: 512 MiB
    assert all(0 < s["borrowed_bytes"] <= s["borrow_cap"] == min(table, int(share)) for s in after if s["borrowed_bytes"])
    assert drive(runtime, seed=20) == 0
    assert runtime.router.placement.epoch == rec["epoch"]


def test_workers_unmap_object_store_pages_no_table_uses_and_still_serve_exactly(runtime):
    """After a swap and the release of the old epoch, a worker's RSS holds of the object store only
    the weights it serves from there (borrowed replies): what it copied, and what it wrote for
    peers, is unmapped; and serving afterwards is still exact."""
    import ray

    rec = ray.get(runtime.controller.rebalance_now.remote(fresh=True))
    assert rec["action"] == "committed" and rec["moved"] > 0, rec
    ray.get([w.release.remote(rec["epoch"] - 1) for w in runtime.workers])
    mem = ray.get([w.memory.remote() for w in runtime.workers])
    after = states(runtime)
    assert all(m["store_pages_released"] > 0 for m in mem), mem
    page_slack = 2 * 4096 * runtime.topology.num_layers * runtime.topology.slots_per_gpu  # rounding per tensor
    for m, s in zip(mem, after):
        assert m["store_resident"] <= s["borrowed_bytes"] + page_slack, (m, s)
    assert drive(runtime, seed=30) == 0
    assert ray.get([w.verify.remote() for w in runtime.workers]) == [[]] * runtime.topology.num_gpus


def test_tokens_routed_during_swaps_all_match_the_dense_reference(runtime):
    import ray

    from ray_eplb.actors.router import Router
    from ray_eplb.controller.bench.runtime import DispatchLoad, swap_target

    # A second subscriber, shared by two dispatching threads (a Serve replica's thread pool does that).
    router = Router(runtime.workers, controller=runtime.controller)
    loads = [DispatchLoad(router, runtime.dense, runtime.topology.num_layers, 8, 16, batch=32, top_k=2, seed=s).start()
             for s in (11, 12)]
    recs = []
    try:
        time.sleep(0.5)
        for i in range(3):
            phy = ray.get(runtime.controller.current_map.remote()).phy2log
            recs.append(ray.get(runtime.controller.apply_placement.remote(swap_target(phy, 3, 0.5, seed=i))))
            time.sleep(0.3)
    finally:
        for load in loads:
            load.stop()
        router.close()
    assert [r["action"] for r in recs] == ["committed"] * 3
    assert router.map_updates >= 1 and all(len(load.log) > 5 for load in loads)
    epochs = {r["epoch"] for r in recs}
    assert router.placement.epoch in epochs or router.placement.epoch > max(epochs)
    assert [load.mismatched for load in loads] == [0, 0]
    assert int(router.rank_tokens.sum()) == 2 * sum(n for load in loads for _, _, n in load.log)  # top_k=2


def test_a_worker_missing_the_prepare_deadline_aborts_the_round_on_every_worker(runtime):
    import ray

    drive(runtime, seed=30)
    before = [s["epoch"] for s in states(runtime)]
    ray.get(runtime.workers[1].inject_delay.remote("prepare", 3.0))
    try:
        t0 = time.monotonic()
        rec = ray.get(runtime.controller.apply_placement.remote(
            ray.get(runtime.controller.current_map.remote()).phy2log.roll(1, dims=1)))
        assert time.monotonic() - t0 < 2.0 + 2.0  # the prepare deadline plus the abort round
    finally:
        ray.get(runtime.workers[1].inject_delay.remote("prepare", 0.0))
    assert rec["action"] == "aborted" and rec["phase"] == "prepare" and 1 in rec["failures"]
    assert [s["epoch"] for s in states(runtime)] == before
    time.sleep(1.5)  # the late prepare lands now, after the abort: it must be refused
    after = states(runtime)
    assert [s["epoch"] for s in after] == before and all(s["staged"] is None for s in after)
    assert drive(runtime, seed=40) == 0
    assert ray.get(runtime.controller.rebalance_now.remote())["action"] in ("committed", "no_change")


def test_stale_epochs_are_ignored_and_a_stale_router_reroutes(runtime):
    import ray

    from ray_eplb.actors import StaleEpochError
    from ray_eplb.actors.router import Router

    old = runtime.router.placement
    drive(runtime, seed=50)
    rec = ray.get(runtime.controller.apply_placement.remote(old.phy2log.roll(3, dims=1)))
    assert rec["action"] == "committed"
    w = runtime.workers[0]
    new = ray.get(w.state.remote())
    assert ray.get(w.prepare.remote(old.epoch, [], old.rank_experts(0)))["status"] == "stale"
    assert ray.get(w.commit.remote(old.epoch))["status"] == "stale"
    assert ray.get(w.commit.remote(new["epoch"])).get("duplicate")
    ray.get([h.release.remote(old.epoch) for h in runtime.workers])
    with pytest.raises(StaleEpochError):
        ray.get(w.forward.remote(old.epoch, 0, torch.tensor([0]), torch.randn(1, 16)))
    from ray_eplb.controller.bench.reference import mismatched

    # A router that does not subscribe keeps the old map until a worker answers StaleEpochError.
    stale = Router(runtime.workers, placement=old, controller=runtime.controller, subscribe=False)
    x, ids, wts = skewed_batch(seed=60)
    y = stale.dispatch(1, x, ids, wts)
    assert stale.retries >= 1 and stale.placement.epoch == rec["epoch"]
    assert int(mismatched(y, runtime.dense(1, x, ids, wts)).sum()) == 0


def test_controller_loop_runs_rounds_and_stops(runtime):
    import ray

    ctl = runtime.controller
    errors_before = ray.get(ctl.status.remote()).errors
    assert ray.get(ctl.start.remote()) in ("running", "idle")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            drive(runtime, batches=1, seed=70)

    t = threading.Thread(target=serve)
    t.start()
    try:
        r0 = ray.get(ctl.status.remote()).rounds
        time.sleep(2.5)
        st = ray.get(ctl.status.remote())
        assert st.loop == "running" and st.rounds >= r0 + 2
    finally:
        stop.set()
        t.join()
        assert ray.get(ctl.stop.remote()) == "stopped"
    assert ray.get(ctl.status.remote()).errors == errors_before


def test_controller_restarts_and_recovers_the_committed_placement(runtime):
    import ray

    ctl = runtime.controller
    drive(runtime, seed=80)
    rec = ray.get(ctl.rebalance_now.remote())
    epoch = ray.get(ctl.status.remote()).epoch
    assert epoch > 0, rec
    killed = time.time()
    ray.kill(ctl, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            st = ray.get(ctl.status.remote(), timeout=10)
            if st.started > killed:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the controller did not come back"
        time.sleep(0.5)
    assert st.rounds == 0  # a fresh instance...
    assert st.epoch == epoch  # ...that read the committed map back from the store
    assert torch.equal(ray.get(ctl.current_map.remote()).phy2log, torch.cat([s["experts"] for s in states(runtime)], 1))
    assert drive(runtime, seed=90) == 0  # the router's subscription survives the restart
    assert ray.get(ctl.rebalance_now.remote())["action"] in ("committed", "no_change")


def test_a_killed_worker_restarts_on_the_placement_in_force_and_serves_correctly(runtime):
    import ray

    ctl = runtime.controller
    drive(runtime, seed=100)
    assert ray.get(ctl.rebalance_now.remote())["action"] in ("committed", "no_change")
    st = ray.get(ctl.current_map.remote())
    epoch, phy2log = st.epoch, st.phy2log
    assert epoch > 0  # the launch placement is epoch 0: a restart on it would be caught below
    ray.get(ctl.telemetry.remote())  # drain
    victim = runtime.workers[1]
    before = ray.get(victim.state.remote())
    ray.kill(victim, no_restart=False)
    # The router waits for rank 1 to come back (calls to a restarting actor fail at once); every
    # output is still right.
    assert drive(runtime, seed=110) == 0
    after = until_back(victim)
    assert after["incarnation"] != before["incarnation"] and after["restored"] == "store"
    assert after["epoch"] == epoch and torch.equal(after["experts"], phy2log[:, 3:6])
    assert ray.get(victim.verify.remote()) == []  # every slot holds its expert's weights
    # Telemetry starts the new process's counters from zero: exact, never negative.
    got = ray.get(ctl.telemetry.remote())
    want = torch.zeros_like(got)
    for b in range(2):
        x, ids, w = skewed_batch(n=40, seed=120 + b)
        for layer in range(runtime.topology.num_layers):
            runtime.router.dispatch(layer, x, ids, w)
            want[layer] += torch.bincount(ids.reshape(-1), minlength=8).double()
    assert float(got.min()) >= 0
    assert torch.equal(ray.get(ctl.telemetry.remote()), want)
    rec = ray.get(ctl.rebalance_now.remote(fresh=True))  # and it takes part in the next swap
    assert rec["action"] in ("committed", "no_change"), rec
    assert ray.get([w.verify.remote() for w in runtime.workers]) == [[]] * runtime.topology.num_gpus
    assert drive(runtime, seed=130) == 0


def test_a_worker_killed_mid_swap_aborts_the_round_and_restarts_on_the_old_epoch(runtime):
    import ray

    from ray_eplb.controller.bench.runtime import swap_target

    ctl = runtime.controller
    drive(runtime, seed=140)
    st = ray.get(ctl.current_map.remote())
    epoch, phy2log = st.epoch, st.phy2log
    slow, victim = runtime.workers[0], runtime.workers[2]
    before = ray.get(victim.state.remote())["incarnation"]
    ray.get(slow.inject_delay.remote("prepare", 1.5))  # keeps the round open (deadline 2 s)
    try:
        pending = ctl.apply_placement.remote(swap_target(phy2log, 3, 0.5, seed=7))
        time.sleep(0.5)
        ray.kill(victim, no_restart=False)  # mid-swap
        rec = ray.get(pending, timeout=60)
    finally:
        ray.get(slow.inject_delay.remote("prepare", 0.0))
    assert rec["action"] == "aborted", rec
    # The restarted worker loaded the committed map from the store: the old one (the round aborted).
    after = until_back(victim)
    assert after["incarnation"] != before and after["restored"] == "store" and after["epoch"] == epoch
    assert {s["epoch"] for s in states(runtime)} == {epoch}
    assert torch.equal(torch.cat([s["experts"] for s in states(runtime)], 1), phy2log)
    assert ray.get([w.verify.remote() for w in runtime.workers]) == [[]] * runtime.topology.num_gpus
    assert drive(runtime, seed=150) == 0
    again = ray.get(ctl.apply_placement.remote(swap_target(phy2log, 3, 0.5, seed=7)))
    assert again["action"] == "committed", again  # and the next round goes through
    assert ray.get([w.verify.remote() for w in runtime.workers]) == [[]] * runtime.topology.num_gpus
    assert drive(runtime, seed=160) == 0
