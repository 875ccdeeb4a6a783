"""The controller class without Ray: in-process workers behind handle-like fakes."""
import asyncio
import time

import pytest
import torch
from fakes import SRC, TOPO, make, serve
from pydantic import ValidationError

from ray_eplb.controller.balancer import EplbController
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.transfer import plan_summary, transfer_plan
from ray_eplb.topology import Placement


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValidationError, match="interval_s"):
        ControllerConfig(interval_s=0)
    with pytest.raises(ValidationError, match="collect_timeout_s=3.0"):
        ControllerConfig(interval_s=2.0, collect_timeout_s=3.0)
    with pytest.raises(ValidationError, match="trigger"):
        ControllerConfig(trigger="sometimes")
    with pytest.raises(ValidationError):
        ControllerConfig(bogus=1)


def test_transfer_plan_prefers_local_then_intra_node():
    old = Placement.identity(TOPO)  # layer 0 by rank: r0 [0 1 2] r1 [3 4 5] r2 [6 7 0] r3 [1 2 3]
    new_map = old.phy2log.clone()
    new_map[0, 2] = 0  # rank 0 (holds expert 0 in slot 0): local copy
    new_map[0, 5] = 2  # rank 1 (node 0): expert 2 is on rank 0 (node 0) and rank 3 (node 1)
    new_map[0, 8] = 1  # rank 2 (node 1): expert 1 on rank 0 (node 0) and rank 3 (node 1)
    new_map[0, 9] = 5
    new_map[0, 10] = 5
    new_map[0, 11] = 6  # every expert keeps a slot: [0 1 0 | 3 4 2 | 6 7 1 | 5 5 6]
    new = Placement.from_phy2log(TOPO, new_map)
    moves = {(t.layer, t.dst_slot): t for t in transfer_plan(old, new)}
    assert moves[(0, 2)].src_rank == 0
    assert moves[(0, 5)].src_rank == 0
    assert moves[(0, 8)].src_rank == 3
    summary = plan_summary(list(moves.values()), TOPO)
    assert summary["moves"] == len(moves) == int(old.changed_slots(new).sum())
    assert summary["local"] >= 1 and summary["source"] == 0


def test_telemetry_aggregation_is_exact_across_epochs():
    ctl, workers, _ = make()
    p0 = Placement.identity(TOPO)
    serve(workers, p0, 0, 1, 5)
    serve(workers, p0, 1, 7, 3)
    delta = asyncio.run(ctl.telemetry())
    want = torch.zeros(2, 8, dtype=torch.float64)
    want[0, 1], want[1, 7] = 5, 3
    assert torch.equal(delta, want)
    assert float(asyncio.run(ctl.telemetry()).sum()) == 0  # cumulative counters are diffed
    serve(workers, p0, 0, 2, 4)
    assert float(asyncio.run(ctl.telemetry())[0, 2]) == 4


def test_forced_rebalance_commits_everywhere_and_moves_weights():
    ctl, workers, _ = make()
    p0 = Placement.identity(TOPO)

    async def go():
        for _ in range(3):
            serve(workers, p0, 0, 0, 50)
            serve(workers, p0, 1, 3, 50)
            serve(workers, p0, 1, 5, 1)
        return await ctl.rebalance_now()

    rec = asyncio.run(go())
    assert rec["action"] == "committed", rec
    assert all(w.epoch == rec["epoch"] for w in workers.values())
    assert all(w.verify() == [] for w in workers.values())
    assert torch.equal(torch.cat([w.state()["experts"] for w in workers.values()], 1), ctl.placement.phy2log)
    assert int(ctl.placement.logcnt[0, 0]) > 1  # the hot expert got replicas
    st = asyncio.run(ctl.status())
    assert st.rebalances == 1 and st.experts_moved == rec["moved"] > 0


