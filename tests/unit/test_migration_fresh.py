"""Migration helpers in solver/migration.py: ``_overlap`` (and, in later commits, the total
budget's ``_hull_spend`` and the fresh plan as a candidate)."""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.migration import _overlap


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
