"""The controller class without Ray: in-process workers behind handle-like fakes."""
import asyncio
import time

import pytest
import torch
from pydantic import ValidationError

from ray_eplb.actors import ExpertWorker, SyntheticWeightSource, local_fetcher
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.controller import EplbController
from ray_eplb.controller.transfer import plan_summary, transfer_plan
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
SRC = SyntheticWeightSource(hidden_size=8, ffn_size=8, seed=1)


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        async def call():
            delay = self.handle.delays.get(self.name, 0.0)
            if delay:
                await asyncio.sleep(delay)
            return await asyncio.to_thread(getattr(self.handle.worker, self.name), *args)

        return call()


class FakeHandle:
    """Looks like a Ray actor handle: ``h.method.remote(*args)`` is awaitable."""

    def __init__(self, worker):
        self.worker, self.delays = worker, {}

    def __getattr__(self, name):
        return _Method(self, name)


def make(config=None):
    placement = Placement.identity(TOPO)
    workers = {}
    fetch = local_fetcher(lambda r: workers[r])
    for r in range(TOPO.num_gpus):
        workers[r] = ExpertWorker(r, TOPO, placement.rank_experts(r), SRC, fetcher=fetch, device="cpu")
    handles = [FakeHandle(workers[r]) for r in range(TOPO.num_gpus)]
    cfg = config or ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, prepare_timeout_s=0.5, commit_timeout_s=0.5, release_timeout_s=0.5)
    return EplbController(TOPO, handles, cfg), workers, handles


def serve(workers, placement, layer, expert, n):
    """Route ``n`` tokens of ``expert`` to its first slot under ``placement``."""
    slot = int(placement.log2phy[layer, expert, 0])
    rank, local = divmod(slot, TOPO.slots_per_gpu)
    workers[rank].forward(placement.epoch, layer, torch.full((n,), local), torch.randn(n, 8))


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
    assert st["rebalances"] == 1 and st["experts_moved"] == rec["moved"] > 0


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
        assert (await ctl.status())["loop"] == "running"
        await ctl.stop()
        return await ctl.status()

    st = asyncio.run(go())
    assert st["loop"] == "stopped" and st["rounds"] >= 2 and st["errors"] == []


def test_recover_rebuilds_placement_from_workers():
    ctl, workers, handles = make()
    serve(workers, Placement.identity(TOPO), 0, 0, 60)
    rec = asyncio.run(ctl.rebalance_now())
    fresh = EplbController(TOPO, handles, ctl.config)  # a restarted controller knows nothing
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