def test_slow_worker_aborts_round_and_everyone_stays_on_old_epoch():
    ctl, workers, handles = make()
    handles[2].delays["prepare"] = 1.0  # longer than prepare_timeout_s=0.5
    serve(workers, Placement.identity(TOPO), 0, 0, 100)
    t0 = time.monotonic()
    rec = asyncio.run(ctl.rebalance_now())
    assert rec["action"] == "aborted" and rec["phase"] == "prepare" and 2 in rec["failures"]
    assert time.monotonic() - t0 < 1.5
    time.sleep(1.2)  # the late prepare lands after the abort and must be refused
    assert all(w.epoch == 0 and w.state()["staged"] is None for w in workers.values())
    handles[2].delays.clear()
    serve(workers, Placement.identity(TOPO), 0, 0, 100)
    rec2 = asyncio.run(ctl.rebalance_now())
    assert rec2["action"] == "committed" and rec2["epoch"] > rec["epoch"]


def test_stalled_collect_delays_round_by_at_most_its_deadline():
    ctl, workers, handles = make()
    handles[1].delays["collect"] = 5.0
    serve(workers, Placement.identity(TOPO), 0, 4, 7)  # expert 4 lives on rank 1
    serve(workers, Placement.identity(TOPO), 0, 0, 2)  # expert 0 on rank 0
    t0 = time.monotonic()
    asyncio.run(ctl.telemetry())
    assert time.monotonic() - t0 < 0.2 + 0.15
    assert ctl._missing == [1]
    handles[1].delays.clear()
    delta = asyncio.run(ctl.telemetry())
    assert float(delta[0, 4]) == 7  # the missed counts arrive with the next round


def test_no_rebalance_when_gain_is_too_small():
    cfg = ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, trigger="periodic", rebalance_period_s=0.5, min_gain=0.5)
    ctl, workers, _ = make(cfg)
    ctl._last_rebalance -= 10
    for e in range(8):
        serve(workers, Placement.identity(TOPO), 0, e, 10)
        serve(workers, Placement.identity(TOPO), 1, e, 10)
    rec = asyncio.run(ctl.step())
    assert rec["action"] == "skipped" and "min_gain" in rec["why"]
    assert all(w.epoch == 0 for w in workers.values())


def test_wait_map_publishes_and_releases_after_ack():
    ctl, workers, _ = make()

    async def go():
        first = await ctl.wait_map(-1, "r1", 0.1)
        serve(workers, Placement.identity(TOPO), 0, 0, 60)
        waiter = asyncio.ensure_future(ctl.wait_map(first.epoch, "r1", 5.0))
        rec = await ctl.rebalance_now()
        got = await waiter
        assert got.epoch == rec["epoch"] and 0 in ctl._retired
        await ctl.wait_map(got.epoch, "r1", 0.01)  # the router acks the new map
        await asyncio.sleep(0.1)
        return rec

    rec = asyncio.run(go())
    assert all(w.state()["held"] == [rec["epoch"]] for w in workers.values())


def test_loop_runs_and_stops():
    ctl, workers, _ = make()

    async def go():
        await ctl.start()
        await asyncio.sleep(1.2)
        assert (await ctl.status()).loop == "running"
        await ctl.stop()
        return await ctl.status()

    st = asyncio.run(go())
    assert st.loop == "stopped" and st.rounds >= 2 and st.errors == []


def test_a_restarted_controller_takes_the_committed_map_from_the_store():
    ctl, workers, handles = make()
    serve(workers, Placement.identity(TOPO), 0, 0, 60)
    rec = asyncio.run(ctl.rebalance_now())
    fresh = EplbController(TOPO, handles, ctl.config, store=ctl.store, restart=True)  # its memory is gone
    assert asyncio.run(fresh.recover())
    assert fresh.placement.epoch == rec["epoch"]
    assert torch.equal(fresh.placement.phy2log, ctl.placement.phy2log)
    assert fresh._next_epoch > rec["epoch"]


def test_align_keeps_balance_and_never_moves_more():
    from ray_eplb.controller.transfer import align
    from ray_eplb.solver import balancedness
    from ray_eplb.topology import plan

    gen = torch.Generator().manual_seed(0)
    w1 = torch.rand(2, 8, generator=gen) ** 3
    w2 = w1 * (1 + 0.3 * torch.rand(2, 8, generator=gen))
    a, b = plan(TOPO, w1), plan(TOPO, w2)
    c = align(a, b)
    assert int(a.changed_slots(c).sum()) <= int(a.changed_slots(b).sum())
    assert balancedness(c.phy2log, c.logcnt, w2, 4) == pytest.approx(balancedness(b.phy2log, b.logcnt, w2, 4))
    # A placement that only relabels GPUs and slots needs no move at all once aligned.
    perm = a.phy2log.view(2, 2, 2, 3).flip(1).flip(2).flip(3).reshape(2, 12)  # swap nodes, GPUs, slots
    shuffled = Placement.from_phy2log(TOPO, perm.contiguous())
    assert int(a.changed_slots(shuffled).sum()) > 0
    assert int(a.changed_slots(align(a, shuffled)).sum()) == 0


