"""Incremental planning with many relocations per layer (made in rounds of several at once), with
the per-GPU copies table and without it: valid, within budget, closer to the target counts."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ray_eplb.solver import incremental as inc
from ray_eplb.solver.counts import counts_np
from ray_eplb.solver.maps import avoidable_duplicates_np, bin_counts


def _problem(seed: int, num_layers: int, num_experts: int, num_gpus: int, slots: int):
    """Loads and an old plan whose counts are far from the water-filling ones (many relocations)."""
    rng = np.random.default_rng(seed)
    w = np.floor(rng.pareto(0.8, (num_layers, num_experts)) * 50) + 1  # [L, E] very skewed
    num_slots = num_gpus * slots
    old = []
    for row in counts_np(w[:, ::-1].copy(), num_slots):  # the old plan was made for the reversed popularity
        reps = np.repeat(np.arange(num_experts), row)
        old.append(reps.reshape(slots, num_gpus).T.ravel())  # replica i on GPU i % P: spread out
    return w, np.stack(old).astype(np.int64), num_slots


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("seed, shape, budget", [
    (seed, shape, budget)
    for seed, shape, budget in itertools.product(
        range(4), [(2, 24, 8, 6), (3, 16, 4, 8), (1, 96, 64, 4), (2, 64, 128, 1)], [None, 9])
])
def test_many_relocations_stay_valid(seed, shape, budget, table, monkeypatch):
    num_layers, num_experts, num_gpus, slots = shape
    w, old, num_slots = _problem(seed, num_layers, num_experts, num_gpus, slots)
    target = counts_np(w, num_slots)
    need = np.abs(target - bin_counts(old, 1, num_experts)[:, 0]).sum(1) // 2  # [L] relocations wanted
    if not table:
        monkeypatch.setattr(inc, "TABLE_LIMIT", -1)
    limit = np.full(num_layers, num_slots if budget is None else budget, dtype=np.int64)
    new = inc.incremental(w, old, num_gpus, limit)
    cnt = bin_counts(new, 1, num_experts)[:, 0]
    assert (cnt >= 1).all() and (cnt.sum(1) == num_slots).all()
    assert ((old != new).sum(1) <= limit).all()
    far = np.abs(bin_counts(old, 1, num_experts)[:, 0] - target).sum(1)
    assert (np.abs(cnt - target).sum(1) < far).all()  # relocations made (a layer may stop short: stuck)
    if budget is None:  # the repair had the budget it needed (a tight budget may leave a thinned one)
        assert (avoidable_duplicates_np(new, num_gpus, num_experts) == 0).all()
    if shape[1] >= 64:  # these shapes take the rounds of several at once
        assert need.max() > (2 if shape[3] == 1 else 8) * inc.BATCHES


@pytest.mark.parametrize("seed", range(3))
def test_with_and_without_the_table_the_plans_are_the_same(seed, monkeypatch):
    w, old, num_slots = _problem(seed, 2, 96, 64, 4)
    limit = np.full(2, num_slots, dtype=np.int64)
    with_table = inc.incremental(w, old, 64, limit)
    monkeypatch.setattr(inc, "TABLE_LIMIT", -1)
    assert np.array_equal(inc.incremental(w, old, 64, limit), with_table)
