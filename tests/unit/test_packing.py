"""Packing stages (solver/packing.py): rounds, serpentine, surplus repair, swap refinement.

Replica placements are ``slot_owner [B, P, S]`` (the owner, i.e. node-local expert, in each slot of
each bin); owner ``e`` has ``counts[e]`` replicas of load ``expert_load[e] / counts[e]``, and a bin
may hold at most ``cap = ceil(count / P)`` of them.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.solver.packing import (
    pack_rounds,
    pack_snake,
    pack_with_base,
    place_replicas,
    refine_swaps,
    separate_copies,
    surplus_copies,
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def caps(counts: np.ndarray, num_bins: int) -> np.ndarray:
    """``[B, n]`` copies of each owner a bin must be allowed: ``ceil(count / P)``."""
    return -(-counts // num_bins)


def held(slot_owner: np.ndarray, n: int) -> np.ndarray:
    """``[B, P, n]`` replicas of each owner in every bin."""
    return (slot_owner[..., None] == np.arange(n)).sum(2)


def check_slot_owner(slot_owner: np.ndarray, counts: np.ndarray, num_bins: int) -> None:
    """Shape ``[B, P, S]``, and every owner has exactly its ``counts`` replicas in each row."""
    num_rows, n = counts.shape
    assert slot_owner.shape == (num_rows, num_bins, int(counts[0].sum()) // num_bins)
    assert slot_owner.dtype == np.int64
    np.testing.assert_array_equal(held(slot_owner, n).sum(1), counts)


def bin_loads(slot_owner: np.ndarray, per_replica: np.ndarray) -> np.ndarray:
    """``[B, P]`` computed independently of the code under test."""
    return np.take_along_axis(per_replica, slot_owner.reshape(slot_owner.shape[0], -1), 1).reshape(
        slot_owner.shape
    ).sum(-1)


def n_surplus(slot_owner: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """``[B]`` replicas over their owner's per-bin cap (counted by hand, not by surplus_copies)."""
    over = held(slot_owner, cap.shape[1]) - cap[:, None, :]
    return np.maximum(over, 0).sum((1, 2))


def random_counts(rng: np.random.Generator, num_rows: int, n: int, num_items: int, max_count=None) -> np.ndarray:
    """``[B, n]`` counts >= 1 summing to ``num_items`` (each <= max_count when given and possible)."""
    counts = np.ones((num_rows, n), dtype=np.int64)
    for row in counts:
        for _ in range(num_items - n):
            room = np.nonzero(row < max_count)[0] if max_count else np.arange(n)
            row[rng.choice(room if room.size else np.arange(n))] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# pack_rounds
# ----------------------------------------------------------------------------------------------
def test_pack_rounds_hand_checked():
    # Round 0: 5 -> bin 0, 4 -> bin 1. Round 1 (lightest bin first): 3 -> bin 1 (7), 3 -> bin 0 (8).
    # Round 2: 2 -> bin 1 (9), 1 -> bin 0 (9).
    load = np.array([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]])
    assign = pack_rounds(load, 2)
    assert assign.tolist() == [[[0, 3, 5], [1, 2, 4]]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.sampled_from(["float", "int", "zero"]),
       st.integers(0, 2**32 - 1))
def test_pack_rounds_fills_every_bin_and_deals_by_rounds(num_bins, slots, num_rows, kind, seed):
    rng = np.random.default_rng(seed)
    num_items = num_bins * slots
    load = {
        "float": rng.random((num_rows, num_items)),
        "int": rng.integers(0, 4, (num_rows, num_items)).astype(np.float64),
        "zero": np.zeros((num_rows, num_items)),
    }[kind]
    assign = pack_rounds(load, num_bins)
    assert assign.shape == (num_rows, num_bins, slots)
    for row in assign:  # exactly S items per bin, every item once
        assert sorted(row.ravel().tolist()) == list(range(num_items))
    # Slot r of every bin holds one of the r-th P heaviest items (one item of each load tier).
    rank = np.empty_like(load, dtype=np.int64)
    np.put_along_axis(rank, np.argsort(-load, 1, kind="stable"), np.arange(num_items)[None], 1)
    tier = np.take_along_axis(rank, assign.reshape(num_rows, -1), 1).reshape(assign.shape) // num_bins
    assert (tier == np.arange(slots)).all()
    # Within each round a strictly heavier item never went to a strictly heavier bin.
    loads = np.take_along_axis(load, assign.reshape(num_rows, -1), 1).reshape(assign.shape)  # [B, P, S]
    before = np.cumsum(loads, 2) - loads  # [B, P, S] bin loads before each round
    heavier_item = loads[:, :, None, :] > loads[:, None, :, :]  # [B, P, P, S] bin i's item > bin j's
    heavier_bin = before[:, :, None, :] > before[:, None, :, :] + 1e-12
    assert not (heavier_item & heavier_bin).any()