def skew(workers, placement, rounds=3):
    """Route a skewed load: expert 0 hot in both layers."""
    for _ in range(rounds):
        for layer in range(2):
            serve(workers, placement, layer, 0, 100)
            serve(workers, placement, layer, 5, 5)


def test_migration_config_fields_are_validated_with_the_bad_value_named():
    cfg = ControllerConfig(max_moves=0.25, budget_scope="total", min_layer_gain=0.02, forecast="window:3")
    assert (cfg.max_moves, cfg.forecast, cfg.planning) == (0.25, "window:3", "incremental")
    assert ControllerConfig().forecast == "ema:0.5" and isinstance(ControllerConfig(max_moves=1).max_moves, int)
    for bad, match in [
        (dict(max_moves=0), "max_moves=0"), (dict(max_moves=1.5), "max_moves=1.5"), (dict(max_moves="2"), "max_moves"),
        (dict(budget_scope="node"), "budget_scope"), (dict(min_layer_gain=1.0), "min_layer_gain"),
        (dict(forecast="ema:0"), "ema:0"), (dict(forecast="median"), "median"),
        (dict(planning="fresh", max_moves=4), "max_moves=4"), (dict(planning="fresh", min_layer_gain=0.1), "min_layer_gain=0.1"),
        (dict(solver_policy="hierarchical", max_moves=0.5), "hierarchical"), (dict(transfer_batch_bytes=0), "transfer_batch_bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            ControllerConfig(**bad)


def test_solve_passes_the_current_placement_budget_and_hysteresis_to_the_solver(monkeypatch):
    from ray_eplb.controller import planning

    seen = []
    real = planning.plan

    def spy(topology, weight, **kw):
        seen.append(kw)
        return real(topology, weight, **kw)

    monkeypatch.setattr(planning, "plan", spy)
    cfg = ControllerConfig(max_moves=2, budget_scope="total", min_layer_gain=0.05, solver_policy="global")
    current = Placement.identity(TOPO, epoch=3)
    load = torch.rand(2, 8, dtype=torch.float64)
    planning.solve(TOPO, load, current, cfg, epoch=4)
    kw = seen[-1]
    assert torch.equal(kw["old_phy2log"], current.phy2log)
    assert (kw["max_moves"], kw["budget_scope"], kw["min_gain"], kw["policy"], kw["epoch"]) == (2, "total", 0.05, "global", 4)
    planning.solve(TOPO, load, current, cfg, fresh=True)
    assert "old_phy2log" not in seen[-1] and "max_moves" not in seen[-1]
    assert planning.budget_slots(TOPO, cfg) == 2 and planning.budget_slots(TOPO, cfg, fresh=True) is None
    assert planning.budget_slots(TOPO, ControllerConfig(max_moves=0.1)) == 2 * 2  # ceil(0.1 * 12) per layer


def test_a_budgeted_rebalance_never_moves_more_than_the_budget_and_reports_it():
    cfg = ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, max_moves=1, min_gain=0.0)
    ctl, workers, _ = make(cfg)
    p0 = Placement.identity(TOPO)
    skew(workers, p0)
    rec = asyncio.run(ctl.rebalance_now())
    assert rec["action"] == "committed", rec
    changed = p0.changed_slots(ctl.placement)  # [L, R]
    assert changed.sum(1).tolist() == [1, 1]  # one slot per layer: the budget, spent
    assert rec["moved"] == 2 and rec["budget_slots"] == 2 and rec["budget_used"] == 1.0
    assert rec["planning"] == "incremental" and rec["batches"] >= 1
    expert_bytes = SRC.expert(0, 0).numel() * 4
    remote = rec["transfers"]["intra_node"] + rec["transfers"]["inter_node"] + rec["transfers"]["source"]
    assert rec["bytes_moved"] == remote * expert_bytes
    assert all(w.verify() == [] for w in workers.values())
    hist = asyncio.run(ctl.history())[-1]
    assert {k: hist[k] for k in ("moved", "bytes_moved", "batches", "budget_used")} == \
        {k: rec[k] for k in ("moved", "bytes_moved", "batches", "budget_used")}
    st = asyncio.run(ctl.status())
    assert st.bytes_moved == rec["bytes_moved"] and st.last_rebalance.moved == 2 and st.transfer_batches == rec["batches"]
    # A fresh solve ignores the budget.
    skew(workers, ctl.placement)
    fresh = asyncio.run(ctl.rebalance_now(fresh=True))
    assert fresh["planning"] == "fresh" and "budget_slots" not in fresh and fresh["moved"] > 2


def test_the_controller_pushes_a_swap_in_batches_and_seals_every_rank():
    ctl, workers, handles = make(ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, transfer_batch_bytes=1))
    old = Placement.identity(TOPO)  # r0 [0 1 2] r1 [3 4 5] r2 [6 7 0] r3 [1 2 3]
    new_map = old.phy2log.clone()
    new_map[0, 1], new_map[0, 2] = 3, 5  # rank 0 receives two experts, both sent by rank 1: two batches
    new_map[0, 11] = 7  # rank 3 receives expert 7 from rank 2 in the first batch
    rec = asyncio.run(ctl.apply_placement(new_map))
    assert rec["action"] == "committed" and rec["batches"] == 2 and rec["batch_sizes"] == [2, 1], rec
    prepares = {r: [args for name, args in h.calls if name == "prepare"] for r, h in enumerate(handles)}
    assert [len(prepares[r][0][1]) for r in (0,)] == [1] and prepares[0][0][4] is False  # batch 1, not sealed
    assert all(calls[-1][4] is True for calls in prepares.values())  # every rank sealed once, last
    assert len(prepares[1]) == len(prepares[2]) == 1 and len(prepares[3]) == 2  # ranks 1, 2 receive nothing: only the seal
    assert all(w.epoch == rec["epoch"] and w.verify() == [] for w in workers.values())
    assert torch.equal(torch.cat([w.state()["experts"] for w in workers.values()], 1), new_map)


