"""The migration-aware path's stages: batch relocations (solver/relocate.py), swaps aimed at the
fresh plan's peak (solver/peaks.py), the compiled kept-slots bound (solver/overlap.py), the
no-move exit. Each compiled kernel and its numpy fallback are checked on the same properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ray_eplb.solver.incremental as incremental_mod
import ray_eplb.solver.migrate_compiled as migrate_compiled_mod
import ray_eplb.solver.overlap as overlap_mod
import ray_eplb.solver.peaks as peaks_mod
from ray_eplb.controller.bench.workload import synthetic_trace
from ray_eplb.solver import balancedness, rebalance_experts
from ray_eplb.solver.baseline import greedy_rebalance_experts
from ray_eplb.solver.maps import avoidable_duplicates_np, bin_counts, per_slot
from ray_eplb.solver.migration import align, moved_slots

PATHS = ["kernel", "numpy"] if peaks_mod.peaks_kernel is not None else ["numpy"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test with the compiled kernels, and again with the numpy fallbacks."""
    if request.param == "numpy":
        monkeypatch.setattr(peaks_mod, "peaks_kernel", None)
        monkeypatch.setattr(incremental_mod, "relocate_kernel", None)
        monkeypatch.setattr(incremental_mod, "repair_kernel", None)
        monkeypatch.setattr(overlap_mod, "kept_kernel", None)
        monkeypatch.setattr(migrate_compiled_mod, "_kernel", None)  # (it calls the kernels above itself)
    return request.param


