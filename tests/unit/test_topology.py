"""Topology, Placement and plan() (topology/): validation, round trips, changed slots, end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_eplb.solver import logical_maps, rebalance_experts
from ray_eplb.topology import Placement, Topology, plan


def topo(**kw) -> Topology:
    args = dict(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2, num_groups=4)
    args.update(kw)
    return Topology(**args)


# ----------------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------------
def test_topology_derived_sizes():
    t = topo()
    assert (t.num_gpus, t.num_slots, t.slots_per_node) == (4, 12, 6)
    assert [t.rank_of_slot(s) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [t.node_of_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert list(t.slots_of_rank(2)) == [6, 7, 8]
    assert Topology(num_nodes=1, gpus_per_node=1, slots_per_gpu=1, num_experts=1, num_layers=1).num_groups == 1


def test_topology_validation_errors():
    # Every expert needs a slot: 2 x 2 GPUs x 1 slot < 8 experts.
    with pytest.raises(ValueError, match=r"num_slots=4.*num_experts=8"):
        topo(slots_per_gpu=1)
    for field in ("num_nodes", "gpus_per_node", "slots_per_gpu", "num_experts", "num_layers", "num_groups"):
        with pytest.raises(ValueError, match=field):
            topo(**{field: 0})
    with pytest.raises(ValueError):
        topo(num_nodes="two")


def test_topology_is_frozen_and_comparable():
    t = topo()
    with pytest.raises(ValueError):
        t.num_nodes = 3
    assert t == topo() and t != topo(num_layers=3)
    assert hash(t) == hash(topo())


def test_topology_from_counts():
    t = Topology.from_counts(num_replicas=288, num_gpus=32, num_nodes=4, num_experts=64, num_layers=26, num_groups=8)
    assert (t.num_nodes, t.gpus_per_node, t.slots_per_gpu, t.num_slots, t.num_groups) == (4, 8, 9, 288, 8)
    with pytest.raises(ValueError, match="num_gpus=6"):
        Topology.from_counts(24, 6, 4, 8, 1)
    with pytest.raises(ValueError, match="num_replicas=25"):
        Topology.from_counts(25, 4, 2, 8, 1)
    with pytest.raises(ValueError, match="num_nodes=0"):
        Topology.from_counts(24, 4, 0, 8, 1)
    with pytest.raises(ValueError, match="num_experts"):
        Topology.from_counts(8, 4, 2, 9, 1)  # 8 slots < 9 experts


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------
def test_identity_round_robin_and_round_trip():
    t = topo()
    p = Placement.identity(t, epoch=2)
    assert p.epoch == 2
    want = torch.arange(12) % 8
    assert torch.equal(p.phy2log, want.expand(2, -1))
    assert p.logcnt.tolist() == [[2, 2, 2, 2, 1, 1, 1, 1]] * 2
    assert p.log2phy[0, 0].tolist() == [0, 8, -1, -1, -1]
    assert p.log2phy[0, 7].tolist() == [7, -1, -1, -1, -1]
    q = Placement.from_phy2log(t, p.phy2log.clone(), epoch=2)
    assert all(torch.equal(getattr(q, f), getattr(p, f)) for f in ("phy2log", "log2phy", "logcnt"))
    assert q.epoch == p.epoch and q.topology == p.topology


def test_placements_compare_by_value():
    t = topo()
    assert Placement.identity(t) == Placement.identity(t)
    assert Placement.identity(t) != Placement.identity(t, epoch=1)


def test_from_phy2log_matches_the_solver_maps():
    t = topo()
    weight = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 12, 4, 2, 4)
    p = Placement.from_phy2log(t, phy2log.tolist())  # any int sequence is accepted
    assert p.phy2log.dtype == torch.int64
    assert torch.equal(p.phy2log, phy2log) and torch.equal(p.log2phy, log2phy) and torch.equal(p.logcnt, logcnt)
    # The direct constructor accepts the same three maps.
    assert torch.equal(Placement(topology=t, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt).phy2log, phy2log)
    # from_phy2log derives the maps once and skips the constructor's re-derivation: what it builds
    # still passes the full check, is frozen, and is the same value.
    again = Placement.model_validate(dict(p.__dict__))
    assert again == p and again.digest() == p.digest() and torch.equal(again.log2phy, p.log2phy)
    with pytest.raises(ValueError):
        p.epoch = 3
    with pytest.raises(ValueError, match=r"phy2log has shape \(1, 12\), the topology needs \(2, 12\)"):
        Placement.from_phy2log(t, phy2log[:1])
    # plan() goes through it: the same placement as the solver's maps.
    q = plan(t, weight, epoch=4)
    assert q.epoch == 4 and torch.equal(q.phy2log, phy2log) and torch.equal(q.log2phy, log2phy)


def test_placement_validation_errors():
    t = topo()
    good = Placement.identity(t)
    phy2log, log2phy, logcnt = good.phy2log, good.log2phy, good.logcnt
    # Shapes.
    with pytest.raises(ValueError, match=r"phy2log has shape \(1, 12\)"):
        Placement(topology=t, phy2log=phy2log[:1], log2phy=log2phy, logcnt=logcnt)
    with pytest.raises(ValueError, match=r"log2phy has shape"):
        Placement(topology=t, phy2log=phy2log, log2phy=log2phy[:, :, :2], logcnt=logcnt)
    with pytest.raises(ValueError, match=r"logcnt has shape"):
        Placement(topology=t, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt[:, :7])
    # dtype.
    with pytest.raises(ValueError, match="int64"):
        Placement(topology=t, phy2log=phy2log.to(torch.int32), log2phy=log2phy, logcnt=logcnt)
    # logcnt / log2phy that do not match phy2log.
    bad_cnt = logcnt.clone()
    bad_cnt[0, 0] += 1
    bad_cnt[0, 1] -= 1
    with pytest.raises(ValueError, match="logcnt does not match"):
        Placement(topology=t, phy2log=phy2log, log2phy=log2phy, logcnt=bad_cnt)
    bad_l2p = log2phy.clone()
    bad_l2p[1, 0, :2] = torch.tensor([8, 0])  # same slots, not ascending
    with pytest.raises(ValueError, match="log2phy does not invert"):
        Placement(topology=t, phy2log=phy2log, log2phy=bad_l2p, logcnt=logcnt)
    # An expert with no slot (expert 7 of layer 1 replaced by expert 0).
    holes = phy2log.clone()
    holes[1, 7] = 0
    with pytest.raises(ValueError, match="expert 7 of layer 1 has no slot"):
        Placement.from_phy2log(t, holes)
    # Expert ids out of range; negative epoch.
    out_of_range = phy2log.clone()
    out_of_range[0, 3] = 8
    with pytest.raises(ValueError, match="outside"):
        Placement.from_phy2log(t, out_of_range)
    with pytest.raises(ValueError, match="epoch"):
        Placement.from_phy2log(t, phy2log, epoch=-1)


def test_placement_is_frozen_and_with_epoch_copies():
    p = Placement.identity(topo(), epoch=1)
    with pytest.raises(ValueError):
        p.epoch = 5
    q = p.with_epoch(7)
    assert (q.epoch, p.epoch) == (7, 1)
    assert torch.equal(q.phy2log, p.phy2log) and q.topology == p.topology


def test_rank_experts_and_changed_slots():
    t = topo()
    a = Placement.identity(t)
    assert a.rank_experts(1).tolist() == [[3, 4, 5]] * 2
    assert a.rank_experts(3).tolist() == [[1, 2, 3]] * 2  # slots 9..11 hold 9 % 8, 10 % 8, 11 % 8
    phy2log = a.phy2log.clone()
    phy2log[0, [0, 8]] = phy2log[0, [8, 0]]  # swap two replicas of expert 0: no change at all
    phy2log[1, [1, 4]] = phy2log[1, [4, 1]]  # expert 1 <-> expert 4: two slots change
    b = Placement.from_phy2log(t, phy2log, epoch=1)
    changed = b.changed_slots(a)
    assert changed.dtype == torch.bool and tuple(changed.shape) == (2, 12)
    assert changed.nonzero().tolist() == [[1, 1], [1, 4]]
    assert not a.changed_slots(a).any()
    with pytest.raises(ValueError, match="different topologies"):
        a.changed_slots(Placement.identity(topo(num_layers=2, slots_per_gpu=4)))


# ----------------------------------------------------------------------------------------------
# plan()
# ----------------------------------------------------------------------------------------------
def test_plan_end_to_end():
    t = Topology.from_counts(num_replicas=32, num_gpus=8, num_nodes=2, num_experts=16, num_layers=3, num_groups=4)
    weight = torch.from_numpy(np.random.default_rng(1).exponential(1.0, (3, 16)) ** 2)
    p = plan(t, weight, epoch=4)
    assert isinstance(p, Placement) and p.epoch == 4 and p.topology == t
    want = rebalance_experts(weight, 32, 4, 2, 8)
    assert torch.equal(p.phy2log, want[0]) and torch.equal(p.log2phy, want[1]) and torch.equal(p.logcnt, want[2])
    # Solver keywords go through.
    h = plan(t, weight, policy="hierarchical", method="dhondt")
    assert torch.equal(h.phy2log, rebalance_experts(weight, 32, 4, 2, 8, policy="hierarchical", method="dhondt")[0])
    with pytest.raises(ValueError, match="policy='nope'"):
        plan(t, weight, policy="nope")
    # A weight of the wrong shape names both shapes.
    with pytest.raises(ValueError, match=r"\(3, 15\).*\(3, 16\)"):
        plan(t, weight[:, :15])
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        plan(t, weight[:2])


def test_plan_with_groups_that_do_not_fit_the_nodes():
    # 3 groups on 2 nodes: auto falls back to global; hierarchical is refused, naming the groups.
    t = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=2, num_experts=6, num_layers=1, num_groups=3)
    weight = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    p = plan(t, weight)
    log2phy, logcnt = logical_maps(p.phy2log, 6)
    assert torch.equal(logcnt, p.logcnt) and (logcnt >= 1).all()
    with pytest.raises(ValueError, match="num_groups=3"):
        plan(t, weight, policy="hierarchical")