def test_the_forecast_spec_drives_what_the_controller_plans_on():
    cfg = ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, forecast="last")
    ctl, workers, _ = make(cfg)
    p0 = Placement.identity(TOPO)
    serve(workers, p0, 0, 1, 5)
    asyncio.run(ctl.telemetry())
    asyncio.run(ctl.telemetry())  # an idle round is not a forecast round
    serve(workers, p0, 0, 2, 4)
    asyncio.run(ctl.telemetry())
    want = torch.zeros(2, 8, dtype=torch.float64)
    want[0, 2] = 4
    assert torch.equal(ctl.forecast, want)
    asyncio.run(ctl.reconfigure(forecast="ema:0.5"))
    assert ctl.forecast is None and ctl.config.forecast == "ema:0.5"
    with pytest.raises(ValueError, match="max_moves=7.5"):
        asyncio.run(ctl.reconfigure(max_moves=7.5))
    assert ctl.config.max_moves is None


def test_decide_fires_each_trigger_only_when_its_condition_holds():
    from ray_eplb.controller.planning import decide

    both = ControllerConfig(trigger="both", drift_threshold=0.9, rebalance_period_s=10.0, min_tokens=100)
    assert decide(both, True, False, 0.0, None, 0.0) == "forced"  # forced needs nothing
    assert decide(both, False, False, 1e6, 0.5, 99.0) is None  # no forecast yet
    assert decide(both, False, True, 99.0, 0.5, 99.0) is None  # too few tokens in the window
    assert decide(both, False, True, 1e3, 0.89, 1.0) == "drift"
    assert decide(both, False, True, 1e3, 0.91, 1.0) is None
    assert decide(both, False, True, 1e3, 0.91, 10.0) == "periodic"
    drift = both.model_copy(update={"trigger": "drift"})
    periodic = both.model_copy(update={"trigger": "periodic"})
    assert decide(drift, False, True, 1e3, 0.91, 1e6) is None
    assert decide(periodic, False, True, 1e3, 0.1, 1.0) is None
    assert decide(periodic, False, True, 1e3, None, 10.0) == "periodic"
