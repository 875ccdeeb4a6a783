"""best_swaps (the sorted search for a pair's best swap) finds a swap as good as the S x S scan."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.solver.packing import best_swaps


@settings(deadline=None, max_examples=80)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 20))
def test_best_swaps_matches_the_full_scan(seed, num, slots):
    rng = np.random.default_rng(seed)
    la = rng.random((num, slots)) * 10
    lb = rng.random((num, slots)) * 10
    la[rng.random(la.shape) < 0.2] = -np.inf  # replicas that may not leave
    lb[rng.random(lb.shape) < 0.2] = np.inf
    lb[:, 0] = np.round(lb[:, 0])  # some ties
    gap = rng.random(num) * 20
    d = la[:, :, None] - lb[:, None, :]
    full = np.minimum(d, gap[:, None, None] - d).reshape(num, -1).max(1)
    best, top = best_swaps(la, lb, gap)
    fin = np.isfinite(full)
    assert np.array_equal(np.isfinite(top), fin)
    assert np.allclose(top[fin], full[fin])
    a, b = best[fin] // slots, best[fin] % slots
    got = la[fin, a] - lb[fin, b]
    assert np.allclose(np.minimum(got, gap[fin] - got), full[fin])  # the index is that swap
