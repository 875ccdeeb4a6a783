"""Migration with the fresh plan as a candidate (solver/migration.py: ``migrate(..., fresh)``,
``FreshCandidate``; solver/budgets.py: ``hull_spend``; the dense ``overlap`` of solver/overlap.py):
taken only where it dominates the incremental plan, never over budget; total budgets spent along
each layer's upper hull."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.solver import rebalance_experts
from ray_eplb.solver.budgets import budget_per_layer, hull_spend
from ray_eplb.solver.migration import (
    FreshCandidate,
    align,
    incremental,
    migrate,
    moved_slots,
    peak_load,
)
from ray_eplb.solver.overlap import overlap
from ray_eplb.solver.plan_stats import plan_stats
from ray_eplb.solver.rebalance import _fresh

SETTINGS = settings(deadline=None)

# Incremental gets stuck here: the gainer (expert 0) may only replace the loser (expert 3) on a GPU
# without expert 0, and both GPUs holding 3 hold 0. The fresh plan {1,0} {3,0} {2,0} is 2 slots away.
W = np.array([[11.0, 7.0, 7.0, 7.0]])
OLD = np.array([[1, 2, 3, 0, 3, 0]])  # GPUs {1,2} {3,0} {3,0}: loads 14, 12.5, 12.5
FRESH = rebalance_experts(torch.from_numpy(W), 6, 1, 1, 3)[0].numpy()


def test_stuck_incremental_takes_the_fresh_plan():
    inc = incremental(W, OLD, 3, np.array([6]))
    assert peak_load(inc, W, 3)[0] == 12.5 and moved_slots(OLD, inc)[0] == 2
    new = migrate(W, OLD, 3, np.array([6]), None, 0.0, "hybrid_tail", FRESH)
    assert np.isclose(peak_load(new, W, 3)[0], 32 / 3) and moved_slots(OLD, new)[0] == 2
    assert sorted(map(sorted, new.reshape(3, 2).tolist())) == [[0, 1], [0, 2], [0, 3]]
    via = rebalance_experts(torch.from_numpy(W), 6, 1, 1, 3, old_phy2log=torch.from_numpy(OLD))[0].numpy()
    assert np.array_equal(via, new)


@pytest.mark.parametrize("budget", [0, 1, 2, 3])
def test_fresh_plan_never_breaks_the_budget(budget):
    new = migrate(W, OLD, 3, np.array([budget]), None, 0.0, "hybrid_tail", FRESH)
    assert moved_slots(OLD, new)[0] <= budget
    if budget >= 2:  # it fits: the 2-slot fresh plan
        assert np.isclose(peak_load(new, W, 3)[0], 32 / 3)


@pytest.mark.parametrize("total", [0, 1, 2, 4])
def test_fresh_plan_never_breaks_a_total_budget(total):
    w, old, fresh = np.repeat(W, 2, 0), np.repeat(OLD, 2, 0), np.repeat(FRESH, 2, 0)
    new = migrate(w, old, 3, np.array([6, 6]), total, 0.0, "hybrid_tail", fresh)
    assert moved_slots(old, new).sum() <= total
    assert np.isclose(peak_load(new, w, 3), 32 / 3).sum() == min(total // 2, 2)


def test_fresh_plan_with_more_moves_is_not_taken():
    # Equal peaks, the fresh plan moves more: the incremental plan (here: keep old) stays.
    w = np.array([[4.0, 3.0, 2.0, 1.0]])
    old = np.array([[0, 3, 1, 2]])  # 5, 5
    fresh = np.array([[1, 2, 0, 3]])  # 5, 5 as well; align puts it back on old's GPU sets
    assert np.array_equal(migrate(w, old, 2, np.array([4]), None, 0.0, "hybrid_tail", fresh), old)


def test_a_stacked_fresh_layer_is_never_a_candidate():
    w = np.array([[9.0, 1.0, 1.0], [9.0, 1.0, 1.0]])
    old = np.array([[0, 1, 0, 2], [0, 1, 0, 2]])
    fresh = np.array([[0, 0, 1, 2], [1, 0, 2, 0]])  # layer 0 doubles expert 0 up on GPU 0
    cand = FreshCandidate(old, fresh, w, 2)
    assert cand.ok.tolist() == [False, True]


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from(["auto", "global", "hierarchical"]), st.integers(1, 3),
       st.sampled_from([(8, 2, 2, 4), (12, 3, 1, 3), (16, 4, 2, 4), (6, 2, 2, 2)]), st.integers(1, 4))
def test_the_solve_s_own_peak_and_spread_give_the_recounted_statistics(seed, policy, num_layers, dims, slots):
    """``migrate`` passes the fresh solve's peak and which layers it solved globally instead of
    recounting them: the candidate's statistics must be what a recount gives (counts and caps
    exactly, the peak within rounding), also where an expert has more replicas than GPUs (a hot
    expert) and on hierarchical layers (recounted)."""
    num_experts, num_groups, num_nodes, num_gpus = dims
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 40, (num_layers, num_experts)).astype(float)
    w[:, 0] *= rng.integers(1, 30)  # often hot enough for more replicas than GPUs
    num_slots = num_gpus * max(slots, -(-num_experts // num_gpus))
    hier_ok = num_experts % num_groups == 0 and num_groups % num_nodes == 0
    fresh, peak, spread = _fresh(w, num_slots, num_groups, num_nodes, num_gpus, policy, "hybrid_tail", hier_ok)
    old = rebalance_experts(torch.from_numpy(rng.integers(0, 40, w.shape).astype(float)), num_slots, 1, 1, num_gpus)[0]
    known = FreshCandidate(old.numpy(), fresh, w, num_gpus, known=(peak, spread))
    cnt, want_peak, dups, ok = plan_stats(fresh, w, num_gpus, dups=True, cap=True)
    assert np.array_equal(known.cnt, cnt) and np.array_equal(known.dups, dups) and np.array_equal(known.ok, ok)
    np.testing.assert_allclose(known.peak, want_peak, rtol=1e-12, atol=1e-12)
    if policy == "global" or num_nodes == 1:  # (one node: the hierarchical plan is the global one)
        assert spread.all()
    elif policy == "hierarchical":
        assert not spread.any()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(2, 8), st.integers(1, 4), st.integers(1, 3),
       st.one_of(st.none(), st.integers(0, 6), st.sampled_from([0.25, 0.5])))
def test_result_is_never_dominated_by_the_aligned_fresh_plan(seed, num_layers, num_experts, num_gpus, slots,
                                                             max_moves):
    """Per layer, the aligned fresh plan is never both no worse in peak and no more in moves than
    the result (and better in one); with no budget this covers "never predicted worse at equal
    or fewer moves"."""
    rng = np.random.default_rng(seed)
    num_slots = num_gpus * max(slots, -(-num_experts // num_gpus))
    w_old, w = (torch.from_numpy(rng.integers(0, 50, (num_layers, num_experts)).astype(float)) for _ in range(2))
    old = rebalance_experts(w_old, num_slots, 1, 1, num_gpus)[0].numpy()
    new = rebalance_experts(w, num_slots, 1, 1, num_gpus, old_phy2log=torch.from_numpy(old),
                            max_moves=max_moves)[0].numpy()
    cand = align(old, rebalance_experts(w, num_slots, 1, 1, num_gpus)[0].numpy(), 1, num_gpus)
    p_new, p_cand = peak_load(new, w.numpy(), num_gpus), peak_load(cand, w.numpy(), num_gpus)
    m_new, m_cand = moved_slots(old, new), moved_slots(old, cand)
    budget, _ = budget_per_layer(max_moves, num_layers, num_slots, "layer")
    assert (m_new <= budget).all()
    lower = p_cand < p_new * (1 - 1e-9)
    no_higher = lower | (p_cand <= p_new * (1 + 1e-9))
    assert not (no_higher & (m_cand <= m_new) & (lower | (m_cand < m_new))).any(), (p_new, p_cand, m_new, m_cand)


# ------------------------------------------------------------------------------------- hull_spend
def test_hull_spend_skips_a_level_without_gain():
    # Layer 0: 1 slot gains nothing, 2 slots gain 5. A greedy that needs every level in turn
    # would stop at the first; the hull goes from nothing straight to 2 slots.
    gains = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 1.0]])
    moved = np.array([[0, 0], [1, 1], [2, 1]])
    assert hull_spend(gains, moved, 2).tolist() == [2, 0]
    assert hull_spend(gains, moved, 3).tolist() == [2, 1]


