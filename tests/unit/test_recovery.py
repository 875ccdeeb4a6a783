"""Epoch identity, the store, recovery, healing and telemetry validation of the controller, without
Ray: in-process workers behind handle-like fakes; every served token is checked against the dense
reference (weights derived from (layer, expert), so a wrong expert cannot go unnoticed)."""
import asyncio

import numpy as np
import pytest
import torch
from fakes import SRC, TOPO, make, serve

from ray_eplb.actors import ExpertWorker, StaleEpochError
from ray_eplb.controller.balancer import EplbController
from ray_eplb.controller.bench.reference import DenseMoE, mismatched
from ray_eplb.topology import MapId, Placement

DENSE = DenseMoE(SRC, TOPO.num_layers, TOPO.num_experts)


def wrong_tokens(workers, placement, seed=0):
    """Route 2 tokens to every slot of ``placement`` and count outputs that differ from the dense reference."""
    bad = 0
    gen = torch.Generator().manual_seed(seed)
    s = TOPO.slots_per_gpu
    for layer in range(TOPO.num_layers):
        for slot in range(TOPO.num_slots):
            rank, local = divmod(slot, s)
            x = torch.randn(2, 8, generator=gen)
            y = workers[rank].forward(placement.map_id(), layer, torch.tensor([local, local]), x)
            e = int(placement.phy2log[layer, slot])
            ref = DENSE(layer, x, torch.full((2, 1), e), torch.ones(2, 1))
            bad += int(mismatched(y, ref).sum())
    return bad


def skewed(ctl, workers):
    serve(workers, ctl.placement, 0, 0, 80)
    serve(workers, ctl.placement, 1, 3, 50)


def on_map(workers, placement):
    return all(w.state()["epoch"] == placement.epoch and w.state()["digest"] == placement.digest() for w in workers.values())


def test_every_epoch_goes_through_the_store_and_numbers_are_never_reused():
    ctl, workers, handles = make()
    skewed(ctl, workers)
    rec = asyncio.run(ctl.rebalance_now())
    assert rec["action"] == "committed"
    stored = ctl.store.load()
    assert (stored["epoch"], stored["digest"], stored["pending"]) == (rec["epoch"], ctl.placement.digest(), None)
    assert stored["next_epoch"] > rec["epoch"]
    again = EplbController(TOPO, handles, ctl.config, store=ctl.store, restart=True)
    assert asyncio.run(again.recover()) and again.placement.map_id() == ctl.placement.map_id()
    skewed(again, workers)
    serve(workers, ctl.placement, 0, 5, 200)  # new skew: something to move
    rec2 = asyncio.run(again.rebalance_now())
    assert rec2["action"] == "committed" and rec2["epoch"] > rec["epoch"]
    assert on_map(workers, again.placement) and wrong_tokens(workers, again.placement) == 0


def test_a_pending_map_is_rolled_forward_and_every_rank_brought_onto_it():
    """The controller died after every rank prepared epoch e and the store said so, before the commit."""
    ctl, workers, handles = make()
    skewed(ctl, workers)
    assert asyncio.run(ctl.rebalance_now())["action"] == "committed"
    committed = ctl.placement
    perm = committed.phy2log.roll(1, dims=1)  # another valid map of the same experts
    pending = Placement.from_phy2log(TOPO, perm, committed.epoch + 1)
    ctl._next_epoch = pending.epoch + 1
    ctl._save(pending=pending)
    serve(workers, committed, 1, 6, 30)  # traffic still routed by the committed map when the controller died
    restarted = EplbController(TOPO, handles, ctl.config, store=ctl.store, restart=True)
    rec = asyncio.run(restarted.step())
    assert restarted.placement.map_id() == pending.map_id()
    # Its first round counts that traffic: the committed map is known to it beside the rolled-forward one.
    assert float(restarted.load.total[1, 6]) >= 30 and restarted.forecast is not None
    assert rec["action"] == "healed" and not rec["renumbered"] and rec["ranks"] == [0, 1, 2, 3]
    assert on_map(workers, pending) and wrong_tokens(workers, pending) == 0
    assert [w.verify() for w in workers.values()] == [[]] * 4
    assert restarted.store.load()["epoch"] == pending.epoch
    with pytest.raises(StaleEpochError):  # the old map's dispatches are not served as the new one's
        workers[0].forward(MapId(pending.epoch, committed.digest()), 0, torch.tensor([0]), torch.randn(1, 8))


def test_a_worker_restarted_on_another_map_is_healed_alone():
    ctl, workers, handles = make()
    skewed(ctl, workers)
    assert asyncio.run(ctl.rebalance_now())["action"] == "committed"
    # rank 2 came back on its launch slots, under a map id no placement has: it serves nothing
    launch = Placement.identity(TOPO)
    workers[2] = ExpertWorker(2, TOPO, launch.rank_experts(2), SRC, device="cpu", digest="none",
                              fetcher=workers[0].fetcher)
    handles[2].worker = workers[2]
    with pytest.raises(StaleEpochError):
        workers[2].forward(ctl.placement.map_id(), 0, torch.tensor([0]), torch.randn(1, 8))
    rec = asyncio.run(ctl.step())
    assert rec["action"] == "healed" and rec["ranks"] == [2] and rec["renumbered"] is False
    assert on_map(workers, ctl.placement) and wrong_tokens(workers, ctl.placement) == 0
    assert asyncio.run(ctl.status()).off_map == []