def _problem(seed: int, num_layers: int, num_experts: int, num_gpus: int, slots: int):
    """Skewed loads ``w [L, E]`` and a random valid plan ``[L, P, S]`` (every expert at least once)."""
    rng = np.random.default_rng(seed)
    w = np.floor(rng.pareto(1.1, (num_layers, num_experts)) * 50) + 1
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(0, num_experts, num_gpus * slots - num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    return w, np.stack(rows).reshape(num_layers, num_gpus, slots).astype(np.int64)


def _over_cap(own: np.ndarray, cnt: np.ndarray) -> int:
    """Copies of an expert on a GPU beyond ``ceil(count / P)``, summed (``own [L, P, S]``)."""
    held = bin_counts(own.reshape(own.shape[0], -1), own.shape[1], cnt.shape[1])
    return int(np.maximum(held - -(-cnt[:, None, :] // own.shape[1]), 0).sum())


@pytest.mark.parametrize("seed", range(6))
def test_goal_swaps_keep_budget_caps_and_never_raise_the_peak(path, seed):
    w, own = _problem(seed, 5, 12, 6, 3)
    num_layers, num_experts = w.shape
    # Spread the plan first so caps hold, then ask for a peak below what it has.
    cnt = bin_counts(own.reshape(num_layers, -1), 1, num_experts)[:, 0]
    per = w / cnt
    before = per_slot(per, own).sum(-1)  # [L, P]
    start_over = _over_cap(own, cnt)
    goal = before.mean(1)
    for allowed in (0, 1, 2, 5, 100):
        budget = np.full(num_layers, allowed, dtype=np.int64)
        out = peaks_mod.lower_peaks(own, w, cnt, goal, budget, 64, own)
        moved = (out != own).reshape(num_layers, -1).sum(1)
        assert (moved <= allowed).all() and (budget >= 0).all()
        assert (allowed - budget >= moved).all()  # what it paid covers what it changed
        after = per_slot(per, out).sum(-1)
        assert (after.max(1) <= before.max(1) + 1e-9).all()
        assert _over_cap(out, cnt) <= start_over
        assert np.array_equal(bin_counts(out.reshape(num_layers, -1), 1, num_experts)[:, 0], cnt)


def test_goal_swaps_reach_a_goal_one_swap_away(path):
    # Two GPUs evened by one swap: [9, 5] and [1, 5] -> peak 14 -> 10 after swapping 9 for a 5.
    own = np.array([[[0, 2], [1, 3]]])
    per = np.array([[9.0, 1.0, 5.0, 5.0]])  # one replica each: the load is the replica's
    budget = np.array([10])
    out = peaks_mod.lower_peaks(own, per, np.ones((1, 4), dtype=np.int64), np.array([10.0]), budget, 8, own)
    assert per_slot(per, out).sum(-1).max() == pytest.approx(10.0)
    assert (out != own).sum() == 2 and budget[0] == 8


@pytest.mark.parametrize("lights", [1, 3])
@pytest.mark.parametrize("fix", [False, True])
def test_goal_swaps_take_the_first_of_equal_best_pairs(path, lights, fix):
    """Every pair of the heavy GPU's replicas with a light GPU's evens the two equally: the swap
    taken is the first pair in slot order (the heavy GPU's first replica, the lightest GPU's
    first replica), on the compiled path (without a fixing preference: one scoring pass, then
    the first pair at the max; with it: running selects) and the numpy one (a row-major argmax)."""
    num_bins = 1 + lights
    own = np.arange(2 * num_bins).reshape(1, num_bins, 2)  # GPU 0 heavy, the others light
    per = np.full((1, 2 * num_bins), 2.0)
    per[0, :2] = 6.0  # GPU 0: 12; each light GPU: 4
    budget = np.array([100])  # no budget binds
    out = peaks_mod.lower_peaks(own, per, np.ones((1, 2 * num_bins), dtype=np.int64), np.array([8.0]), budget, 8, own,
                                np.array([fix]))
    want = own.copy()
    want[0, 0, 0], want[0, 1, 0] = own[0, 1, 0], own[0, 0, 0]
    assert np.array_equal(out, want)
    assert budget[0] == 98


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slots", [1, 3])
def test_relocations_reach_the_target_counts_within_the_budget(path, seed, slots):
    num_gpus = 12 if slots == 1 else 8
    w, own = _problem(seed, 4, 10, num_gpus, slots)
    num_layers, num_experts = w.shape
    flat = own.reshape(num_layers, -1)
    cnt = bin_counts(flat, 1, num_experts)[:, 0]
    target = bin_counts(_problem(seed + 100, 4, 10, num_gpus, slots)[1].reshape(num_layers, -1), 1, num_experts)[:, 0]
    need = np.maximum(target - cnt, 0).sum(1)  # [L] relocations to the target
    for allowed in (0, 1, 3, 1000):
        o, c = own.copy(), cnt.copy()
        budget = np.full(num_layers, allowed, dtype=np.int64)
        incremental_mod.relocate(w, o, c, target, budget)
        moved = (o != own).reshape(num_layers, -1).sum(1)
        assert np.array_equal(c, bin_counts(o.reshape(num_layers, -1), 1, num_experts)[:, 0])
        assert (moved == allowed - budget).all() and (moved <= np.minimum(need, allowed)).all()
        assert (c >= 1).all()
        # every relocation takes a replica from an expert above its target to one below it
        assert (np.abs(c - target).sum(1) == np.abs(cnt - target).sum(1) - 2 * moved).all()
        if slots == 1 and allowed >= need.max():  # nothing blocks a relocation: the target is reached
            assert np.array_equal(c, target)
        if slots > 1:
            assert _over_cap(o, c) <= _over_cap(own, c) + _over_cap(own, cnt)


@pytest.mark.skipif(incremental_mod.relocate_kernel is None, reason="numba not installed")
@pytest.mark.parametrize("seed", range(8))
def test_compiled_relocations_equal_the_numpy_rule_with_tied_loads(seed):
    """The kernel keeps its gainers and losers sorted instead of scanning them: each pick (the
    highest gain quotient, the lowest loss quotient, ties to the lower expert) and each GPU must
    still be the numpy rule's, one relocation at a time. Loads of few distinct values make ties."""
    rng = np.random.default_rng(seed)
    num_layers, num_experts, num_gpus, slots = 6, 24, 8, 4
    _, own = _problem(seed, num_layers, num_experts, num_gpus, slots)
    w = rng.integers(1, 4, (num_layers, num_experts)).astype(np.float64) * 10
    flat = own.reshape(num_layers, -1)
    cnt = bin_counts(flat, 1, num_experts)[:, 0]
    target = bin_counts(_problem(seed + 50, num_layers, num_experts, num_gpus, slots)[1].reshape(num_layers, -1), 1,
                        num_experts)[:, 0]
    assert np.abs(target - cnt).sum(1).max() // 2 <= 8 * incremental_mod.BATCHES  # one at a time in numpy too
    for allowed in (2, 5, 1000):
        outs = []
        for fn in (incremental_mod.relocate_kernel, incremental_mod._relocate):
            o, c, b = own.copy(), cnt.copy(), np.full(num_layers, allowed, dtype=np.int64)
            fn(w, o, c, target, b)
            outs.append((o, c, b))
        assert (outs[0][0] != own).any()
        for a, b in zip(*outs):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("num_gpus,slots", [(8, 3), (16, 1)])
def test_the_no_move_exit_returns_the_old_plan_unchanged(num_gpus, slots):
    load = synthetic_trace(2, 4, 16, top_k=4, seed=1).load
    args = (num_gpus * slots, 1, 1, num_gpus)
    fresh = rebalance_experts(load[1], *args)[0]
    kept = fresh.clone()
    out = rebalance_experts(load[1], *args, old_phy2log=fresh)[0]
    assert torch.equal(out, kept) and torch.equal(fresh, kept)
    assert not np.shares_memory(out.numpy(), fresh.numpy())  # a new tensor, the caller's is untouched
    if slots == 1:  # same counts on other GPUs: nothing pays, the old plan is kept as it is
        old = fresh[:, torch.randperm(fresh.shape[1], generator=torch.Generator().manual_seed(0))]
        assert torch.equal(rebalance_experts(load[1], *args, old_phy2log=old)[0], old)


@pytest.mark.parametrize("seed", range(40))
def test_compiled_kept_bound_equals_the_dense_overlaps(seed):
    if overlap_mod.kept_kernel is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(seed)
    k, m, s, e = 3, int(rng.integers(2, 9)), int(rng.integers(1, 5)), int(rng.integers(3, 12))
    old, new = rng.integers(0, e, (k, m, s)), rng.integers(0, e, (k, m, s))
    co = np.stack([[np.bincount(old[r, i], minlength=e) for i in range(m)] for r in range(k)])  # [K, m, E]
    cn = np.stack([[np.bincount(new[r, j], minlength=e) for j in range(m)] for r in range(k)])
    shared = np.minimum(co[:, :, None, :], cn[:, None, :, :]).sum(-1)  # [K, m, m] dense overlaps
    dense = np.minimum(shared.max(2).sum(1), shared.max(1).sum(1))
    got = overlap_mod.kept_upper_bound(old, new, e)
    assert np.array_equal(got, dense)
    some = np.array([2, 0])  # chosen rows are read in place: the same bounds, in the order asked
    assert np.array_equal(overlap_mod.kept_upper_bound(old, new, e, some), dense[some])
    kernel = overlap_mod.kept_kernel
    overlap_mod.kept_kernel = None
    try:
        looser = overlap_mod.kept_upper_bound(old, new, e)
        assert (looser >= got).all()  # the sparse numpy bound is looser
        assert np.array_equal(overlap_mod.kept_upper_bound(old, new, e, some), looser[some])
    finally:
        overlap_mod.kept_kernel = kernel
    # A bound: no matching keeps more slots.
    kept = m * s - moved_slots(old.reshape(k, -1), align(old.reshape(k, -1), new.reshape(k, -1), 1, m))
    assert (kept <= got).all()


def test_a_foreign_plan_loses_every_avoidable_duplicate_in_one_call(path):
    load = synthetic_trace(3, 6, 64, top_k=8, seed=3).load
    args = (96, 1, 2, 16)
    greedy = greedy_rebalance_experts(load[1], *args)[0]
    assert avoidable_duplicates_np(greedy.numpy(), 16, 64).sum() > 0
    out = rebalance_experts(load[2], *args, old_phy2log=greedy, max_moves=0.25)[0].numpy()
    assert avoidable_duplicates_np(out, 16, 64).sum() == 0


def test_a_quarter_of_the_slots_buys_near_fresh_balance(path):
    load = synthetic_trace(3, 8, 64, top_k=8, skew=0.9, drift=0.15, seed=5).load
    args = (128, 1, 2, 16)
    old = rebalance_experts(load[1], *args)[0]
    fresh_ph, _, fresh_cnt = rebalance_experts(load[2], *args)
    ph, _, cnt = rebalance_experts(load[2], *args, old_phy2log=old, max_moves=0.25)
    assert moved_slots(old.numpy(), ph.numpy()).max() <= 32
    fresh_bal = balancedness(fresh_ph, fresh_cnt, load[2], 16)
    assert balancedness(ph, cnt, load[2], 16) >= fresh_bal - 0.005


@pytest.mark.parametrize("seed", range(30))
def test_compiled_duplicate_repair_equals_separate_copies(seed):
    from ray_eplb.solver.repair import separate_copies, separate_kernel, surplus_copies

    if separate_kernel is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(seed)
    num_experts, num_gpus, slots = int(rng.integers(3, 16)), int(rng.integers(2, 8)), int(rng.integers(2, 6))
    if num_gpus * slots < num_experts:
        num_gpus = -(-num_experts // slots)
    w, own = _problem(seed, 3, num_experts, num_gpus, slots)
    cnt = bin_counts(own.reshape(3, -1), 1, num_experts)[:, 0]
    per, cap = w / cnt, -(-cnt // num_gpus)
    got = separate_kernel(own, per, cap)
    assert np.array_equal(got, separate_copies(own, per, cap))
    assert surplus_copies(got, cap).sum() <= surplus_copies(own, cap).sum()


@pytest.mark.parametrize("seed", [280, 584, 728, 1055, *range(40)])
def test_compiled_repair_equals_separate_copies_when_a_copy_is_stuck(seed):
    """Skewed plans (a few experts with many copies), where the repair order matters most: the
    kernel's repairs must be the numpy rule's. Seeds 280, 584, 728 and 1055 each have a surplus
    copy with no legal swap until a later repair frees one (found by counting the numpy rule's
    stuck slots); the random plans of the test above have none."""
    from ray_eplb.solver.repair import separate_copies, separate_kernel

    if separate_kernel is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(seed)
    num_experts, num_gpus, slots = int(rng.integers(2, 8)), int(rng.integers(2, 6)), int(rng.integers(2, 6))
    num_gpus = max(num_gpus, -(-num_experts // slots))
    rows = []
    for _ in range(3):
        extra = rng.choice(num_experts, num_gpus * slots - num_experts, p=rng.dirichlet(np.ones(num_experts) * 0.2))
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    own = np.stack(rows).reshape(3, num_gpus, slots).astype(np.int64)
    w = np.floor(rng.pareto(1.1, (3, num_experts)) * 50) + 1
    cnt = bin_counts(own.reshape(3, -1), 1, num_experts)[:, 0]
    per, cap = w / cnt, -(-cnt // num_gpus)
    assert np.array_equal(separate_kernel(own, per, cap), separate_copies(own, per, cap))


@pytest.mark.parametrize("seed", [280, 584, 728, 1055, *range(20)])
def test_compiled_budgeted_repair_equals_counting_then_repairing(seed):
    """The planner's one-pass repair (count a layer's avoidable duplicates, repair it as
    separate_copies does, keep the repair only if its changed slots fit the budget) gives what
    those three steps give one after another, including layers whose repair does not fit."""
    from ray_eplb.solver.repair import repair_kernel, separate_copies

    if repair_kernel is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(seed)
    num_experts, num_gpus, slots = int(rng.integers(2, 10)), int(rng.integers(2, 6)), int(rng.integers(2, 6))
    num_gpus = max(num_gpus, -(-num_experts // slots))
    num_layers = 8
    rows = []
    for _ in range(num_layers):
        extra = rng.choice(num_experts, num_gpus * slots - num_experts, p=rng.dirichlet(np.ones(num_experts) * 0.3))
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    own = np.stack(rows).reshape(num_layers, num_gpus, slots).astype(np.int64)
    own[0] = np.arange(num_gpus * slots).reshape(num_gpus, slots) % num_experts  # often no duplicate
    w = np.floor(rng.pareto(1.1, (num_layers, num_experts)) * 50) + 1
    cnt = bin_counts(own.reshape(num_layers, -1), 1, num_experts)[:, 0]
    per, cap = w / cnt, -(-cnt // num_gpus)
    budget = rng.integers(0, 2 * num_gpus * slots // 3 + 1, num_layers)
    picked = np.sort(rng.choice(num_layers, 6, replace=False))
    want, want_budget = own.copy(), budget.copy()
    for r in picked:
        if avoidable_duplicates_np(own[r].reshape(1, -1), num_gpus, num_experts)[0] > 0:
            fixed = separate_copies(own[r:r + 1], per[r:r + 1], cap[r:r + 1])[0]
            cost = int((fixed != own[r]).sum())
            if cost <= want_budget[r]:
                want[r], want_budget[r] = fixed, want_budget[r] - cost
    got, got_budget = own.copy(), budget.copy()
    repair_kernel(got, w, cnt, picked, got_budget)
    assert np.array_equal(got, want) and np.array_equal(got_budget, want_budget)


@pytest.mark.skipif(peaks_mod.peaks_kernel is None, reason="the report comes from the compiled kernel")
@pytest.mark.parametrize("slots", [3, 9])  # below 8 slots summed in order, from 8 pairwise (numpy's way)
def test_goal_swaps_report_the_peak_and_moves_plan_stats_would(slots):
    from ray_eplb.solver.plan_stats import plan_stats

    w, own = _problem(11, 6, 20, 7, slots)
    num_layers, num_experts = w.shape
    cnt = bin_counts(own.reshape(num_layers, -1), 1, num_experts)[:, 0]
    per = w / cnt
    orig = np.roll(own, 1, axis=2)  # a start that differs from the plan in most slots
    goal = per_slot(per, own).sum(-1).mean(1)
    budget = np.full(num_layers, 10**6, dtype=np.int64)
    out, peak, moved, dups = peaks_mod.lower_peaks(own, w, cnt, goal, budget, 64, orig, report=True)
    flat = out.reshape(num_layers, -1)
    _, want_peak, want_dups, _ = plan_stats(flat, w, own.shape[1])
    assert np.array_equal(peak, want_peak)  # the same floats, not close ones
    assert np.array_equal(moved, moved_slots(orig.reshape(num_layers, -1), flat))
    assert (moved > 0).all()
    assert np.array_equal(dups, want_dups)
    assert (want_dups > 0).any() or slots < 9  # (at 3 slots, with one spare slot, nothing is stacked)
    plain = peaks_mod.lower_peaks(own, w, cnt, goal, np.full(num_layers, 10**6, dtype=np.int64), 64, orig)
    assert np.array_equal(plain, out)  # reporting changes nothing
    mine = own.copy()
    same = peaks_mod.lower_peaks(mine, w, cnt, goal, np.full(num_layers, 10**6, dtype=np.int64), 64, orig, in_place=True)
    assert same is mine and np.array_equal(mine, out)  # in place: the caller's array is the plan


@pytest.mark.parametrize("compiled_on", [True, False])
def test_checked_slot_counts_match_the_bincount_and_refuse_bad_ids(compiled_on, monkeypatch):
    from ray_eplb.solver import compiled
    from ray_eplb.solver.maps import checked_slot_counts

    monkeypatch.setattr(compiled, "ENABLED", compiled.ENABLED and compiled_on)
    rng = np.random.default_rng(3)
    plan = rng.integers(0, 40, (5, 96))
    for p in (plan, plan[:, ::2], plan.astype(np.int32)):  # a contiguous, a strided and a narrow array
        assert np.array_equal(checked_slot_counts(p, 40), bin_counts(p, 1, 40)[:, 0])
    for bad in (-1, 40):
        wrong = plan.copy()
        wrong[3, 17] = bad
        assert checked_slot_counts(wrong, 40) is None
