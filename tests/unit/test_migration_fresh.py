"""Migration helpers in solver/migration.py: ``_hull_spend`` (total budgets spent along each
layer's upper hull) and ``_overlap``."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.solver.migration import _hull_spend, _overlap

SETTINGS = settings(deadline=None)


# ------------------------------------------------------------------------------------- _hull_spend
def test_hull_spend_skips_a_level_without_gain():
    # Layer 0: 1 slot gains nothing, 2 slots gain 5. A greedy that needs every level in turn
    # would stop at the first; the hull goes from nothing straight to 2 slots.
    gains = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 1.0]])
    moved = np.array([[0, 0], [1, 1], [2, 1]])
    assert _hull_spend(gains, moved, 2).tolist() == [2, 0]
    assert _hull_spend(gains, moved, 3).tolist() == [2, 1]


def test_hull_spend_handles_plans_out_of_move_order():
    # Plan 2 moves fewer slots than plan 1 and gains more (a fresh plan that dominates).
    gains = np.array([[0.0], [2.0], [3.0], [3.5]])
    moved = np.array([[0], [4], [3], [8]])
    assert _hull_spend(gains, moved, 3).tolist() == [2]
    assert _hull_spend(gains, moved, 7).tolist() == [2]  # the next step costs 5 more
    assert _hull_spend(gains, moved, 8).tolist() == [3]


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 6), st.integers(0, 40))
def test_hull_spend_stays_within_the_total(seed, num_plans, num_layers, total):
    rng = np.random.default_rng(seed)
    moved = np.vstack([np.zeros((1, num_layers), int), rng.integers(0, 12, (num_plans, num_layers))])
    gains = np.vstack([np.zeros((1, num_layers)), rng.random((num_plans, num_layers)) * moved[1:]])
    layers = np.arange(num_layers)
    at = _hull_spend(gains, moved, total)
    assert moved[at, layers].sum() <= total
    assert (gains[at, layers] >= 0).all()
    # Enough for everything: every layer gets its highest gain.
    rich = _hull_spend(gains, moved, int(moved.max(0).sum()))
    assert np.allclose(gains[rich, layers], gains.max(0))


# ------------------------------------------------------------------------------------------ _overlap
def test_overlap_mixes_sets_and_multisets_row_by_row():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, (5, 3, 4)), rng.integers(0, 2, (5, 3, 4))
    a[1, 0, 2], b[3, 2, 0] = 3, 2  # two rows hold an expert twice in a bin
    want = np.minimum(a[:, :, None, :], b[:, None, :, :]).sum(-1)
    assert np.array_equal(_overlap(a, b), want)
    assert np.array_equal(_overlap(a[None], b[None])[0], want)
    # Leading axes broadcast (align's node pairs): [5, 1, 3, 4] x [1, 5, 3, 4] -> [5, 5, 3, 3].
    pairs = _overlap(a[:, None], b[None])
    assert pairs.shape == (5, 5, 3, 3)
    assert np.array_equal(pairs, np.minimum(a[:, None, :, None, :], b[None, :, None, :, :]).sum(-1))