def test_workers_ahead_of_a_controller_that_lost_its_store_are_renumbered():
    ctl, workers, handles = make()
    skewed(ctl, workers)
    rec = asyncio.run(ctl.rebalance_now())
    ctl.store.clear()
    lost = EplbController(TOPO, handles, ctl.config, store=ctl.store, restart=True)  # back on its launch map
    heal = asyncio.run(lost.step())
    assert heal["action"] == "healed" and heal["renumbered"] and heal["epoch"] > rec["epoch"]
    assert on_map(workers, lost.placement) and wrong_tokens(workers, lost.placement) == 0
    assert torch.equal(lost.placement.phy2log, Placement.identity(TOPO).phy2log)


def test_forged_stale_and_future_maps_are_refused():
    ctl, workers, _ = make()
    skewed(ctl, workers)
    asyncio.run(ctl.rebalance_now())
    p = ctl.placement
    forged = Placement.from_phy2log(TOPO, p.phy2log.roll(1, dims=1), p.epoch)  # the served number, other slots
    x = torch.randn(3, 8)
    for bad in (forged.map_id(), MapId(p.epoch + 5, p.digest()), MapId(0, p.digest()), p.epoch):
        with pytest.raises(StaleEpochError):
            workers[1].forward(bad, 0, torch.tensor([0, 1, 2]), x)
    assert wrong_tokens(workers, p) == 0


def _lie(kind):
    def rewrite(reply):
        reply = dict(reply)
        counts = np.frombuffer(reply["counts"], dtype=np.int64).copy()
        if kind == "negative":
            counts[0] = -970
        elif kind == "float_bytes":
            reply["counts"] = np.full(counts.shape, np.nan).tobytes()
            reply["dtype"] = "float64"
            return reply
        elif kind == "nan_as_int":  # NaN bytes under an int64 label: 5.5e19-sized numbers
            reply["counts"] = np.full(counts.shape, np.nan).tobytes()
            return reply
        elif kind == "shape":
            reply["shape"] = (1, 1, 1)
        elif kind == "not_a_reply":
            return "garbage"
        reply["counts"] = counts.tobytes()
        return reply
    return rewrite


@pytest.mark.parametrize("kind", ["negative", "float_bytes", "nan_as_int", "shape", "not_a_reply", "backwards"])
def test_bad_telemetry_is_left_out_for_that_worker_only(kind):
    ctl, workers, handles = make()
    counted = []

    class Sink:
        def gauge(self, *a, **k):
            pass

        def refresh(self):
            pass

        def count(self, name, value=1.0, tags=None):
            counted.append((name, tags))

    ctl.metrics = Sink()
    p = ctl.placement
    if kind == "backwards":
        serve(workers, p, 0, int(p.phy2log[0, 6]), 10)  # rank 2's first slot, 10 tokens
        asyncio.run(ctl.telemetry())
        before = workers[2].collect()
        handles[2].lies["collect"] = lambda reply: before | {"counts": np.zeros(len(before["counts"]) // 8, np.int64).tobytes()}
    else:
        handles[2].lies["collect"] = _lie(kind)
    e_good, e_liar = int(p.phy2log[0, 0]), int(p.phy2log[0, 6])  # slot 0 on rank 0, slot 6 on rank 2
    serve(workers, p, 0, e_good, 7)
    serve(workers, p, 0, e_liar, 9)
    load = asyncio.run(ctl.telemetry())
    assert float(load[0, e_good]) == 7  # the honest workers' counts arrive, exactly
    assert float(load[0, e_liar]) == 0  # the liar's are left out of this round
    st = asyncio.run(ctl.status())
    assert 2 in st.rejected and any("rank 2" in e for e in st.errors)
    assert ("eplb_telemetry_rejected_total", {"rank": "2"}) in counted
    assert float(ctl.window_load().sum()) < 1e6  # no absurd load reached the forecast


def test_router_registry_is_bounded_by_live_routers():
    ctl, _, _ = make()
    ctl.config = ctl.config.model_copy(update={"router_ttl_s": 0.05})

    async def go():
        for i in range(50):
            await ctl.wait_map(ctl.placement.epoch, f"router-{i}", 0.0)
        assert len((await ctl.status()).routers) == 50
        await asyncio.sleep(0.1)
        await ctl.wait_map(ctl.placement.epoch, "alive", 0.0)
        assert set((await ctl.status()).routers) == {"alive"}
        assert await ctl.forget_router("alive")
        return (await ctl.status()).routers

    assert asyncio.run(go()) == {}


@pytest.mark.parametrize("stopped_first", [False, True])
def test_the_loop_intent_survives_a_restart(stopped_first):
    ctl, _, handles = make()

    async def run_then_restart():
        await ctl.start()
        if stopped_first:
            await ctl.stop()
        assert ctl.store.load()["loop"] == ("stopped" if stopped_first else "running")
        again = EplbController(TOPO, handles, ctl.config, store=ctl.store, restart=True)
        state = await again.resume()
        await again.stop()
        await ctl.stop()
        return state

    assert asyncio.run(asyncio.wait_for(run_then_restart(), 20)) == ("idle" if stopped_first else "running")
