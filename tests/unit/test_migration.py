"""Migration-aware placement (solver/migration.py through rebalance_experts): maximal overlap on
constructed cases, budgets, hysteresis, validity. Error paths: test_migration_errors.py."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.controller.bench.workload import synthetic_trace
from ray_eplb.solver import balancedness, rebalance_experts
from ray_eplb.solver.budgets import budget_per_layer
from ray_eplb.solver.maps import logical_maps_np
from ray_eplb.solver.migration import (
    align,
    incremental,
    keep_slots,
    migrate,
    moved_slots,
    peak_load,
)

SETTINGS = settings(deadline=None)  # max_examples from the active profile (default 100)


# ----------------------------------------------------------------------------------------- helpers
def _weights(rng: np.random.Generator, num_layers: int, num_experts: int) -> torch.Tensor:
    """``[L, E]`` skewed loads with some zeros and ties (integer token counts)."""
    w = np.floor(rng.pareto(1.2, (num_layers, num_experts)) * 20)
    w[rng.random(w.shape) < 0.1] = 0
    return torch.from_numpy(w)


def _random_placement(rng: np.random.Generator, num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """``[L, R]``: every expert once, the rest random (duplicates on a GPU allowed)."""
    rows = []
    for _ in range(num_layers):
        row = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
        rows.append(rng.permutation(row))
    return np.stack(rows).astype(np.int64)


def _permute(p: np.ndarray, rng: np.random.Generator, num_nodes: int, num_gpus: int) -> np.ndarray:
    """A relabelled copy of ``p [L, R]``: nodes permuted, GPUs within nodes, slots within GPUs (per layer)."""
    num_layers, num_slots = p.shape
    g, s = num_gpus // num_nodes, num_slots // num_gpus
    out = []
    for row in p.reshape(num_layers, num_nodes, g, s):
        row = row[rng.permutation(num_nodes)]
        row = np.stack([node[rng.permutation(g)] for node in row])
        out.append(np.stack([[gpu[rng.permutation(s)] for gpu in node] for node in row]).reshape(num_slots))
    return np.stack(out)


def _gpu_multisets(p: np.ndarray, num_gpus: int) -> list[list[tuple]]:
    """Per layer, the sorted list of GPUs' sorted expert tuples (the placement up to relabelling)."""
    return [sorted(tuple(sorted(g)) for g in row.reshape(num_gpus, -1)) for row in p]


