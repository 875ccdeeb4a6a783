"""plan_stats gives what the separate numpy functions give, on random plans with stacked experts."""
import numpy as np
import pytest

import ray_eplb.solver.plan_stats as plan_stats_mod
from ray_eplb.solver.maps import avoidable_duplicates_np, bin_counts
from ray_eplb.solver.migration import peak_load
from ray_eplb.solver.plan_stats import plan_stats, shared_counts


def _random_plan(rng, num_layers, num_experts, num_gpus, slots, stacked):
    num_slots = num_gpus * slots
    extra = rng.integers(0, num_experts, (num_layers, num_slots - num_experts))
    plan = np.concatenate([np.tile(np.arange(num_experts), (num_layers, 1)), extra], 1)
    plan = np.take_along_axis(plan, rng.permuted(np.tile(np.arange(num_slots), (num_layers, 1)), axis=1), 1)
    return np.sort(plan, 1) if stacked else plan  # sorted: an expert's replicas stack on one GPU


@pytest.mark.parametrize("seed", range(40))
def test_plan_stats_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    num_gpus, slots = int(rng.integers(1, 12)), int(rng.integers(2, 20))
    num_experts = int(rng.integers(2, num_gpus * slots + 1))
    plan = _random_plan(rng, int(rng.integers(1, 5)), num_experts, num_gpus, slots, seed % 3 == 0)
    w = rng.random((plan.shape[0], num_experts)) * 1000
    cnt, peak, dups, ok = plan_stats(plan, w, num_gpus, dups=True, cap=True)
    assert (cnt == bin_counts(plan, 1, num_experts)[:, 0]).all()
    assert (peak == peak_load(plan, w, num_gpus)).all()  # bit for bit: decisions compare peaks
    assert (dups == avoidable_duplicates_np(plan, num_gpus, num_experts)).all()
    held = bin_counts(plan, num_gpus, num_experts)  # [L, P, E]
    assert (ok == (held <= -(-cnt[:, None, :] // num_gpus)).all((1, 2))).all()


def test_plan_stats_flags_a_stacked_expert():
    plan = np.array([[0, 0, 1, 2]])  # expert 0 twice on GPU 0 with 2 replicas on 2 GPUs: beyond its cap
    w = np.array([[4.0, 1.0, 1.0]])
    cnt, peak, dups, ok = plan_stats(plan, w, 2, dups=True, cap=True)
    assert cnt.tolist() == [[2, 1, 1]] and peak[0] == 4.0 and dups[0] == 1 and not ok[0]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("compiled", [True, False])
def test_counts_given_are_used_not_recounted_and_shared_counts_match_numpy(seed, compiled, monkeypatch):
    rng = np.random.default_rng(seed)
    num_gpus, slots = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    num_experts = int(rng.integers(1, num_gpus * slots + 1))
    plan = _random_plan(rng, int(rng.integers(1, 4)), num_experts, num_gpus, slots, seed % 3 == 0)
    other = _random_plan(rng, plan.shape[0], num_experts, num_gpus, slots, False)
    w = rng.random((plan.shape[0], num_experts)) * 1000
    if not compiled:
        monkeypatch.setattr(plan_stats_mod, "plan_stats_kernel", None)
        monkeypatch.setattr(plan_stats_mod, "shared_counts_kernel", None)
    want = plan_stats(plan, w, num_gpus, dups=True, cap=True)
    given = bin_counts(plan, 1, num_experts)[:, 0]
    got = plan_stats(plan, w, num_gpus, dups=True, cap=True, cnt=given)
    assert got[0] is given  # taken as it is, not recounted
    for a, b in zip(want[1:], got[1:]):
        assert np.array_equal(a, b)
    # Counts that are not the plan's are believed (the caller vouches for them): the peak follows them.
    doubled = plan_stats(plan, w, num_gpus, dups=False, cnt=2 * given)[1]
    np.testing.assert_allclose(doubled, want[1] / 2)
    cnt_other = bin_counts(other, 1, num_experts)[:, 0]
    cnt, kept, most = shared_counts(plan, cnt_other)
    assert np.array_equal(cnt, given)
    assert np.array_equal(kept, np.minimum(given, cnt_other).sum(1))
    assert np.array_equal(most, given.max(1))
