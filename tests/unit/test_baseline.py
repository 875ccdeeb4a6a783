"""The greedy EPLB baseline (solver/baseline.py): valid placements, hand-checked outputs, errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from ray_eplb.solver import duplicate_pairs, logical_maps
from ray_eplb.solver.baseline import balanced_packing, greedy_rebalance_experts, replicate_argmax


def reference_argmax_counts(w: list[float], num_phy: int) -> list[int]:
    """Greedy by hand: one replica each, then each extra slot to the largest w/c (lowest index on ties)."""
    c = [1] * len(w)
    for _ in range(num_phy - len(w)):
        best = max(range(len(w)), key=lambda i: (w[i] / c[i], -i))
        c[best] += 1
    return c


def check_valid(weight, num_replicas, num_groups, num_nodes, num_gpus, out):
    """The invariants every placement must hold; returns (phy2log [L, R], logcnt [L, E])."""
    phy2log, log2phy, logcnt = out
    num_layers, num_experts = weight.shape
    assert phy2log.shape == (num_layers, num_replicas) and phy2log.dtype == torch.int64
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    assert logcnt.shape == (num_layers, num_experts) and logcnt.dtype == torch.int64
    assert int(logcnt.min()) >= 1
    assert torch.equal(logcnt.sum(1), torch.full((num_layers,), num_replicas))
    # logcnt counts the slots of each expert; log2phy lists exactly those slots, then -1 padding.
    ref_l2p, ref_cnt = logical_maps(phy2log, num_experts)
    assert torch.equal(logcnt, ref_cnt) and torch.equal(log2phy, ref_l2p)
    for layer in range(num_layers):
        for e in range(num_experts):
            slots = log2phy[layer, e]
            n = int(logcnt[layer, e])
            assert (slots[n:] == -1).all()
            assert (phy2log[layer, slots[:n]] == e).all()
    # Every GPU holds R/P slots: the map is a whole number of GPUs and each expert's count is its slots.
    assert num_replicas % num_gpus == 0
    return phy2log, logcnt


def test_balanced_packing_hand_checked():
    # 5->b0, 4->b1, 3->b1 (7), 3->b0 (8), 2->b1 (9, full), 1->b0 (9).
    pack, rank = balanced_packing(torch.tensor([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_balanced_packing_fills_every_bin_exactly():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(7, 24, generator=g)  # [7, 24]
    pack, rank = balanced_packing(w, 6)
    for row in range(7):
        for b in range(6):
            ranks = sorted(rank[row][pack[row] == b].tolist())
            assert ranks == [0, 1, 2, 3]


def test_balanced_packing_rejects_indivisible():
    with pytest.raises(ValueError, match="num_packs=4"):
        balanced_packing(torch.ones(2, 6), 4)


def test_replicate_argmax_is_min_max_optimal_on_small_rows():
    # Brute force: no composition of the slots has a lower peak max(w/c) than the greedy.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = (torch.rand(4, generator=g) * 10).to(torch.float64)
        phy2log, count = replicate_argmax(w.unsqueeze(0), 9)
        assert count[0].tolist() == reference_argmax_counts(w.tolist(), 9)
        peak = float((w / count[0]).max())
        best = min(
            max(wi / ci for wi, ci in zip(w.tolist(), c))
            for c in itertools.product(range(1, 7), repeat=4)
            if sum(c) == 9
        )
        assert peak == pytest.approx(best)
        assert torch.equal(torch.bincount(phy2log[0], minlength=4), count[0])


def test_global_hand_checked_keeps_published_duplicates():
    # Counts by argmax w/c: [4, 2, 1, 1] (peak 3.5, optimal). Replica loads 3,3.5,2,1,3,3.5,3,3 packed
    # greedily on 4 GPUs x 2 slots: GPU0 [e1, e2], GPU1 [e1, e3], GPU2 [e0, e0], GPU3 [e0, e0] -- the
    # published algorithm stacks two replicas of e0 on a GPU although 4 GPUs could hold one each.
    weight = torch.tensor([[12.0, 7.0, 2.0, 1.0]])
    out = greedy_rebalance_experts(weight, 8, 1, 1, 4)
    phy2log, logcnt = check_valid(weight, 8, 1, 1, 4, out)
    assert logcnt.tolist() == [[4, 2, 1, 1]]
    assert phy2log.tolist() == [[1, 2, 1, 3, 0, 0, 0, 0]]
    assert duplicate_pairs(phy2log, 4) == 2


def test_hierarchical_hand_checked():
    # Groups {0,1} (load 7) and {2,3} (load 8): {2,3} -> node 0, {0,1} -> node 1. Node 0's extra slot
    # goes to expert 2 (tie 4/4, lower index); node 1's to expert 1 (6). One GPU per node, slots in
    # order of decreasing replica load.
    weight = torch.tensor([[1.0, 6.0, 4.0, 4.0]])
    out = greedy_rebalance_experts(weight, 6, 2, 2, 2)
    phy2log, logcnt = check_valid(weight, 6, 2, 2, 2, out)
    assert phy2log.tolist() == [[3, 2, 2, 1, 1, 0]]
    assert logcnt.tolist() == [[1, 2, 2, 1]]


def test_falls_back_to_global_when_groups_do_not_fit():
    # 3 groups cannot split 4 experts nor 2 nodes: the global policy, counts by argmax w/c.
    weight = torch.tensor([[1.0, 6.0, 4.0, 4.0]])
    out = greedy_rebalance_experts(weight, 6, 3, 2, 2)
    _, logcnt = check_valid(weight, 6, 3, 2, 2, out)
    assert logcnt.tolist() == [[1, 2, 2, 1]]


@pytest.mark.parametrize(
    "num_layers,num_experts,num_replicas,num_groups,num_nodes,num_gpus",
    [(5, 16, 24, 4, 2, 4), (3, 64, 72, 8, 2, 8), (4, 12, 16, 4, 4, 8), (2, 10, 20, 5, 1, 5), (3, 8, 16, 4, 2, 8)],
)
def test_random_placements_are_valid_and_count_by_argmax(
    num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus
):
    g = torch.Generator().manual_seed(num_experts * 31 + num_replicas)
    weight = torch.rand(num_layers, num_experts, generator=g) ** 3 * 1000  # [L, E], skewed
    out = greedy_rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    phy2log, logcnt = check_valid(weight, num_replicas, num_groups, num_nodes, num_gpus, out)
    group_size = num_experts // num_groups
    slots_per_node = num_replicas // num_nodes
    node_of_slot = torch.arange(num_replicas) // slots_per_node  # [R]
    for layer in range(num_layers):
        for grp in range(num_groups):
            in_group = (phy2log[layer] // group_size) == grp  # [R]
            assert node_of_slot[in_group].unique().numel() == 1, "a group is split across nodes"
        for node in range(num_nodes):
            experts = phy2log[layer, node * slots_per_node : (node + 1) * slots_per_node].unique().tolist()
            w = weight[layer, experts].double().tolist()
            assert logcnt[layer, experts].tolist() == reference_argmax_counts(w, slots_per_node)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32])
def test_dtypes(dtype):
    weight = (torch.arange(32).view(2, 16) % 7 + 1).to(dtype)  # [2, 16]
    out = greedy_rebalance_experts(weight, 24, 4, 2, 4)
    check_valid(weight, 24, 4, 2, 4, out)
    assert all(t.dtype == torch.int64 for t in out)


def test_all_zero_and_equal_counts():
    weight = torch.zeros(2, 8)
    out = greedy_rebalance_experts(weight, 16, 4, 2, 4)
    check_valid(weight, 16, 4, 2, 4, out)
    out = greedy_rebalance_experts(torch.rand(3, 8), 8, 2, 2, 4)  # R == E: one replica each
    assert (out[2] == 1).all()


@pytest.mark.parametrize(
    "weight,args,match",
    [
        (torch.ones(8), (8, 1, 1, 2), "2-D"),
        (torch.tensor([[1.0, float("nan")]]), (2, 1, 1, 1), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), (2, 1, 1, 1), "inf"),
        (torch.tensor([[1.0, -1.0]]), (2, 1, 1, 1), "negative"),
        (torch.ones(2, 8), (6, 1, 1, 2), "num_replicas=6"),
        (torch.ones(2, 8), (10, 1, 1, 4), "num_gpus=4"),
        (torch.ones(2, 8), (12, 2, 4, 6), "num_nodes=4"),
        (torch.ones(2, 8), (8, 0, 1, 2), "num_groups=0"),
    ],
)
def test_errors_name_the_bad_value(weight, args, match):
    with pytest.raises(ValueError, match=match):
        greedy_rebalance_experts(weight, *args)
