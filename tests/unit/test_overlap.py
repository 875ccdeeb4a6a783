"""Sparse GPU overlaps and the direct-then-assignment GPU matching (solver/overlap.py) against
dense references."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from ray_eplb.solver.overlap import kept_upper_bound, match_gpus, sparse_overlap


def _dense(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    """``[K, m, m]`` shared slots by brute force (multisets)."""
    ha = np.stack([[np.bincount(b, minlength=num_experts) for b in row] for row in old])  # [K, m, E]
    hb = np.stack([[np.bincount(b, minlength=num_experts) for b in row] for row in new])
    return np.minimum(ha[:, :, None, :], hb[:, None, :, :]).sum(-1)


def _bins(rng: np.random.Generator, rows: int, m: int, slots: int, num_experts: int, related: np.ndarray | None):
    """Random bins; with ``related``, a shuffle of its bins with a few slots changed (many equal sets)."""
    if related is None:
        return rng.integers(0, num_experts, (rows, m, slots))
    out = related[:, rng.permutation(m)].copy()
    change = rng.random(out.shape) < 0.15
    out[change] = rng.integers(0, num_experts, change.sum())
    return out


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 9), st.integers(1, 4), st.integers(1, 12))
def test_sparse_overlap_and_matching_equal_the_dense_ones(seed, rows, m, slots, num_experts):
    rng = np.random.default_rng(seed)
    old = _bins(rng, rows, m, slots, num_experts, None)
    new = _bins(rng, rows, m, slots, num_experts, old if seed % 2 else None)
    dense = _dense(old, new, num_experts)
    k, i, j, shared = sparse_overlap(old, new, num_experts)
    got = np.zeros_like(dense)
    got[k, i, j] = shared
    assert np.array_equal(got, dense)
    assert (shared > 0).all()
    bound = np.minimum(dense.max(2).sum(1), dense.max(1).sum(1))
    got_bound = kept_upper_bound(old, new, num_experts)
    assert (got_bound >= bound).all()  # an upper bound (equal unless a hot expert is bounded apart)
    assert (got_bound <= m * slots).all()
    keep_old, keep_new = rng.random((rows, m)) < 0.5, rng.random((rows, m)) < 0.5
    k, i, j, shared = sparse_overlap(old, new, num_experts, keep_old, keep_new)
    masked = np.zeros_like(dense)
    masked[k, i, j] = shared
    assert np.array_equal(masked, dense * keep_old[:, :, None] * keep_new[:, None, :])
    perm = match_gpus(old, new, num_experts)
    for r in range(rows):
        assert dense[r][np.arange(m), perm[r]].sum() <= got_bound[r]
        assert sorted(perm[r].tolist()) == list(range(m))  # a permutation
        a, b = linear_sum_assignment(dense[r], maximize=True)
        assert dense[r][np.arange(m), perm[r]].sum() == dense[r][a, b].sum()  # and a maximum one


def test_equal_sets_are_matched_directly():
    old = np.array([[[0, 1], [2, 3], [4, 5]]])
    new = np.array([[[3, 2], [5, 4], [1, 0]]])  # the same sets, shuffled, slots reordered
    assert match_gpus(old, new, 6).tolist() == [[2, 0, 1]]


def test_kept_bound_is_exact_without_hot_experts_and_safe_with_one():
    rng = np.random.default_rng(5)
    old = rng.permutation(64 * 4).reshape(1, 64, 4) % 200  # 200 experts, few copies each
    new = old[:, rng.permutation(64)].copy()
    new[0, :8, 0] = (new[0, :8, 0] + 1) % 200
    dense = _dense(old, new, 200)
    assert kept_upper_bound(old, new, 200)[0] == min(dense.max(2).sum(1)[0], dense.max(1).sum(1)[0])
    hot = old.copy()
    hot[0, :, 0] = 7  # expert 7 on every bin of both plans: 64 x 64 pairs, bounded per bin instead
    hot_new = hot[:, rng.permutation(64)]
    a, b = linear_sum_assignment(_dense(hot, hot_new, 200)[0], maximize=True)
    assert kept_upper_bound(hot, hot_new, 200)[0] >= _dense(hot, hot_new, 200)[0][a, b].sum()
