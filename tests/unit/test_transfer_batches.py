"""Transfer plans and their batches and the worker staging them batch by batch."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.actors import ExpertWorker, SyntheticWeightSource, Transfer, local_fetcher
from ray_eplb.controller.transfer import batch_transfers, split_by_rank, transfer_plan
from ray_eplb.solver import rebalance_experts
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
SRC = SyntheticWeightSource(hidden_size=8, ffn_size=8, seed=2)


def rank_loads(batch):
    """(sends per rank, receives per rank) of a batch's remote rows."""
    remote = [t for t in batch if t.src_rank != t.dst_rank]
    return Counter(t.src_rank for t in remote if t.src_rank >= 0), Counter(t.dst_rank for t in remote)


def max_degree(plan):
    sends, recvs = rank_loads(plan)
    return max([*sends.values(), *recvs.values(), 0])


rows = st.lists(st.tuples(st.integers(-1, 5), st.integers(0, 5)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(1, 3))
def test_batches_hold_every_row_once_and_no_rank_over_its_cap(pairs, per_rank):
    plan = [Transfer(0, i % 7, src, dst, i) for i, (src, dst) in enumerate(pairs)]
    batches = batch_transfers(plan, per_rank)
    assert sorted(t for b in batches for t in b) == sorted(plan)
    for b in batches:
        sends, recvs = rank_loads(b)
        assert max([*sends.values(), *recvs.values(), 0]) <= per_rank
        assert b, "no empty batch"
    # As few batches as the busiest rank allows (local copies alone make one batch).
    has_local = any(t.src_rank == t.dst_rank for t in plan)
    assert len(batches) == max(-(-max_degree(plan) // per_rank), int(has_local))


def test_batches_on_a_hand_case():
    # Rank 0 sends three experts, rank 3 receives two: at least three batches with one per rank.
    plan = [Transfer(0, 1, 0, 1, 3), Transfer(0, 2, 0, 2, 6), Transfer(0, 3, 0, 3, 9),
            Transfer(1, 4, 2, 3, 10), Transfer(1, 5, 1, 1, 4), Transfer(1, 6, -1, 2, 7)]
    batches = batch_transfers(plan)
    assert len(batches) == 3
    assert Transfer(1, 5, 1, 1, 4) in batches[0]  # the local copy rides in the first batch
    assert [len(b) for b in batch_transfers(plan, per_rank=3)] == [6]
    assert batch_transfers([]) == []
    with pytest.raises(ValueError, match="per_rank=0"):
        batch_transfers(plan, 0)


def random_placement(seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(TOPO.num_layers, TOPO.num_experts, generator=gen) ** 4  # [L, E]
    phy2log, _, _ = rebalance_experts(weight, TOPO.num_slots, 1, TOPO.num_nodes, TOPO.num_gpus, policy="global")
    return Placement.from_phy2log(TOPO, phy2log)


@pytest.mark.parametrize("seed", range(12))
def test_every_transfer_has_a_valid_source_nearest_first(seed):
    old, new = random_placement(seed), random_placement(seed + 100)
    plan = transfer_plan(old, new)
    assert len(plan) == int(old.changed_slots(new).sum())
    s = TOPO.slots_per_gpu
    for t in plan:
        holders = {slot // s for slot in (old.phy2log[t.layer] == t.expert).nonzero().flatten().tolist()}
        assert t.src_rank in holders, f"{t}: rank {t.src_rank} does not hold the expert at the old epoch"
        assert int(new.phy2log[t.layer, t.dst_slot]) == t.expert and t.dst_slot // s == t.dst_rank
        same_node = {r for r in holders if TOPO.node_of_rank(r) == TOPO.node_of_rank(t.dst_rank)}
        if t.dst_rank in holders:
            assert t.src_rank == t.dst_rank
        elif same_node:
            assert t.src_rank in same_node


def test_sources_spread_across_the_ranks_that_hold_the_expert():
    topo = Topology(num_nodes=1, gpus_per_node=4, slots_per_gpu=3, num_experts=8, num_layers=1)
    old = Placement.from_phy2log(topo, torch.tensor([[0, 1, 2, 0, 3, 4, 5, 6, 7, 1, 2, 3]]))
    new = Placement.from_phy2log(topo, torch.tensor([[0, 1, 2, 0, 3, 4, 5, 6, 0, 7, 2, 0]]))
    plan = transfer_plan(old, new)
    sources = sorted(t.src_rank for t in plan if t.expert == 0)
    assert sources == [0, 1]  # ranks 2 and 3 each need expert 0: one copy from each holder
    assert len(batch_transfers(plan)) == 2  # rank 3 receives two experts (0 and 7)


def make_workers():
    placement = Placement.identity(TOPO)
    workers = {}
    fetch = local_fetcher(lambda r: workers[r])
    for r in range(TOPO.num_gpus):
        workers[r] = ExpertWorker(r, TOPO, placement.rank_experts(r), SRC, fetcher=fetch, device="cpu")
    return workers


def test_worker_stages_batch_after_batch_and_commits_the_whole_epoch():
    workers, old = make_workers(), Placement.identity(TOPO)
    new = random_placement(7).with_epoch(1)
    batches = batch_transfers(transfer_plan(old, new))
    assert len(batches) >= 2
    staged = Counter()
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        per_rank = split_by_rank(batch, TOPO.num_gpus)
        for r, w in workers.items():
            if per_rank[r] or last:
                reply = w.prepare(1, per_rank[r], new.rank_experts(r), 5.0, last)
                assert reply["status"] == ("prepared" if last else "staged")
                assert reply["moved"] == len(per_rank[r])
                staged[r] += reply["moved"]
                if not last:  # serving is untouched until the commit
                    assert w.epoch == 0 and w.state()["staging"] == 1
    for r, w in workers.items():
        assert staged[r] == int(old.changed_slots(new)[:, r * 3 : r * 3 + 3].sum())
        assert w.commit(1)["status"] == "committed"
        assert w.verify() == []
        assert torch.equal(w.state()["experts"], new.rank_experts(r))


def test_a_seal_without_every_changed_slot_is_refused_and_a_repeated_batch_changes_nothing():
    workers, old = make_workers(), Placement.identity(TOPO)
    new = random_placement(3).with_epoch(1)
    per_rank = split_by_rank(transfer_plan(old, new), TOPO.num_gpus)
    r = max(range(TOPO.num_gpus), key=lambda k: len(per_rank[k]))
    w, rows = workers[r], per_rank[r]
    assert len(rows) >= 2
    first = w.prepare(1, rows[:1], new.rank_experts(r), 5.0, False)
    again = w.prepare(1, rows[:1], new.rank_experts(r), 5.0, False)
    assert (first["moved"], again["moved"], again["bytes"]) == (1, 0, 0)
    with pytest.raises(ValueError, match="have no transfer"):
        w.prepare(1, [], new.rank_experts(r), 5.0, True)
    assert w.state()["staging"] is None and w.commit(1)["status"] == "not_prepared"
    assert w.prepare(1, rows, new.rank_experts(r), 5.0, True)["status"] == "prepared"


def test_abort_between_batches_drops_the_construction_and_refuses_later_batches():
    workers, old = make_workers(), Placement.identity(TOPO)
    new = random_placement(5).with_epoch(1)
    per_rank = split_by_rank(transfer_plan(old, new), TOPO.num_gpus)
    r = max(range(TOPO.num_gpus), key=lambda k: len(per_rank[k]))
    w = workers[r]
    pool = len(w.staging.pool)
    assert w.prepare(1, per_rank[r][:1], new.rank_experts(r), 5.0, False)["status"] == "staged"
    assert w.abort(1)["status"] == "aborted"
    assert w.state()["staging"] is None and len(w.staging.pool) == pool  # its buffer is back
    assert w.prepare(1, per_rank[r][1:], new.rank_experts(r), 5.0, True)["status"] == "stale"
    assert w.epoch == 0 and w.verify() == []
