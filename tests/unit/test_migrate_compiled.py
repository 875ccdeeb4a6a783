"""The migration-aware planner's compiled common path (solver/migrate_compiled.py): the same plan
as the numpy path on every kind of starting plan, finished by the numpy code where a layer needs
the fresh plan aligned, and nothing outside its range."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ray_eplb.solver.migrate_compiled as fast_mod
import ray_eplb.solver.migration as migration_mod
from ray_eplb.solver import rebalance_experts
from ray_eplb.solver.baseline import greedy_rebalance_experts
from ray_eplb.solver.budgets import budget_per_layer
from ray_eplb.solver.maps import bin_counts
from ray_eplb.solver.migration import migrate, peak_load
from ray_eplb.solver.rebalance import _fresh

pytestmark = pytest.mark.skipif(fast_mod._kernel is None, reason="numba not installed")


def _case(seed: int):
    """A random shape, load, policy, budget and starting plan (the previous fresh plan, the
    greedy's, a random one with stacked copies, or the fresh plan itself in some layers)."""
    rng = np.random.default_rng(seed)
    num_nodes = int(rng.choice([1, 2]))
    num_gpus = num_nodes * int(rng.integers(1, 5))
    slots = int(rng.integers(2, 6))
    num_groups = num_nodes * int(rng.choice([1, 2]))
    num_experts = num_groups * int(rng.integers(1, max(2, num_gpus * slots // num_groups) + 1))
    num_experts = min(num_experts, num_gpus * slots - num_gpus * slots % num_groups)
    num_layers = int(rng.integers(1, 5))
    w_old, w = (torch.from_numpy(np.floor(rng.pareto(1.2, (num_layers, num_experts)) * 40) + rng.integers(0, 2))
                for _ in range(2))
    w[:, 0] *= float(rng.integers(1, 20))  # sometimes more replicas than GPUs
    args = (num_gpus * slots, num_groups, num_nodes, num_gpus)
    kind = seed % 4
    if kind == 0:
        old = rebalance_experts(w_old, *args)[0]
    elif kind == 1:
        old = greedy_rebalance_experts(w_old, *args)[0]  # a foreign plan, often with avoidable duplicates
    elif kind == 2:
        old = torch.from_numpy(np.stack([rng.permutation(np.r_[np.arange(num_experts), rng.integers(
            0, num_experts, num_gpus * slots - num_experts)]) for _ in range(num_layers)]))
    else:
        old = rebalance_experts(w_old, *args)[0]
        old[0] = rebalance_experts(w, *args)[0][0]  # layer 0 already at this window's fresh plan
    policy = str(rng.choice(["auto", "global"]))
    max_moves = [None, 0.25, int(rng.integers(0, 5)), 1.0][int(rng.integers(0, 4))]
    min_gain = float(rng.choice([0.0, 0.0, 0.05]))
    return w, args, old, policy, max_moves, min_gain


def test_the_compiled_path_gives_the_numpy_plan(monkeypatch):
    calls = {"planned": 0, "partly": 0, "handed back": 0}
    real = fast_mod.migrate_compiled

    def counted(*a):
        out = real(*a)
        calls["handed back" if out is None else "partly" if isinstance(out, fast_mod.Partial) else "planned"] += 1
        return out

    for seed in range(120):
        w, args, old, policy, max_moves, min_gain = _case(seed)
        kw = dict(policy=policy, old_phy2log=old, max_moves=max_moves, min_gain=min_gain)
        monkeypatch.setattr(migration_mod, "migrate_compiled", counted)
        got = rebalance_experts(w, *args, **kw)[0]
        monkeypatch.setattr(migration_mod, "migrate_compiled", lambda *a: None)
        want = rebalance_experts(w, *args, **kw)[0]
        assert torch.equal(got, want), (seed, policy, max_moves, min_gain)
    # Most calls are planned by the compiled path; some need the fresh plan aligned in a layer (then
    # finished by the numpy code), the rest have one slot per GPU.
    assert calls["planned"] > 60 and calls["partly"] > 0, calls


def test_a_layer_where_the_fresh_plan_may_dominate_is_finished_by_the_numpy_code():
    # Layer 0: incremental gets stuck (the gainer may only go where it already is) and the fresh
    # plan is 2 slots away with a lower peak: it must be aligned to be compared. Layer 1 is
    # already at the fresh plan (settled: kept as it is).
    w = np.array([[11.0, 7.0, 7.0, 7.0], [11.0, 7.0, 7.0, 7.0]])
    fresh, peak, spread = _fresh(w, 6, 1, 1, 3, "global", "hybrid_tail", True)
    old = np.array([[1, 2, 3, 0, 3, 0], fresh[1]])
    budget, _ = budget_per_layer(None, 2, 6, "layer")
    cnt_old = bin_counts(old, 1, 4)[:, 0]
    part = fast_mod.migrate_compiled(w, old, fresh, cnt_old, 3, budget, (peak, spread), 0.0)
    assert isinstance(part, fast_mod.Partial) and part.settled.tolist() == [False, True]
    assert part.tight[0] and part.moved[0] == 2  # the kept bound was taken; incremental moved 2
    with_known = migrate(w, old, 3, budget, None, 0.0, "hybrid_tail", fresh, (peak, spread), cnt_old)
    without = migrate(w[:1], old[:1], 3, budget[:1], None, 0.0, "hybrid_tail", fresh[:1])  # all numpy
    assert np.array_equal(with_known[0], without[0]) and np.array_equal(with_known[1], old[1])
    assert (with_known[0] != old[0]).sum() == 2 and np.isclose(peak_load(with_known, w, 3)[0], 32 / 3)


def test_outside_its_range_it_hands_the_call_back():
    rng = np.random.default_rng(0)
    w = rng.random((2, 8)) * 10
    budget = np.full(2, 8)
    for num_gpus, num_slots in ((8, 8), (300, 600)):  # one slot per GPU; more GPUs than the bound's range
        old = np.stack([np.r_[np.arange(8), rng.integers(0, 8, num_slots - 8)] for _ in range(2)]).astype(np.int64)
        fresh = old[:, ::-1].copy()
        cnt = bin_counts(old, 1, 8)[:, 0]
        known = (np.ones(2), np.ones(2, dtype=bool))
        assert fast_mod.migrate_compiled(w, old, fresh, cnt, num_gpus, budget, known, 0.0) is None


def test_a_settled_call_returns_the_old_plan_as_a_copy():
    w = np.array([[5.0, 3.0, 1.0, 1.0]] * 2)
    fresh, peak, spread = _fresh(w, 8, 1, 1, 2, "global", "hybrid_tail", True)
    old = fresh.copy()
    out = fast_mod.migrate_compiled(w, old, fresh, bin_counts(old, 1, 4)[:, 0], 2, np.full(2, 8), (peak, spread), 0.0)
    assert np.array_equal(out, old) and out is not old and not np.shares_memory(out, old)