def test_hull_spend_handles_plans_out_of_move_order():
    # Plan 2 moves fewer slots than plan 1 and gains more (a fresh plan that dominates).
    gains = np.array([[0.0], [2.0], [3.0], [3.5]])
    moved = np.array([[0], [4], [3], [8]])
    assert hull_spend(gains, moved, 3).tolist() == [2]
    assert hull_spend(gains, moved, 7).tolist() == [2]  # the next step costs 5 more
    assert hull_spend(gains, moved, 8).tolist() == [3]


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 6), st.integers(0, 40))
def test_hull_spend_stays_within_the_total(seed, num_plans, num_layers, total):
    rng = np.random.default_rng(seed)
    moved = np.vstack([np.zeros((1, num_layers), int), rng.integers(0, 12, (num_plans, num_layers))])
    gains = np.vstack([np.zeros((1, num_layers)), rng.random((num_plans, num_layers)) * moved[1:]])
    layers = np.arange(num_layers)
    at = hull_spend(gains, moved, total)
    assert moved[at, layers].sum() <= total
    assert (gains[at, layers] >= 0).all()
    # Enough for everything: every layer gets its highest gain.
    rich = hull_spend(gains, moved, int(moved.max(0).sum()))
    assert np.allclose(gains[rich, layers], gains.max(0))


# ------------------------------------------------------------------------------------------ overlap
def test_overlap_mixes_sets_and_multisets_row_by_row():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, (5, 3, 4)), rng.integers(0, 2, (5, 3, 4))
    a[1, 0, 2], b[3, 2, 0] = 3, 2  # two rows hold an expert twice in a bin
    want = np.minimum(a[:, :, None, :], b[:, None, :, :]).sum(-1)
    assert np.array_equal(overlap(a, b), want)
    assert np.array_equal(overlap(a[None], b[None])[0], want)
    # Leading axes broadcast (align's node pairs): [5, 1, 3, 4] x [1, 5, 3, 4] -> [5, 5, 3, 3].
    pairs = overlap(a[:, None], b[None])
    assert pairs.shape == (5, 5, 3, 3)
    assert np.array_equal(pairs, np.minimum(a[:, None, :, None, :], b[None, :, None, :, :]).sum(-1))
