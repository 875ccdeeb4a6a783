"""Replica counts (solver/counts.py): equivalence with the design's rule, min-max optimality, invariants, errors.

The reference below is written from the hybrid-tail waterfill's description in our design notes,
one row at a time in plain Python/numpy, deliberately unlike the vectorised implementation:
40-step bisection of the water level, bulk fill in chunks of up to n seats by largest w/c, then
the last T seats one at a time, D'Hondt pick argmax w/(c+1) versus Sainte-Lague pick
argmax w/(2c+1), keeping the lower predicted new peak, then the lower runner-up, then the heavier
expert. It also reports whether it ever had to make an arbitrary choice (a tie the design leaves to
torch's unspecified ordering), so counts are compared exactly wherever the design's answer is
unique, and peaks everywhere.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.solver import replica_counts
from ray_eplb.solver.counts import counts_np


# ----------------------------------------------------------------------------------------------
# Reference (per row, from the design's description)
# ----------------------------------------------------------------------------------------------
def _first_max(values: list[float]) -> tuple[int, bool]:
    """Index of the largest value (lowest index on ties) and whether the max was tied."""
    best = max(values)
    hits = [i for i, v in enumerate(values) if v == best]
    return hits[0], len(hits) > 1


def design_row(w: list[float], num_phy: int) -> tuple[list[int], bool]:
    """The design's counts for one row, and ``ambiguous``: True if a tie made any choice arbitrary."""
    n = len(w)
    if num_phy == n:
        return [1] * n, False
    maxw = max(w)
    if maxw == 0.0:
        base, rem = divmod(num_phy, n)
        return [base + (1 if i < rem else 0) for i in range(n)], False

    def seats(level: float) -> list[int]:
        return [max(math.ceil(x / level), 1) for x in w]

    lo, hi = 0.0, max(maxw, 1.0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if sum(seats(mid)) <= num_phy:
            hi = mid
        else:
            lo = mid
    c = seats(hi)
    extras = num_phy - sum(c)
    if extras <= 0:
        return c, False
    ambiguous = False
    tail = min(max(1, int(round(0.1 * (num_phy - n)))), extras)
    bulk = extras - tail
    while bulk > 0:
        k = min(bulk, n)
        score = [w[i] / c[i] for i in range(n)]
        order = sorted(range(n), key=lambda i: -score[i])
        if k < n and score[order[k - 1]] == score[order[k]]:
            ambiguous = True  # the chunk's last seat could go to either of two equal scores
        for i in order[:k]:
            c[i] += 1
        bulk -= k
    for _ in range(num_phy - sum(c)):
        if n == 1:
            c[0] += 1
            continue
        avg = [w[i] / c[i] for i in range(n)]
        d_idx, d_tie = _first_max([w[i] / (c[i] + 1) for i in range(n)])
        s_idx, s_tie = _first_max([w[i] / (2 * c[i] + 1) for i in range(n)])
        ambiguous |= d_tie or s_tie
        top = sorted(range(n), key=lambda i: -avg[i])
        cur_max, cur_max_idx, second = avg[top[0]], top[0], avg[top[1]]
        keys = {}
        for cand in (d_idx, s_idx):
            new_avg = w[cand] / (c[cand] + 1)
            others = second if cand == cur_max_idx else cur_max
            keys[cand] = (max(others, new_avg), others, -w[cand])
        if d_idx != s_idx and keys[d_idx] == keys[s_idx]:
            ambiguous = True  # the design iterates a set here: its winner is arbitrary
        c[min(keys, key=keys.get)] += 1
    return c, ambiguous


def design_counts(w: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """``[X, n]`` counts and ``[X]`` ambiguous flags from :func:`design_row`."""
    rows = [design_row([float(x) for x in row], num_phy) for row in w]
    return np.array([r[0] for r in rows], dtype=np.int64).reshape(w.shape), np.array([r[1] for r in rows])


def dhondt_row(w: list[float], num_phy: int) -> list[int]:
    """Sequential D'Hondt from one seat each: the exact min-max greedy (lowest index on ties)."""
    c = [1] * len(w)
    for _ in range(num_phy - len(w)):
        c[max(range(len(w)), key=lambda i: (w[i] / c[i], -i))] += 1
    return c


def peaks(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``[X]`` max_i w_i / c_i."""
    return (w / c).max(axis=1)


def check_counts(c: torch.Tensor, shape: tuple[int, int], num_phy: int) -> np.ndarray:
    assert c.dtype == torch.int64 and tuple(c.shape) == shape
    a = c.numpy()
    assert (a >= 1).all()
    assert (a.sum(1) == num_phy).all()
    return a


# Shapes (n, num_phy) covering n == 1, n == num_phy, small and large, up to ~4n.
SHAPES = [
    (1, 1), (1, 7), (2, 2), (2, 3), (3, 10), (4, 4), (5, 6), (7, 19), (8, 9), (8, 32),
    (16, 17), (16, 40), (32, 33), (32, 100), (64, 64), (64, 72), (64, 96), (64, 288), (100, 377),
    (128, 136), (128, 144), (128, 160), (128, 512), (256, 257), (256, 300), (256, 1000),
]


def random_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Continuous weights of several flavours (no ties with probability ~1); ``[rows, n]``."""
    kind = rng.integers(4)
    if kind == 0:
        w = rng.random((rows, n)) * 1000 + 1
    elif kind == 1:
        w = rng.exponential(100.0, (rows, n)) + 1e-3
    elif kind == 2:  # Zipf-like skew
        w = 1e4 / (1 + rng.permutation(n)[None, :]) ** rng.uniform(0.5, 1.5) * rng.uniform(0.9, 1.1, (rows, n))
    else:  # lognormal heavy tail
        w = np.exp(rng.normal(3.0, 1.5, (rows, n)))
    return w


# ----------------------------------------------------------------------------------------------
# Seed equivalence
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,num_phy", SHAPES)
def test_same_counts_as_seed_on_continuous_rows(n, num_phy):
    rng = np.random.default_rng(n * 1000 + num_phy)
    w = random_rows(rng, 6, n)
    got = check_counts(replica_counts(torch.from_numpy(w), num_phy), w.shape, num_phy)
    ref, ambiguous = design_counts(w, num_phy)
    assert not ambiguous.any()  # continuous weights: the design's answer is unique
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(peaks(w, got), peaks(w, ref))


@pytest.mark.parametrize("n,num_phy", SHAPES)
def test_same_peak_as_seed_on_integer_rows_and_same_counts_where_unique(n, num_phy):
    # Small integers: many quotients tie, so the bulk fill and the hybrid tail both run.
    rng = np.random.default_rng(7 * n + num_phy)
    w = rng.integers(0, rng.choice([3, 10, 50]), (8, n)).astype(np.float64)
    w[0] = 0.0  # an all-zero row
    w[1, : n // 2] = 0.0  # a row with zeros
    got = check_counts(replica_counts(torch.from_numpy(w), num_phy), w.shape, num_phy)
    ref, ambiguous = design_counts(w, num_phy)
    np.testing.assert_array_equal(peaks(w, got), peaks(w, ref))
    np.testing.assert_array_equal(got[~ambiguous], ref[~ambiguous])


def test_hybrid_tail_is_exercised_and_matches_seed_counts():
    # Rows where the design leaves seats to its tail and decides them unambiguously: the tail rule
    # itself (D'Hondt vs Sainte-Lague by predicted peak, runner-up, heavier) is compared exactly.
    rng = np.random.default_rng(11)
    compared = tail_rows = 0
    for _ in range(60):
        n = int(rng.integers(2, 12))
        num_phy = n + int(rng.integers(1, 3 * n + 1))
        w = rng.integers(1, 9, (20, n)).astype(np.float64)
        ref, ambiguous = design_counts(w, num_phy)
        got = counts_np(w, num_phy)
        level = np.maximum(np.ceil(w / peaks(w, ref)[:, None]), 1).sum(1)  # seats at the optimal peak
        np.testing.assert_array_equal(got[~ambiguous], ref[~ambiguous])
        compared += int((~ambiguous).sum())
        tail_rows += int((~ambiguous & (level < num_phy)).sum())
    assert tail_rows > 50 and compared > 500  # the comparison above covered real tail decisions


def test_tail_tie_break_goes_to_the_heavier_expert():
    # w = [2, 4], 4 seats: quotients 4, 2, 2, 4/3, ...; the level (3rd largest, tied) is 2, its
    # counts [1, 2] leave one seat for the tail. Both picks (w/(c+1) = [1, 4/3], w/(2c+1) =
    # [2/3, 4/5]) name expert 1 and the new peak is 2 either way: [1, 3]. Plain D'Hondt gives the
    # seat to argmax w/c = [2, 2], the lowest index: [2, 2]. Same peak, different tie rule.
    w = torch.tensor([[2.0, 4.0], [4.0, 2.0]])
    assert replica_counts(w, 4).tolist() == [[1, 3], [3, 1]]
    assert replica_counts(w, 4, method="dhondt").tolist() == [[2, 2], [3, 1]]
    assert design_row([2.0, 4.0], 4) == ([1, 3], False)
    # w = [3, 6, 6], 6 seats: level 3 with counts [1, 2, 2]; for the last seat both picks tie
    # between experts 1 and 2 (w/(c+1) = [1.5, 2, 2]); the design leaves that to torch (the reference
    # flags it), the implementation takes the first: [1, 3, 2].
    assert replica_counts(torch.tensor([[3.0, 6.0, 6.0]]), 6).tolist() == [[1, 3, 2]]
    assert design_row([3.0, 6.0, 6.0], 6)[1] is True


def test_one_hot_expert_with_almost_all_load():
    for n, num_phy in [(8, 16), (64, 288), (128, 144), (256, 1000)]:
        rng = np.random.default_rng(n)
        w = rng.random((3, n)) * 1e-3 / n
        w[np.arange(3), rng.integers(0, n, 3)] = 0.999  # 99.9% of the load on one expert
        got = check_counts(replica_counts(torch.from_numpy(w), num_phy), w.shape, num_phy)
        ref, ambiguous = design_counts(w, num_phy)
        assert not ambiguous.any()
        np.testing.assert_array_equal(got, ref)
        hot = w.argmax(1)
        assert (got[np.arange(3), hot] == num_phy - n + 1).all()  # every extra seat goes to it


def test_edge_cases_like_the_seed():
    # n == num_phy: ones; n == 1: everything; all-zero: even split, the first num_phy % n get one more.
    assert replica_counts(torch.rand(3, 5), 5).tolist() == [[1] * 5] * 3
    assert replica_counts(torch.tensor([[3.0], [0.0]]), 7).tolist() == [[7], [7]]
    assert replica_counts(torch.zeros(2, 4), 11).tolist() == [[3, 3, 3, 2]] * 2
    assert replica_counts(torch.zeros(1, 4), 8).tolist() == [[2, 2, 2, 2]]
    assert design_row([0.0] * 4, 11)[0] == [3, 3, 3, 2]
    assert tuple(replica_counts(torch.zeros(0, 4), 8).shape) == (0, 4)


def test_tiny_weights_are_never_worse_than_the_seed():
    # The design bisects with an absolute tolerance (hi starts at max(maxw, 1)): for loads far below 1
    # its level stops short and its chunked bulk fill decides. The exact level is at least as good.
    rng = np.random.default_rng(5)
    w = rng.random((20, 16)) * 1e-14
    got = counts_np(w, 40)
    ref, _ = design_counts(w, 40)
    assert (peaks(w, got) <= peaks(w, ref)).all()
    assert (peaks(w, got) < peaks(w, ref)).any()  # the design really is off here (a known divergence)
    np.testing.assert_array_equal(got, counts_np(w * 1e16, 40))  # the exact level is scale-free


# ----------------------------------------------------------------------------------------------
# Min-max optimality
# ----------------------------------------------------------------------------------------------
def test_peak_is_the_brute_force_optimum_on_small_rows():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 4):
        for num_phy in range(n, n + 6):
            for integer in (False, True):
                w = rng.integers(0, 6, (10, n)).astype(np.float64) if integer else rng.random((10, n)) * 10
                for method in ("hybrid_tail", "dhondt"):
                    got = check_counts(replica_counts(torch.from_numpy(w), num_phy, method=method), w.shape, num_phy)
                    for row, c in zip(w, got):
                        best = min(
                            max(x / ci for x, ci in zip(row, comp))
                            for comp in itertools.product(range(1, num_phy - n + 2), repeat=n)
                            if sum(comp) == num_phy
                        )
                        assert max(row / c) == best


@pytest.mark.parametrize("method", ["hybrid_tail", "dhondt"])
def test_peak_equals_sequential_dhondt(method):
    rng = np.random.default_rng(2)
    for n, num_phy in [(5, 13), (16, 40), (64, 288), (128, 144), (37, 100)]:
        for integer in (False, True):
            w = rng.integers(0, 20, (5, n)).astype(np.float64) if integer else random_rows(rng, 5, n)
            got = check_counts(replica_counts(torch.from_numpy(w), num_phy, method=method), w.shape, num_phy)
            ref = np.array([dhondt_row(list(r), num_phy) for r in w])
            np.testing.assert_array_equal(peaks(w, got), peaks(w, ref))
            if method == "dhondt" and not integer:
                np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------------------------
# Invariants (property tests)
# ----------------------------------------------------------------------------------------------
@st.composite
def weight_rows(draw):
    n = draw(st.integers(1, 24))
    rows = draw(st.integers(1, 4))
    num_phy = n + draw(st.integers(0, 3 * n + 2))
    elem = st.one_of(
        st.integers(0, 5).map(float),
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False),
        st.sampled_from([0.0, 1e-300, 1e-12, 1e300]),  # extreme but normal (subnormals: see below)
    )
    w = draw(st.lists(st.lists(elem, min_size=n, max_size=n), min_size=rows, max_size=rows))
    return np.array(w, dtype=np.float64), num_phy


@settings(max_examples=150, deadline=None)
@given(weight_rows(), st.sampled_from(["hybrid_tail", "dhondt"]))
def test_counts_invariants_and_optimal_peak(case, method):
    w, num_phy = case
    got = check_counts(replica_counts(torch.from_numpy(w), num_phy, method=method), w.shape, num_phy)
    ref = np.array([dhondt_row(list(r), num_phy) for r in w])
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(peaks(w, got), peaks(w, ref))


@pytest.mark.parametrize(
    "rows,num_phy",
    [
        ([[5e-324, 0.0]], 4),  # IndexError
        ([[1.0, 1.0], [5e-324, 5e-324]], 6),  # silently returns counts around -9.2e18 for row 1
        ([[1e308, 1e308]], 4),  # the row total overflows to inf: IndexError
    ],
)
def test_extreme_finite_loads_give_valid_counts(rows, num_phy):
    w = torch.tensor(rows, dtype=torch.float64)
    with np.errstate(all="ignore"):
        got = check_counts(replica_counts(w, num_phy), tuple(w.shape), num_phy)
    ref = np.array([dhondt_row(list(r), num_phy) for r in w.numpy()])
    np.testing.assert_array_equal(peaks(w.numpy(), got), peaks(w.numpy(), ref))


def test_deterministic():
    w = torch.from_numpy(np.random.default_rng(3).integers(0, 4, (50, 64)).astype(np.float64))
    assert torch.equal(replica_counts(w, 200), replica_counts(w, 200))


# ----------------------------------------------------------------------------------------------
# dtypes, devices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8]
)
def test_dtypes_give_the_float64_answer_where_exact(dtype):
    w64 = torch.from_numpy(np.random.default_rng(4).integers(0, 200, (6, 32)).astype(np.float64))
    want = replica_counts(w64, 100)
    got = replica_counts(w64.to(dtype), 100)
    assert got.dtype == torch.int64 and got.device.type == "cpu"
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_gives_cuda_output():
    w = torch.rand(4, 16, device="cuda")
    got = replica_counts(w, 40)
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert torch.equal(got.cpu(), replica_counts(w.cpu(), 40))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weight,num_phy,kwargs,match",
    [
        (torch.ones(4), 8, {}, r"2-D.*\(4,\)"),
        (torch.ones(2, 2, 2), 8, {}, r"2-D.*\(2, 2, 2\)"),
        (torch.tensor([[1.0, float("nan")]]), 4, {}, r"weight\[0, 1\] = nan"),
        (torch.tensor([[1.0], [float("inf")]]), 4, {}, r"weight\[1, 0\] = inf"),
        (torch.tensor([[1.0, -2.0]]), 4, {}, r"weight\[0, 1\] = -2"),
        (torch.tensor([[1, -3]]), 4, {}, r"weight\[0, 1\] = -3"),
        (torch.ones(2, 5), 4, {}, r"num_phy=4"),
        (torch.ones(2, 5), 6.0, {}, r"num_phy=6\.0"),
        (torch.ones(2, 5), True, {}, r"num_phy=True"),
        (torch.ones(2, 0), 3, {}, r"n=0"),
        (torch.ones(2, 5), 6, {"method": "sainte"}, r"method='sainte'"),
        (np.ones((2, 5)), 6, {}, r"ndarray"),
        (torch.ones(2, 2, dtype=torch.bool), 4, {}, r"torch.bool"),
    ],
)
def test_errors_name_the_bad_value(weight, num_phy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        replica_counts(weight, num_phy, **kwargs)