def _counts(p: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` replicas per expert."""
    return np.stack([np.bincount(row, minlength=num_experts) for row in p])


def _avoidable_duplicates(p: np.ndarray, num_experts: int, num_gpus: int) -> int:
    """Surplus replicas sharing a GPU beyond ``sum max(0, count - GPUs)`` (any GPU may hold any expert)."""
    srt = np.sort(p.reshape(p.shape[0], num_gpus, -1), axis=-1)
    dups = int((srt[..., 1:] == srt[..., :-1]).sum())
    return dups - int(np.clip(_counts(p, num_experts) - num_gpus, 0, None).sum())


def _check_valid(phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_experts: int) -> None:
    p = phy2log.numpy()
    assert phy2log.dtype == torch.int64 and p.min() >= 0 and p.max() < num_experts
    assert (_counts(p, num_experts) >= 1).all(), "an expert lost its last slot"
    want_l2p, want_cnt = logical_maps_np(p, num_experts)
    assert np.array_equal(logcnt.numpy(), want_cnt) and np.array_equal(log2phy.numpy(), want_l2p)


@st.composite
def problems(draw, max_layers: int = 4, max_experts: int = 12, max_gpus: int = 6, max_slots: int = 5):
    """``(w [L, E], old [L, R] from a fresh global solve on other loads, R, P, rng)``."""
    seed = draw(st.integers(0, 2**32 - 1))
    num_layers = draw(st.integers(1, max_layers))
    num_experts = draw(st.integers(1, max_experts))
    num_gpus = draw(st.integers(1, max_gpus))
    slots = draw(st.integers(max(1, -(-num_experts // num_gpus)), max(max_slots, -(-num_experts // num_gpus))))
    rng = np.random.default_rng(seed)
    num_slots = num_gpus * slots
    old = rebalance_experts(_weights(rng, num_layers, num_experts), num_slots, 1, 1, num_gpus, policy="global")[0]
    return _weights(rng, num_layers, num_experts), old.numpy(), num_slots, num_gpus, rng


# ------------------------------------------------------------------------------ align: maximal overlap
@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 1), (1, 4), (2, 4), (3, 6), (4, 8)]), st.integers(1, 4),
       st.booleans())
def test_align_undoes_a_relabelling(seed, nodes_gpus, slots, solved):
    """A permuted copy of a placement (nodes, GPUs within nodes, slots within GPUs) moves 0 slots."""
    num_nodes, num_gpus = nodes_gpus
    rng = np.random.default_rng(seed)
    num_slots, num_experts = num_gpus * slots, max(1, num_gpus * slots - int(rng.integers(0, 4)))
    if solved:  # a real plan: duplicate-free where possible
        old = rebalance_experts(_weights(rng, 3, num_experts), num_slots, 1, 1, num_gpus)[0].numpy()
    else:  # any placement, duplicates on a GPU included (told apart by occurrence)
        old = _random_placement(rng, 3, num_experts, num_slots)
    new = _permute(old, rng, num_nodes, num_gpus)
    assert np.array_equal(align(old, new, num_nodes, num_gpus), old)
    if num_nodes > 1:  # GPUs free to move across nodes: also found
        flat = _permute(old, rng, 1, num_gpus)
        assert np.array_equal(align(old, flat, 1, num_gpus), old)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 2), (1, 3), (1, 4), (2, 4), (2, 2)]), st.integers(1, 3))
def test_align_keeps_every_gpu_set_and_node(seed, nodes_gpus, slots):
    """The result is ``new`` relabelled: the same GPU sets on the same node sets (so the same balance)."""
    num_nodes, num_gpus = nodes_gpus
    rng = np.random.default_rng(seed)
    num_slots = num_gpus * slots
    num_experts = int(rng.integers(1, num_slots + 1))
    old, new = (_random_placement(rng, 2, num_experts, num_slots) for _ in range(2))
    out = align(old, new, num_nodes, num_gpus)
    assert _gpu_multisets(out, num_gpus) == _gpu_multisets(new, num_gpus)
    per_node = num_gpus // num_nodes
    nodes = lambda p: [sorted(tuple(sorted(_gpu_multisets(n.reshape(1, -1), per_node)[0]))  # noqa: E731
                              for n in row.reshape(num_nodes, -1)) for row in p]
    assert nodes(out) == nodes(new)


def _best_kept(old: np.ndarray, new: np.ndarray, num_nodes: int, num_gpus: int) -> int:
    """Brute force: most slots any node/GPU relabelling of ``new`` (slots kept where possible) keeps."""
    num_slots = new.shape[1]
    g, s = num_gpus // num_nodes, num_slots // num_gpus
    blocks = new.reshape(num_nodes, g, s)
    best = 0
    for node_perm in itertools.permutations(range(num_nodes)):
        for gpu_perms in itertools.product(*[list(itertools.permutations(range(g)))] * num_nodes):
            cand = np.stack([blocks[n][list(p)] for n, p in zip(node_perm, gpu_perms)]).reshape(-1, s)
            kept = num_slots - int(moved_slots(old.reshape(-1, s), keep_slots(old.reshape(-1, s), cand)).sum())
            best = max(best, kept)
    return best


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(1, 3))
def test_align_is_maximal_on_one_node(seed, num_gpus, slots):
    """With GPUs free to move, align keeps as many slots as the best of all GPU permutations."""
    rng = np.random.default_rng(seed)
    num_slots = num_gpus * slots
    num_experts = int(rng.integers(1, num_slots + 1))
    old, new = (_random_placement(rng, 1, num_experts, num_slots) for _ in range(2))
    kept = num_slots - int(moved_slots(old, align(old, new, 1, num_gpus))[0])
    assert kept == _best_kept(old, new, 1, num_gpus)


def test_align_is_maximal_across_nodes():
    old = np.array([[0, 3, 7, 5, 6, 2, 1, 4]])  # node 0: GPUs {0,3} {7,5}; node 1: {6,2} {1,4}
    new = np.array([[1, 4, 0, 5, 2, 7, 3, 6]])  # node 0: {1,4} {0,5};   node 1: {2,7} {3,6}
    assert _best_kept(old, new, 2, 4) == 4
    assert 8 - int(moved_slots(old, align(old, new, 2, 4))[0]) == 4


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([(32, 8, 2, 8), (24, 4, 2, 4), (18, 2, 2, 6), (16, 4, 1, 4)]))
def test_hierarchical_with_a_relabelled_old_moves_nothing(seed, shape):
    """rebalance_experts(hierarchical, old=a relabelling of its own fresh plan) returns that old plan."""
    rng = np.random.default_rng(seed)
    num_slots, num_groups, num_nodes, num_gpus = shape
    w = _weights(rng, 3, 16)
    fresh = rebalance_experts(w, num_slots, num_groups, num_nodes, num_gpus, policy="hierarchical")[0].numpy()
    old = _permute(fresh, rng, num_nodes, num_gpus)
    out = rebalance_experts(w, num_slots, num_groups, num_nodes, num_gpus, policy="hierarchical",
                            old_phy2log=torch.from_numpy(old))[0].numpy()
    assert np.array_equal(out, old)


# --------------------------------------------------------------------- incremental: moves only what pays
@pytest.mark.parametrize("policy", ["global", "auto"])
def test_incremental_on_the_load_it_was_solved_for_moves_little(policy):
    w = synthetic_trace(1, 8, 64, seed=3).load[0]  # [8, 64]
    for shape in ((288, 8, 4, 32), (72, 8, 2, 8)):
        old, _, _ = rebalance_experts(w, *shape, policy=policy)
        new, _, _ = rebalance_experts(w, *shape, old_phy2log=old, policy=policy)
        assert (old != new).double().mean() <= 0.2
        p_old, p_new = peak_load(old.numpy(), w.numpy(), shape[3]), peak_load(new.numpy(), w.numpy(), shape[3])
        assert (p_new <= p_old + 1e-9).all()
        # What it moves buys little: 5% hysteresis keeps every layer.
        kept, _, _ = rebalance_experts(w, *shape, old_phy2log=old, policy=policy, min_gain=0.05)
        assert torch.equal(kept, old)


def test_incremental_with_the_same_counts_and_balanced_gpus_moves_nothing():
    w = np.array([[4.0, 3.0, 2.0, 1.0]])
    old = np.array([[0, 3, 1, 2]])  # GPU loads 5 and 5: already optimal, counts all 1
    assert np.array_equal(incremental(w, old, 2, np.array([8])), old)


@SETTINGS
@given(problems(), st.one_of(st.integers(0, 12), st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0])),
       st.sampled_from(["layer", "total"]), st.sampled_from(["global", "auto"]))
def test_budget_is_never_exceeded(prob, max_moves, scope, policy):
    w, old, num_slots, num_gpus, _ = prob
    num_layers = w.shape[0]
    out = rebalance_experts(w, num_slots, 1, 1, num_gpus, policy=policy, old_phy2log=torch.from_numpy(old),
                            max_moves=max_moves, budget_scope=scope)
    moved = moved_slots(old, out[0].numpy())
    if isinstance(max_moves, float):
        # a positive fraction rounds up: at least one slot may move
        per, total = math.ceil(max_moves * num_slots - 1e-9), math.ceil(max_moves * num_slots * num_layers - 1e-9)
    else:
        per = total = max_moves
    if scope == "layer":
        assert (moved <= per).all(), (moved, per)
    else:
        assert moved.sum() <= total, (moved, total)
    _check_valid(*out, w.shape[1])


def test_zero_budget_keeps_the_old_placement():
    rng = np.random.default_rng(0)
    w, other = _weights(rng, 3, 8), _weights(rng, 3, 8)
    old = rebalance_experts(other, 16, 1, 1, 4)[0]
    for scope in ("layer", "total"):
        assert torch.equal(rebalance_experts(w, 16, 1, 1, 4, old_phy2log=old, max_moves=0, budget_scope=scope)[0], old)


def test_total_budget_goes_to_the_layer_that_gains_most():
    # Layer 0 is already balanced; layer 1 has both hot experts on GPU 0. Two slot changes in total.
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    old = torch.tensor([[0, 3, 1, 2], [0, 1, 2, 3]])
    out = rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old, max_moves=2, budget_scope="total")[0]
    assert torch.equal(out[0], old[0])
    assert moved_slots(old.numpy(), out.numpy()).tolist() == [0, 2]
    assert peak_load(out.numpy()[1:], w.numpy()[1:], 2)[0] == 5.0


@SETTINGS
@given(problems(), st.one_of(st.none(), st.integers(1, 8), st.sampled_from([0.1, 0.25, 1.0])),
       st.sampled_from([0.0, 0.01, 0.05, 0.2]))
def test_changed_layers_gain_at_least_min_gain_per_layer_scope(prob, max_moves, min_gain):
    """Hysteresis: a layer that changes lowers its peak by more than ``min_gain`` (relative)."""
    w, old, num_slots, num_gpus, _ = prob
    new = rebalance_experts(w, num_slots, 1, 1, num_gpus, old_phy2log=torch.from_numpy(old), max_moves=max_moves,
                            min_gain=min_gain)[0].numpy()
    changed = moved_slots(old, new) > 0
    p_old, p_new = peak_load(old, w.numpy(), num_gpus), peak_load(new, w.numpy(), num_gpus)
    assert (p_old - p_new > min_gain * p_old)[changed].all()
    assert (p_new <= p_old).all()


def test_changed_layers_gain_total_scope():
    w = torch.tensor([[45.0, 3.0, 36.0]])
    old = torch.tensor([[1, 2, 1, 0, 1, 0]])  # GPUs {1,2} {1,0} {1,0}: loads 1 + 36, 1 + 22.5, 1 + 22.5
    # One slot: 1 -> 2 on GPU 1 gives {1,2} {2,0} {1,0}: 1.5 + 18, 18 + 22.5 = 40.5 (worse), 24.
    new = rebalance_experts(w, 6, 1, 1, 3, old_phy2log=old, max_moves=1, budget_scope="total")[0]
    p_old, p_new = peak_load(old.numpy(), w.numpy(), 3), peak_load(new.numpy(), w.numpy(), 3)
    assert torch.equal(new, old) or (p_new < p_old).all(), (new.tolist(), p_old, p_new)


def test_total_budget_does_at_least_as_well_as_the_same_budget_per_layer():
    load = synthetic_trace(3, 8, 64, top_k=6, seed=0, drift=0.5).load  # [3, 8, 64]
    shape, num_gpus = (144, 8, 2, 16), 16
    old = rebalance_experts(load[0], *shape)[0]
    # The same number of slots: 7 per layer, or 56 over the 8 layers.
    layer = rebalance_experts(load[2], *shape, old_phy2log=old, max_moves=7, budget_scope="layer")
    total = rebalance_experts(load[2], *shape, old_phy2log=old, max_moves=56, budget_scope="total")
    assert (total[0] != old).sum() <= 56
    assert balancedness(total[0], total[2], load[2], num_gpus) >= balancedness(layer[0], layer[2], load[2], num_gpus)


def test_hysteresis_keeps_a_layer_that_gains_little_and_moves_one_that_gains_much():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [10.0, 9.6, 9.8, 10.4], [4.0, 3.0, 2.0, 1.0]])
    old = torch.tensor([[0, 3, 1, 2],    # GPU loads 5, 5: nothing to gain
                        [0, 1, 2, 3],    # 19.6, 20.2: {0,2} {1,3} gives 19.8, 20.0 (-1%)
                        [0, 1, 2, 3]])   # 7, 3: {0,3} {1,2} gives 5, 5 (-29%)
    out = rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old, min_gain=0.05)[0]
    assert torch.equal(out[:2], old[:2]) and not torch.equal(out[2], old[2])
    eager = rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old)[0]  # min_gain 0: the 1% is taken
    assert torch.equal(eager[0], old[0]) and moved_slots(old.numpy(), eager.numpy())[1:].tolist() == [2, 2]
    everything = rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old, min_gain=0.99)[0]
    assert torch.equal(everything, old)


@pytest.mark.parametrize("policy", ["auto", "global", "hierarchical"])
def test_high_min_gain_keeps_everything(policy):
    rng = np.random.default_rng(5)
    w = _weights(rng, 4, 16)
    old = rebalance_experts(_weights(rng, 4, 16), 32, 4, 2, 8, policy=policy)[0]
    assert torch.equal(rebalance_experts(w, 32, 4, 2, 8, policy=policy, old_phy2log=old, min_gain=0.999)[0], old)


def _stacked_beyond(old: np.ndarray, new: np.ndarray, num_experts: int, num_gpus: int) -> int:
    """Replicas ``new`` stacks on a GPU beyond what ``old`` had there, one copy, and its cap ``ceil(c/P)``."""
    num_layers = new.shape[0]
    per_gpu = lambda p: np.stack([[np.bincount(g, minlength=num_experts) for g in row.reshape(num_gpus, -1)]  # noqa: E731
                                  for row in p])  # [L, P, E]
    cap = -(-_counts(new, num_experts) // num_gpus)  # [L, E]
    allowed = np.maximum(np.maximum(per_gpu(old), 1), cap.reshape(num_layers, 1, num_experts))
    return int(np.clip(per_gpu(new) - allowed, 0, None).sum())


@SETTINGS
@given(problems(), st.one_of(st.none(), st.integers(0, 10), st.sampled_from([0.1, 0.5, 1.0])),
       st.sampled_from(["layer", "total"]), st.sampled_from(["global", "auto"]))
def test_results_are_valid_and_stack_nothing_new(prob, max_moves, scope, policy):
    """Valid maps; no expert put on a GPU that holds it already (beyond its cap); where no expert
    has more replicas than GPUs, before or after, no GPU holds two copies of one expert."""
    w, old, num_slots, num_gpus, _ = prob
    num_experts = w.shape[1]
    out = rebalance_experts(w, num_slots, 1, 1, num_gpus, policy=policy, old_phy2log=torch.from_numpy(old),
                            max_moves=max_moves, budget_scope=scope)
    _check_valid(*out, num_experts)
    new = out[0].numpy()
    assert _stacked_beyond(old, new, num_experts, num_gpus) == 0
    if max(_counts(old, num_experts).max(), _counts(new, num_experts).max()) <= num_gpus:
        assert _avoidable_duplicates(new, num_experts, num_gpus) == 0


def test_thinning_a_stacked_expert_leaves_no_avoidable_duplicate():
    w = torch.tensor([[189.0, 0.0, 289.0, 0.0]])
    old = torch.tensor([[0, 0, 1, 3, 0, 1, 1, 2, 0, 1, 1, 1, 1, 0, 1, 1]])  # a fresh global plan of other loads
    assert _avoidable_duplicates(old.numpy(), 4, 4) == 0
    new = rebalance_experts(w, 16, 1, 1, 4, old_phy2log=old)[0]
    assert _avoidable_duplicates(new.numpy(), 4, 4) == 0, new.view(4, 4).tolist()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 10), st.integers(1, 5), st.integers(1, 4))
def test_any_valid_old_gives_a_valid_result(seed, num_layers, num_experts, num_gpus, slots):
    """Even an old placement with duplicates on GPUs (e.g. from another solver) gives a valid map."""
    rng = np.random.default_rng(seed)
    num_slots = num_gpus * max(slots, -(-num_experts // num_gpus))
    old = _random_placement(rng, num_layers, num_experts, num_slots)
    w = _weights(rng, num_layers, num_experts)
    for kwargs in ({}, {"max_moves": 0.25}, {"max_moves": 3, "budget_scope": "total"}, {"min_gain": 0.1}):
        out = rebalance_experts(w, num_slots, 1, 1, num_gpus, old_phy2log=torch.from_numpy(old), **kwargs)
        _check_valid(*out, num_experts)
        assert _stacked_beyond(old, out[0].numpy(), num_experts, num_gpus) == 0


def test_old_placement_on_the_weight_device_and_dtype():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float16)
    old = np.array([[0, 1, 2, 3]], dtype=np.int32)  # numpy, int32: accepted
    phy2log, log2phy, logcnt = rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert peak_load(phy2log.numpy(), w.double().numpy(), 2)[0] == 5.0


# ----------------------------------------------------------------------------- helpers of the module
def test_peak_load_and_moved_slots_by_hand():
    p = np.array([[0, 1, 0, 2], [0, 1, 2, 3]])
    w = np.array([[4.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 5.0]])
    # Layer 0: expert 0 split in two -> GPU loads 2 + 3, 2 + 1. Layer 1: 2, 6.
    assert peak_load(p, w, 2).tolist() == [5.0, 6.0]
    assert moved_slots(p, p[:, ::-1]).tolist() == [4, 4]
    assert moved_slots(p, p).tolist() == [0, 0]


@pytest.mark.parametrize("max_moves,scope,per,total", [
    (None, "layer", [8, 8, 8], None), (None, "total", [8, 8, 8], None), (3, "layer", [3, 3, 3], None),
    (3, "total", [8, 8, 8], 3), (0.25, "layer", [2, 2, 2], None), (0.25, "total", [8, 8, 8], 6),
    (1.0, "layer", [8, 8, 8], None), (np.int64(2), "layer", [2, 2, 2], None),
    (np.float32(0.5), "total", [8, 8, 8], 12),
])
def test_budget_per_layer(max_moves, scope, per, total):
    b, t = budget_per_layer(max_moves, 3, 8, scope)
    assert b.tolist() == per and t == total


def test_migrate_direct_call_matches_rebalance():
    rng = np.random.default_rng(9)
    w = _weights(rng, 3, 8)
    old = rebalance_experts(_weights(rng, 3, 8), 16, 1, 1, 4)[0]
    b, t = budget_per_layer(0.25, 3, 16, "layer")
    fresh = rebalance_experts(w, 16, 1, 1, 4)[0].numpy()  # rebalance_experts offers its fresh plan too
    direct = migrate(w.numpy(), old.numpy(), 4, b, t, 0.0, "hybrid_tail", fresh)
    via = rebalance_experts(w, 16, 1, 1, 4, old_phy2log=old, max_moves=0.25)[0].numpy()
    assert np.array_equal(direct, via)
