"""The compiled kernels (solver/compiled.py) give the same plans as the numpy code they replace."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_eplb.solver import compiled, rebalance_experts
from ray_eplb.solver.counts import counts_np
from ray_eplb.solver.maps import logical_maps_np
from ray_eplb.solver.packing import pack_rounds, pack_snake, pack_with_base, place_replicas, refine_swaps
from ray_eplb.solver.repair import surplus_copies

needs_numba = pytest.mark.skipif(not compiled.ENABLED, reason="numba is not installed (the numpy code runs)")


def both(monkeypatch, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the kernels, then with the numpy code."""
    monkeypatch.setattr(compiled, "ENABLED", True)
    fast = fn(*args, **kwargs)
    monkeypatch.setattr(compiled, "ENABLED", False)
    return fast, fn(*args, **kwargs)


def loads(rng, rows, n, kind):
    """``[rows, n]`` loads: uniform, small integers (many ties and zeros), or heavy-tailed."""
    if kind == 0:
        return rng.random((rows, n))
    if kind == 1:
        return rng.integers(0, 4, (rows, n)).astype(np.float64) + np.eye(1, n)  # no all-zero row
    return rng.random((rows, n)) ** 8 * 1e6 + 1e-3


@needs_numba
@pytest.mark.parametrize("seed", range(4))
def test_counts_same(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    for kind in range(3):
        n = int(rng.integers(2, 130))
        w, num_phy = loads(rng, int(rng.integers(1, 20)), n, kind), n + int(rng.integers(1, 3 * n))
        for method in ("hybrid_tail", "dhondt"):
            fast, ref = both(monkeypatch, counts_np, w, num_phy, method)
            np.testing.assert_array_equal(fast, ref)
            assert (fast.sum(1) == num_phy).all()


@needs_numba
@pytest.mark.parametrize("seed", range(6))
def test_packing_and_refinement_same(monkeypatch, seed):
    rng = np.random.default_rng(100 + seed)
    for kind in range(3):
        n, bins = int(rng.integers(2, 80)), int(rng.choice([2, 3, 8, 16]))
        slots = int(rng.integers(-(-n // bins), -(-n // bins) + 30))  # up to ~40 slots per bin
        w = loads(rng, int(rng.integers(1, 8)), n, kind)
        counts = counts_np(w, bins * slots)
        cap, per = -(-counts // bins), w / counts
        if (cap == 1).all():
            np.testing.assert_array_equal(*both(monkeypatch, pack_snake, w, counts, bins))
        start = pack_with_base(w, counts, bins)
        assert compiled.any_surplus(start, cap) == surplus_copies(start, cap).any()
        for pairs in (None, 4):
            (o1, l1), (o2, l2) = both(monkeypatch, place_replicas, w, counts, bins, pairs)
            np.testing.assert_array_equal(o1, o2)
            np.testing.assert_array_equal(l1, l2)
        budget = rng.integers(0, 9, w.shape[0])
        spent = [budget.copy(), budget.copy()]
        monkeypatch.setattr(compiled, "ENABLED", True)
        o1, _ = refine_swaps(start, per, cap, 4, 4, spent[0])
        monkeypatch.setattr(compiled, "ENABLED", False)
        o2, _ = refine_swaps(start, per, cap, 4, 4, spent[1])
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(*spent)
        assert (spent[0] >= 0).all() and (spent[0] <= budget).all()


@needs_numba
@pytest.mark.parametrize("seed", range(3))
def test_counts_and_place_same(monkeypatch, seed):
    """The fused kernel (counts, dealing, refinement in one call) against the numpy stages."""
    from ray_eplb.solver.packing import counts_and_place

    rng = np.random.default_rng(200 + seed)
    for kind in range(3):
        n, bins = int(rng.integers(2, 300)), int(rng.choice([2, 4, 8, 32]))
        num_phy = bins * int(rng.integers(-(-(n + 1) // bins), -(-(n + 1) // bins) + 20))
        w = loads(rng, int(rng.integers(1, 8)), n, kind)
        w[0] = 0.0  # an all-zero row takes the even split
        for method in ("hybrid_tail", "dhondt"):
            (o1, l1), (o2, l2) = both(monkeypatch, counts_and_place, w, num_phy, bins, method)
            np.testing.assert_array_equal(o1, o2)
            np.testing.assert_array_equal(l1, l2)


@needs_numba
def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(3)
    for n in [1, 7, 8, 9, 127, 128, 129, 255, 383, 384, 1000, 4099]:
        x = rng.random(n) * 10.0 ** rng.uniform(-3, 3, n)
        assert compiled._pairwise_sum(x, 0, n) == x.sum()


@needs_numba
def test_rounds_and_maps_same(monkeypatch):
    rng = np.random.default_rng(7)
    for _ in range(20):
        bins = int(rng.integers(1, 9))
        load = rng.integers(0, 4, (int(rng.integers(1, 5)), bins * int(rng.integers(1, 6)))).astype(np.float64)
        np.testing.assert_array_equal(*both(monkeypatch, pack_rounds, load, bins))
        e = int(rng.integers(1, 20))
        phy2log = np.stack([rng.permutation(np.r_[np.arange(e), rng.integers(0, e, 7)]) for _ in range(3)])
        (a, ca), (b, cb) = both(monkeypatch, logical_maps_np, phy2log, e)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ca, cb)


@needs_numba
@pytest.mark.parametrize("block", [1, 8 * 20, 8 * 20 * 3 + 5, 1 << 19])
def test_maps_written_a_block_of_layers_at_a_time_are_the_whole_maps(monkeypatch, block):
    """The compiled maps fill ``MAP_BLOCK_BYTES`` of layers at a time (one layer when a layer is
    larger): every block, the last partial one included, equals the numpy maps, at every width."""
    import ray_eplb.solver.maps as maps_mod

    monkeypatch.setattr(maps_mod, "MAP_BLOCK_BYTES", block)
    rng = np.random.default_rng(block)
    for layers in (1, 2, 7):
        e = 20
        phy2log = np.stack([rng.permutation(np.r_[np.arange(e), rng.integers(0, e, 9)]) for _ in range(layers)])
        for width in ("full", "used", 12):
            (a, ca), (b, cb) = both(monkeypatch, logical_maps_np, phy2log, e, width)
            assert a.shape == b.shape and (a == -1).any()
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ca, cb)
    # No experts and no slots: an empty map of width 1, as the numpy code gives (no division by zero).
    (a, ca), (b, cb) = both(monkeypatch, logical_maps_np, np.zeros((2, 0), dtype=np.int64), 0)
    assert a.shape == b.shape == (2, 0, 1) and ca.shape == cb.shape == (2, 0)


@needs_numba
@pytest.mark.parametrize("shape", [(288, 8, 4, 32), (72, 8, 2, 8), (136, 8, 1, 8), (16, 4, 2, 8)])
def test_rebalance_same(monkeypatch, shape):
    from ray_eplb.controller.bench.workload import synthetic_trace

    load = synthetic_trace(3, 6, 64 if shape[0] > 16 else 8, top_k=2, seed=shape[0]).load  # [T, L, E]
    for w in load:
        for policy in ("auto", "global"):
            fast, ref = both(monkeypatch, rebalance_experts, w, *shape, policy=policy)
            for a, b in zip(fast, ref):
                assert torch.equal(a, b)


@needs_numba
def test_trace_cases_same(monkeypatch):
    from ray_eplb.controller.bench.cases import CASES, case_windows
    from ray_eplb.controller.bench.workload import default_traces_dir

    traces = default_traces_dir()
    if traces is None:
        pytest.skip("no ../shared/traces on this machine")
    for case in CASES:
        shape = (case.num_replicas, case.num_groups, case.num_nodes, case.num_gpus)
        for w in case_windows(case, traces, 2, 0):
            fast, ref = both(monkeypatch, rebalance_experts, w, *shape)
            assert torch.equal(fast[0], ref[0]), case.name


def test_switch_off_and_no_ray():
    """``RAY_EPLB_NUMBA=0`` selects the numpy code; importing the solver imports no Ray either way."""
    code = ("import sys; import ray_eplb.solver as s; from ray_eplb.solver import compiled; "
            "print(compiled.ENABLED, any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    import importlib.util

    for env, enabled in (("0", "False"), ("1", str(importlib.util.find_spec("numba") is not None))):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"RAY_EPLB_NUMBA": env, "PATH": "/usr/bin:/bin"}).stdout.split()
        assert out == [enabled, "False"]


@needs_numba
def test_swap_search_is_argmax():
    """The compiled swap search returns numpy's argmax over the ``S x S`` scores (ties, blocked slots)."""
    from ray_eplb.solver.kernels_place import _scan_rows

    rng = np.random.default_rng(11)
    for trial in range(400):
        s = int(rng.integers(1, 40))
        la, lb = rng.integers(0, 6, s) / 4.0, rng.integers(0, 6, s) / 4.0  # many equal loads and scores
        if trial % 2:
            la, lb = rng.random(s), rng.random(s)
        la[rng.random(s) < 0.2] = -np.inf
        lb[rng.random(s) < 0.2] = np.inf
        gap = float(rng.choice([0.25, 0.5, 1.0, rng.random()]))
        d = la[:, None] - lb[None, :]
        score = np.minimum(d, gap - d).ravel()
        want = (score.max(), int(score.argmax()))
        assert _scan_rows(la, lb, gap, np.empty(s)) == want


@needs_numba
def test_order_desc_is_stable_argsort():
    from ray_eplb.solver.kernels_place import _order_desc

    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(1, 300))
        v = [rng.random(n) ** 3, np.round(rng.random(n) * 8) / 8, 1 + rng.integers(0, 3, n) * 1e-12][trial % 3]
        v[rng.random(n) < 0.2] = 0.0
        scratch = [np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint64),
                   np.empty(n, dtype=np.uint64), np.empty(256, dtype=np.int64)]
        np.testing.assert_array_equal(_order_desc(v, *scratch), np.argsort(-v, kind="stable"))


@needs_numba
@pytest.mark.parametrize("scale", [1e-315, 1e-300, 1.0, 1e300])
def test_counts_and_place_same_at_extreme_scales(monkeypatch, scale):
    """Rows are scaled by a power of two before the counts: subnormal and huge loads too."""
    from ray_eplb.solver.packing import counts_and_place

    rng = np.random.default_rng(31)
    w = loads(rng, 4, 40, 2) * scale
    (o1, l1), (o2, l2) = both(monkeypatch, counts_and_place, w, 64, 8, "hybrid_tail")
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)


def test_minus_ones_is_full_of_minus_one():
    from ray_eplb.solver.maps import minus_ones

    for shape in [(0,), (1,), (3, 5, 7), (2, 1, 4097)]:
        out = minus_ones(shape)
        assert out.dtype == np.int64 and out.shape == shape
        np.testing.assert_array_equal(out, np.full(shape, -1, dtype=np.int64))


@needs_numba
def test_any_surplus_on_random_plans():
    """The compiled check against the numpy marking on plans with and without surplus copies."""
    rng = np.random.default_rng(17)
    found = set()
    for _ in range(300):
        n, bins, slots = int(rng.integers(1, 12)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        owner = rng.integers(0, n, (int(rng.integers(1, 4)), bins, slots))
        counts = np.stack([np.bincount(row.ravel(), minlength=n) for row in owner])
        cap = np.maximum(-(-counts // bins) + rng.integers(-1, 2, counts.shape), 1)
        want = bool(surplus_copies(owner, cap).any())
        assert compiled.any_surplus(owner, cap) == want
        found.add(want)
    assert found == {True, False}