# ----------------------------------------------------------------------------------------------
# pack_snake
# ----------------------------------------------------------------------------------------------
def snake_ok(expert_load: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Run pack_snake and check it: valid, and owners with <= P replicas on distinct bins."""
    slot_owner = pack_snake(expert_load, counts, num_bins)
    check_slot_owner(slot_owner, counts, num_bins)
    h = held(slot_owner, counts.shape[1])  # [B, P, n]
    small = np.broadcast_to((counts <= num_bins)[:, None, :], h.shape)
    assert (h[small] <= 1).all(), f"two replicas of one owner on a bin: {slot_owner.tolist()}"
    return slot_owner


def test_pack_snake_hand_checked_turn_straddle():
    # P = 2. Owner 0: 2 replicas of 3; owner 1: 3 replicas of 1; owner 2: 1 replica of 0.5.
    # Dealing order 0 0 | 1 1 | 1 2: a plain serpentine deals round 1 backward (bins 1, 0) and
    # round 2 forward (bins 0, 1): owner 1 would end round 1 and start round 2 on bin 0.
    slot_owner = snake_ok(np.array([[6.0, 3.0, 0.5]]), np.array([[2, 3, 1]]), 2)
    assert [sorted(b) for b in slot_owner[0].tolist()] in ([[0, 1, 2], [0, 1, 1]], [[0, 1, 1], [0, 1, 2]])
    # Serpentine: every bin gets one replica of each load tier (column r = round r).
    assert sorted(slot_owner[0, :, 0].tolist()) == [0, 0]
    assert sorted(slot_owner[0, :, 2].tolist()) == [1, 2]


@pytest.mark.parametrize(
    "counts,num_bins",
    [
        ([3, 1, 3, 1, 1, 1, 1, 1], 4),  # owner 0 straddles turn 0->1, owner 2 straddles turn 1->2
        ([2, 3, 1, 3, 1, 1, 1], 4),  # a rotation at one turn reaches the next turn's straddler
        ([1, 2, 2, 2, 2, 2, 2, 2, 1], 2),  # every turn straddled (P = 2)
        ([3] * 12, 4),  # blocks of 3 on 4 bins: the straddle drifts every round
        ([5] * 8, 8),  # 8 bins (a common GPUs per node): every turn straddled
        ([7] * 16, 8),
        ([8, 8, 8, 8], 8),  # whole rounds of one owner
        ([1, 8, 7, 8, 8], 8),
        ([4, 4, 4, 3, 1, 4, 4], 4),
        ([2, 3, 3, 3, 3, 2], 4),
        ([1] + [7] * 10 + [1], 8),
    ],
)
def test_pack_snake_adversarial_straddles(counts, num_bins):
    counts = np.array([counts])
    n = counts.shape[1]
    rng = np.random.default_rng(n)
    # Per-replica loads decreasing by owner (blocks in the listed order), increasing, shuffled, equal.
    for per_replica in (n - np.arange(n), 1.0 + np.arange(n), rng.permutation(n) + 1.0, np.ones(n)):
        snake_ok(counts * per_replica.astype(np.float64)[None], counts, num_bins)


@st.composite
def snake_cases(draw):
    num_bins = draw(st.integers(2, 8))
    slots = draw(st.integers(1, 8))
    num_rows = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_items = num_bins * slots
    n = int(rng.integers(max(1, -(-num_items // num_bins)), num_items + 1))  # counts <= P possible
    counts = random_counts(rng, num_rows, n, num_items, max_count=num_bins)
    flavour = draw(st.sampled_from(["random", "ties", "equal"]))
    if flavour == "random":
        expert_load = rng.random(counts.shape) * 100
    elif flavour == "ties":
        expert_load = counts * rng.integers(1, 4, counts.shape).astype(np.float64)  # equal per-replica loads
    else:
        expert_load = np.ones(counts.shape)
    return expert_load, counts, num_bins


@settings(max_examples=200, deadline=None)
@given(snake_cases())
def test_pack_snake_never_doubles_an_owner_with_at_most_p_replicas(case):
    snake_ok(*case)


def test_pack_snake_random_sweep():
    # A broad fixed-seed sweep (cheap: pure numpy, batched) over the shapes the solver meets.
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_bins, slots = int(rng.integers(2, 9)), int(rng.integers(2, 10))
        num_items = num_bins * slots
        n = int(rng.integers(slots, num_items + 1))
        counts = random_counts(rng, 4, n, num_items, max_count=num_bins)
        snake_ok(rng.random((4, n)) * counts, counts, num_bins)


def test_pack_snake_mixes_hot_and_cold():
    # Distinct owners, one replica each: bin b gets tiers b, 2P-1-b, 2P+b, ... (serpentine).
    counts = np.ones((1, 8), dtype=np.int64)
    slot_owner = snake_ok(np.array([[8.0, 7, 6, 5, 4, 3, 2, 1]]), counts, 4)
    assert slot_owner[0].tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]


# ----------------------------------------------------------------------------------------------
# surplus_copies / separate_copies
# ----------------------------------------------------------------------------------------------
def test_surplus_copies_marks_copies_beyond_the_cap():
    slot_owner = np.array([[[0, 0, 1], [2, 2, 2]]])
    cap = np.array([[1, 1, 2]])
    # Owner 2 (3 replicas, 2 bins) is missing from bin 0, so both its later copies in bin 1 are
    # avoidable duplicates, not only the one beyond its cap.
    assert surplus_copies(slot_owner, cap).tolist() == [[[False, True, False], [False, True, True]]]


def test_surplus_copies_marks_doubling_up_while_a_bin_lacks_the_owner():
    # Owner 0 has 5 replicas on 4 bins: [2, 2, 1, 0] is within cap 2 but wastes a slot.
    slot_owner = np.array([[[0, 0, 1], [0, 0, 2], [0, 3, 4], [5, 6, 7]]])
    cap = np.array([[2, 1, 1, 1, 1, 1, 1, 1]])
    flags = surplus_copies(slot_owner, cap)
    assert flags[0, :2, 1].tolist() == [True, True] and flags.sum() == 2
    # Spread as [2, 1, 1, 1] it is minimal: nothing to flag.
    assert not surplus_copies(np.array([[[0, 0, 1], [0, 2, 3], [0, 4, 5], [0, 6, 7]]]), cap).any()


def test_separate_copies_repairs_hand_made_surplus():
    # 2 bins x 3 slots; owner 0 has 2 replicas (cap 1), both in bin 0. Per-replica loads 5, 4, 3, 2, 1.
    per_replica = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    cap = np.ones((1, 5), dtype=np.int64)
    slot_owner = np.array([[[0, 0, 4], [1, 2, 3]]])
    fixed = separate_copies(slot_owner, per_replica, cap)
    check_slot_owner(fixed, np.array([[2, 1, 1, 1, 1]]), 2)
    assert n_surplus(fixed, cap).tolist() == [0]
    # The surplus copy (load 5) swaps with the closest-load replica it may take: owner 1 (load 4).
    assert sorted(fixed[0, 0].tolist()) == [0, 1, 4] and sorted(fixed[0, 1].tolist()) == [0, 2, 3]
    assert slot_owner.tolist() == [[[0, 0, 4], [1, 2, 3]]]  # the input is not modified


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_separate_copies_removes_every_surplus_copy_of_the_serpentine(num_bins, slots, num_rows, seed):
    # Crowded owners (counts above P) are where the serpentine alone can exceed a cap.
    rng = np.random.default_rng(seed)
    num_items = num_bins * slots
    n = int(rng.integers(1, max(2, num_items // 2)))
    counts = random_counts(rng, num_rows, n, num_items)
    expert_load = rng.random((num_rows, n)) * counts
    cap = caps(counts, num_bins)
    start = pack_snake(expert_load, counts, num_bins)
    fixed = separate_copies(start, expert_load / counts, cap)
    check_slot_owner(fixed, counts, num_bins)
    assert (n_surplus(fixed, cap) == 0).all()
    np.testing.assert_array_equal(surplus_copies(fixed, cap), False)
    # Rows that had no surplus (beyond a cap, or doubled up while a bin lacks the owner) are left alone.
    clean = ~surplus_copies(start, cap).reshape(num_rows, -1).any(1)
    np.testing.assert_array_equal(fixed[clean], start[clean])


def test_separate_copies_from_a_crowded_start():
    # Listing order (each owner's replicas packed together) with several owners over their cap.
    counts = np.array([[3, 3, 3, 3]])
    start = np.array([[[0, 0, 0, 1], [1, 1, 2, 2], [2, 3, 3, 3]]])
    fixed = separate_copies(start, np.array([[4.0, 3.0, 2.0, 1.0]]), caps(counts, 3))
    check_slot_owner(fixed, counts, 3)
    assert (held(fixed, 4) == 1).all()


def test_separate_copies_does_not_give_up_while_another_surplus_slot_can_move():
    # Caps are all 1 (4 bins, counts 4, 2, 2, 4): the answer exists ([0, 3, 1] [0, 3, 1] [0, 3, 2]
    # [0, 3, 2] up to order). From this start the repair swaps bin 0's second 0 with a 3 of bin 2,
    # then bin 0's third 0 can only go to bin 3 = [3, 3, 3], and a 3 may not enter bin 0 (it holds
    # one): it stops with a surplus in every bin, though bin 3's extra 3s could move to bin 1.
    counts = np.array([[4, 2, 2, 4]])
    start = np.array([[[0, 0, 0], [0, 1, 1], [2, 2, 3], [3, 3, 3]]])
    fixed = separate_copies(start, np.array([[1.0, 2.0, 4.0, 3.0]]), caps(counts, 4))
    check_slot_owner(fixed, counts, 4)
    assert n_surplus(fixed, caps(counts, 4)).tolist() == [0]


# ----------------------------------------------------------------------------------------------
# refine_swaps
# ----------------------------------------------------------------------------------------------
def test_refine_swaps_hand_checked():
    # Bin 0 holds 6 + 5 = 11, bin 1 holds 4 + 3 = 7 (gap 4): swapping 6 <-> 4 (or 5 <-> 3) gives 9 / 9.
    per_replica = np.array([[6.0, 5.0, 4.0, 3.0]])
    cap = np.ones((1, 4), dtype=np.int64)
    out, load = refine_swaps(np.array([[[0, 1], [2, 3]]]), per_replica, cap)
    check_slot_owner(out, np.ones((1, 4), dtype=np.int64), 2)
    assert load.tolist() == [[9.0, 9.0]] == bin_loads(out, per_replica).tolist()


def test_refine_swaps_respects_owners():
    # Owners 0..4 with per-replica loads 4, 2, 2, 0, 0; owner 3 has two replicas.
    # Bin 0 = [3, 4, 1] = 2, bin 1 = [2, 0, 3] = 6, gap 4; swap scores min(d, gap - d):
    # 2 <-> 3 (d = 2) scores 2 but puts a second owner-3 replica on bin 1; 2 <-> 4 scores 2 too
    # (and comes later in slot order); 0 <-> 1 as well. Result: 4 / 4 with owner 3 still apart.
    per_replica = np.array([[4.0, 2.0, 2.0, 0.0, 0.0]])
    counts = np.array([[1, 1, 1, 2, 1]])
    slot_owner = np.array([[[3, 4, 1], [2, 0, 3]]])
    out, load = refine_swaps(slot_owner, per_replica, caps(counts, 2))
    check_slot_owner(out, counts, 2)
    assert load.tolist() == [[4.0, 4.0]]
    assert n_surplus(out, caps(counts, 2)).tolist() == [0]
    assert [sorted(b) for b in out[0].tolist()] == [[1, 2, 3], [0, 3, 4]]
    # Even with a cap of two, owner 3 may not double up on bin 1 while leaving bin 0 without it
    # (that wastes a slot for nothing): the same swap as above is taken.
    out, load = refine_swaps(slot_owner, per_replica, np.array([[1, 1, 1, 2, 1]]))
    assert [sorted(b) for b in out[0].tolist()] == [[1, 2, 3], [0, 3, 4]]
    assert load.tolist() == [[4.0, 4.0]]


def test_refine_swaps_does_nothing_without_an_improving_swap():
    # Bin 0 = 5 + 1 = 6, bin 1 = 4 + 3 = 7... gap 1: d must lie in (0, 1): 4 - ... none does.
    per_replica = np.array([[5.0, 1.0, 4.0, 3.0]])
    slot_owner = np.array([[[0, 1], [2, 3]]])
    out, load = refine_swaps(slot_owner, per_replica, np.ones((1, 4), dtype=np.int64))
    assert out.tolist() == slot_owner.tolist() and load.tolist() == [[6.0, 7.0]]
    # pairs=0 or sweeps=0: unchanged too.
    per_replica = np.array([[6.0, 5.0, 4.0, 3.0]])
    for kwargs in ({"pairs": 0}, {"sweeps": 0}):
        out, load = refine_swaps(slot_owner, per_replica, np.ones((1, 4), dtype=np.int64), **kwargs)
        assert out.tolist() == slot_owner.tolist() and load.tolist() == [[11.0, 7.0]]


@st.composite
def refine_cases(draw):
    num_bins = draw(st.integers(2, 8))
    slots = draw(st.integers(1, 6))
    num_rows = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_items = num_bins * slots
    n = int(rng.integers(1, num_items + 1))
    counts = random_counts(rng, num_rows, n, num_items)
    if draw(st.booleans()):
        expert_load = (rng.integers(0, 5, counts.shape) * counts).astype(np.float64)
    else:
        expert_load = rng.random(counts.shape) * counts
    return expert_load, counts, num_bins, rng, draw(st.integers(1, 4)), draw(st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(refine_cases(), st.sampled_from(["snake", "random"]))
def test_refine_swaps_never_raises_a_max_nor_creates_a_surplus(case, start):
    expert_load, counts, num_bins, rng, pairs, sweeps = case
    num_rows, n = counts.shape
    per_replica = expert_load / counts
    cap = caps(counts, num_bins)
    if start == "snake":
        slot_owner = pack_snake(expert_load, counts, num_bins)
    else:
        slot_owner = np.stack([rng.permutation(np.repeat(np.arange(n), c)) for c in counts]).reshape(
            num_rows, num_bins, -1
        )
    before = slot_owner.copy()
    out, load = refine_swaps(slot_owner, per_replica, cap, pairs, sweeps)
    np.testing.assert_array_equal(slot_owner, before)  # input untouched
    check_slot_owner(out, counts, num_bins)
    np.testing.assert_allclose(load, bin_loads(out, per_replica), rtol=1e-9, atol=1e-9)
    assert (bin_loads(out, per_replica).max(1) <= bin_loads(before, per_replica).max(1) + 1e-9).all()
    # Per row, per (bin, owner): a count over the cap never grows, and none appears.
    h0, h1 = held(before, n), held(out, n)
    over0, over1 = h0 > cap[:, None, :], h1 > cap[:, None, :]
    assert not (over1 & ~over0).any()
    assert (np.where(over0, h1 <= h0, True)).all()


# ----------------------------------------------------------------------------------------------
# place_replicas (the three stages together)
# ----------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(refine_cases())
def test_place_replicas_has_no_avoidable_copies(case):
    expert_load, counts, num_bins, *_ = case
    slot_owner, load = place_replicas(expert_load, counts, num_bins)
    check_slot_owner(slot_owner, counts, num_bins)
    assert (n_surplus(slot_owner, caps(counts, num_bins)) == 0).all()
    per_replica = expert_load / counts
    np.testing.assert_allclose(load, bin_loads(slot_owner, per_replica), rtol=1e-9, atol=1e-9)
    # No worse than the dealing it starts from when that needed no repair (refinement only lowers):
    # the serpentine, or where an owner has more replicas than bins, the serpentine over a base.
    cap = caps(counts, num_bins)
    start = pack_snake(expert_load, counts, num_bins) if (cap == 1).all() else pack_with_base(
        expert_load, counts, num_bins)
    clean = ~surplus_copies(start, cap).reshape(len(start), -1).any(1)
    peak, start_peak = bin_loads(slot_owner, per_replica).max(1), bin_loads(start, per_replica).max(1)
    assert (peak[clean] <= start_peak[clean] + 1e-9).all()


def test_place_replicas_repairs_serpentine_overflow_of_crowded_owners():
    # Owners with more replicas than bins: find a serpentine that exceeds a cap, then check that
    # place_replicas brings every bin within cap.
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(300):
        num_bins, slots = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        num_items = num_bins * slots
        n = int(rng.integers(1, max(2, num_items // 2)))
        counts = random_counts(rng, 2, n, num_items)
        expert_load = rng.random((2, n)) * counts
        cap = caps(counts, num_bins)
        found += int((n_surplus(pack_snake(expert_load, counts, num_bins), cap) > 0).sum())
        slot_owner, _ = place_replicas(expert_load, counts, num_bins)
        check_slot_owner(slot_owner, counts, num_bins)
        assert (n_surplus(slot_owner, cap) == 0).all(), (counts.tolist(), expert_load.tolist())
    assert found >= 5  # the repair really ran
