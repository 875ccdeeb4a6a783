"""Packing stages: items (groups or expert replicas) into bins (nodes or GPUs) with equal slots.

All functions work on numpy arrays batched over ``B`` independent rows (layers, or layer x node
sub-problems) and are vectorised across rows; the only Python loops run over rounds of slots and
refinement sweeps, never over rows.

Vocabulary: a row has ``P`` bins (nodes or GPUs) of ``S`` slots each. Groups -> nodes packs
distinct items (:func:`pack_rounds`). Replicas -> GPUs packs the replicas of ``n`` owners (logical
experts): owner ``e`` has ``counts[e]`` replicas, each carrying ``expert_load[e] / counts[e]``;
replicas of one owner are interchangeable, so a placement is just ``slot_owner [B, P, S]``, the
owner in each slot of each bin. Two replicas of one owner in a bin waste a slot, so a bin may hold
at most ``cap = ceil(count / P)`` of an owner: one, unless the owner has more replicas than bins.

Where numba is installed, :func:`pack_rounds`, :func:`pack_snake` and the sweeps of
:func:`refine_swaps` run as compiled kernels (:mod:`ray_eplb.solver.compiled`) with the same
results; the numpy code below is the reference and the fallback. Every sort whose ties could
change a plan is stable, so plans are the same on every machine (numpy's default sort differs
between CPUs with and without AVX-512).
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver import compiled
from ray_eplb.solver.counts import counts_np
from ray_eplb.solver.maps import bin_counts, per_slot, replica_shares
from ray_eplb.solver.repair import (  # noqa: F401 (surplus_copies, separate_copies: re-exported)
    separate_copies,
    separate_copies_batched,
    surplus_copies,
)


def pack_rounds(load: np.ndarray, num_bins: int) -> np.ndarray:
    """Balanced packing by rounds (LPT per round), for distinct items such as expert groups.

    Items are taken heaviest first, ``P`` per round (``S`` rounds); within a round, items sorted by
    load descending meet bins sorted by load ascending (the min-max optimal matching for one round).

    Args:
        load: ``[B, M]`` float64 item loads.
        num_bins: ``P``; must divide ``M``.

    Returns:
        ``assign [B, P, S]`` int64 item indices.
    """
    if compiled.ENABLED:  # the same rounds, compiled (identical plans)
        return compiled.rounds_kernel(load, num_bins)
    num_rows, num_items = load.shape
    slots = num_items // num_bins
    rows = np.arange(num_rows)[:, None]  # [B, 1]
    offs = rows * num_bins  # flat indexing (row offset + column): cheaper than 2-D fancy indexing
    order = np.argsort(-load, axis=1, kind="stable")  # [B, M] heaviest first
    sorted_load = np.take_along_axis(load, order, 1).reshape(num_rows, slots, num_bins)  # [B, S, P]
    bin_load = np.zeros((num_rows, num_bins))  # [B, P] ascending
    perm = np.tile(np.arange(num_bins), (num_rows, 1))  # [B, P] bin id at each rank
    bin_of = np.empty((num_rows, slots, num_bins), dtype=np.int64)  # [B, S, P] bin of each item
    for r in range(slots):
        bin_of[:, r] = perm
        new = bin_load + sorted_load[:, r]  # lightest bin takes the heaviest item
        idx = np.argsort(new, axis=1, kind="stable") + offs  # stable: the same plan on every machine
        bin_load, perm = new.ravel()[idx], perm.ravel()[idx]
    assign = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    assign[rows[:, :, None], bin_of, np.arange(slots)[None, :, None]] = order.reshape(num_rows, slots, num_bins)
    return assign


def pack_snake(expert_load: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Serpentine packing of replicas that keeps each owner's replicas on distinct bins.

    Replicas sorted by load descending are dealt in rounds of ``P``: forward over the bins in
    even rounds, backward in odd ones, so every bin gets one replica of every load tier (hot and
    cold experts mixed on every GPU) and the rounds' excesses cancel pairwise. Replicas of one
    owner have equal loads and sit together, so within a round they meet distinct bins; only the
    owner that ends a round and goes on into the next could meet itself, since the turn revisits
    the bins just dealt. Its replicas of the new round go to the first positions whose bins it
    does not hold; the others keep their order on the remaining positions. So no bin holds two
    replicas of an owner with at most ``P`` of them.

    Args:
        expert_load: ``[B, n]`` float64 load of each owner (split evenly among its replicas).
        counts: ``[B, n]`` int64 replicas per owner (>= 1); every row sums to ``M = P * S``.
        num_bins: ``P``; must divide ``M``.

    Returns:
        ``slot_owner [B, P, S]`` int64.
    """
    if compiled.ENABLED:  # the same dealing, compiled (identical plans)
        return compiled.snake_kernel(expert_load, counts, num_bins)
    num_rows, n = counts.shape
    num_items = int(counts[0].sum())
    slots = num_items // num_bins
    rows = np.arange(num_rows)[:, None]  # [B, 1]
    rank = np.arange(num_bins)  # [P]
    # Sort owners (not replicas) by per-replica load, then expand: cheaper than sorting M items.
    by_owner = np.argsort(-(expert_load / counts), axis=1, kind="stable")  # [B, n]
    sorted_counts = np.take_along_axis(counts, by_owner, 1)  # [B, n]
    own = np.repeat(by_owner.ravel(), sorted_counts.ravel()).reshape(num_rows, slots, num_bins)  # [B, S, P]
    pos = np.tile(rank, (num_rows, slots, 1))  # [B, S, P] dealing position of each replica in its round
    if slots > 1:
        # The owner ending round r (position q-1, q = (r+1)P) is the block around q-1 of the sorted
        # replicas; found for all rows at once by one search over row-offset block ends.
        ends = np.cumsum(sorted_counts, 1) + rows * num_items  # [B, n] flat end of each owner's block
        q = (np.arange(1, slots) * num_bins)[None, :] + rows * num_items  # [B, S-1] flat round starts
        block = np.searchsorted(ends.ravel(), q - 1, side="right")  # [B, S-1] flat block index
        end = ends.ravel()[block]
        start = end - sorted_counts.ravel()[block]
        lead = np.clip(end - q, 0, num_bins)  # [B, S-1] its replicas in the next round
        tail = np.where(lead > 0, q - np.maximum(start, q - num_bins), 0)  # [B, S-1] ... in this round
        # Usual case, all turns at once: the straddler's tail took the bins of the next round's
        # first `tail` positions, so rotate that round's first tail+lead positions by `tail`: the
        # next `tail` replicas go first, its `lead` replicas right after.
        span = lead + tail  # [B, S-1] positions a turn rotates (0 where nothing straddles)
        t = np.where(span <= num_bins, tail, 0)[..., None]
        span_ok = np.where(span <= num_bins, span, 0)[..., None]
        i = pos[:, 1:]
        pos[:, 1:] = np.where(i < span_ok, (i + t) % np.maximum(span_ok, 1), i)
        # That is exact unless a rotation reaches the next straddler's tail, or an owner has more
        # replicas than bins; such rows (rare with many bins) redo their turns one at a time.
        next_tail = np.concatenate([tail[:, 1:], np.zeros_like(tail[:, :1])], 1)
        redo = ((span > 0) & (span + next_tail > num_bins)).any(1)
        if redo.any():
            sub = np.nonzero(redo)[0]
            pos[sub] = _turns_one_by_one(own[sub], lead[sub], num_bins)
    forward = (np.arange(slots) % 2 == 0)[None, :, None]  # [1, S, 1]
    bins = np.where(forward, pos, num_bins - 1 - pos)  # [B, S, P]
    slot_owner = np.empty(num_rows * num_bins * slots, dtype=np.int64)
    slot_owner[((bins + rows[:, :, None] * num_bins) * slots + np.arange(slots)[None, :, None]).ravel()] = own.ravel()
    return slot_owner.reshape(num_rows, num_bins, slots)


def _turns_one_by_one(own: np.ndarray, lead: np.ndarray, num_bins: int) -> np.ndarray:
    """Dealing positions ``[B, S, P]`` for :func:`pack_snake`, one round turn after another.

    ``own [B, S, P]``: owners in dealing order; ``lead [B, S-1]``: replicas of round ``r``'s last
    owner at the start of round ``r+1``. At each turn that owner's replicas go to the first
    positions whose bins it does not hold (all of them if it holds too many: repaired later).
    """
    num_rows, slots, _ = own.shape
    rank = np.arange(num_bins)
    offs = np.arange(num_rows)[:, None] * num_bins  # [B, 1] flat indexing: cheaper than 2-D here
    pos = np.tile(rank, (num_rows, slots, 1))
    for r in np.nonzero(lead.any(0))[0]:
        # Position q of round r+1 deals to the bin that position P-1-q of round r dealt to.
        held = np.zeros(num_rows * num_bins, dtype=bool)
        held[num_bins - 1 - pos[:, r] + offs] = own[:, r] == own[:, r, -1:]
        free = ~held.reshape(num_rows, num_bins)  # [B, P] next-round positions it may take
        n_lead = lead[:, r, None]  # [B, 1]
        chosen = free & (np.cumsum(free, 1) <= n_lead)  # [B, P] the first n_lead of them
        chosen = np.where(free.sum(1, keepdims=True) >= n_lead, chosen, rank < n_lead)
        taken = np.cumsum(chosen, 1)  # [B, P]
        item = np.where(chosen, taken - 1, n_lead + rank - taken)  # [B, P] replica dealt at each position
        nxt = np.empty(num_rows * num_bins, dtype=np.int64)
        nxt[item + offs] = rank
        pos[:, r + 1] = nxt.reshape(num_rows, num_bins)
    return pos


def pack_with_base(expert_load: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """:func:`pack_snake` for rows where an owner has more replicas than bins.

    Every owner with more than ``P`` replicas first puts ``counts // P`` copies on every bin (the
    same load on each bin); what is left (fewer than ``P`` of each owner) is dealt by
    :func:`pack_snake`, where no owner has more replicas than bins, so no bin gets a copy beyond
    ``ceil(count / P)`` and no owner misses a bin it could cover (the copy-by-copy repair this
    would otherwise need ran one copy per row per pass). Rows are dealt in groups with the same
    number of such copies per bin (a row's plan never depends on others).

    Shapes: ``expert_load``/``counts`` ``[B, n]``. Returns ``slot_owner [B, P, S]`` int64.
    """
    num_rows, n = counts.shape
    slots = int(counts[0].sum()) // num_bins
    base = np.where(counts > num_bins, counts // num_bins, 0)  # [B, n] copies every bin gets
    per_bin = base.sum(1)  # [B] slots of each bin they take
    rest = counts - base * num_bins  # [B, n] dealt, each below P
    # The dealt load per owner (its own load where nothing went to the base: bit for bit what
    # pack_snake gets without a base, so such rows are dealt exactly as before).
    rest_load = np.where(base == 0, expert_load, expert_load / counts * rest)
    out = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    for b in np.unique(per_bin):
        rows = np.nonzero(per_bin == b)[0]
        if b < slots:
            with np.errstate(invalid="ignore", divide="ignore"):  # owners with nothing left deal nothing
                out[rows, :, : slots - b] = pack_snake(rest_load[rows], rest[rows], num_bins)
        if b:  # the same base copies on every bin of a row
            copies = np.repeat(np.tile(np.arange(n), rows.size), base[rows].ravel()).reshape(rows.size, 1, b)
            out[rows, :, slots - b:] = copies
    return out


def place_replicas(
    expert_load: np.ndarray, counts: np.ndarray, num_bins: int, pairs: int | None = None, sweeps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Replicas -> GPUs: serpentine packing, a repair of any surplus copy (many per pass:
    :func:`~ray_eplb.solver.repair.separate_copies_batched`), swap refinement.

    ``pairs``: bin pairs per refinement sweep; by default ``max(4, P // 4)`` (half the bins).
    Pairing only the 4 heaviest bins leaves many bins above the level when a layer has 32 or 64
    GPUs: in-window 0.983 / 0.991 / 0.996 / 0.997 with 4 / 8 / 16 / 32 pairs at the Kimi-K2-like
    shape (61 x 384, 448 slots on 64 GPUs, synthetic load; the greedy 0.994), 0.9888 / 0.9914 /
    0.9917 with 4 / 8 / 16 at the Qwen3-235B-like one (94 x 128, 160 on 32 GPUs; the greedy
    0.9910). Every bin (``P // 2``) gained 0.1-0.3% more on the trace cases with 16 GPUs at 3-28%
    more time, where 4 pairs already beat the best published balance; so half.
    ``sweeps`` defaults to 3, or ``S // 2`` from 12 slots per GPU, at most 8
    (:func:`refine_sweeps`): a sweep moves one replica per paired bin, so bins with many slots
    need more of them. Measured in-window balancedness:
    9 slots (dsv2lite 288 on 32 GPUs) 0.9973 / 0.9982 / 0.9988 after 2 / 3 / 4 sweeps; 17 slots
    (qwen3_235b 136 on 8 GPUs) 0.99936 / 0.99972 / 0.99985 after 4 / 6 / 8.

    Shapes: ``expert_load``/``counts`` ``[B, n]`` (see :func:`pack_snake`). Returns
    ``slot_owner [B, P, S]`` and ``bin_load [B, P]`` float64.
    """
    if sweeps is None:
        sweeps = refine_sweeps(int(counts[0].sum()) // num_bins)
    if pairs is None:
        pairs = max(4, num_bins // 4)
    per_replica, cap = replica_shares(expert_load, counts, num_bins)  # [B, n]: cap, the fewest copies per bin an owner must be allowed
    slot_owner = pack_snake(expert_load, counts, num_bins) if (cap == 1).all() else pack_with_base(
        expert_load, counts, num_bins)
    if (cap > 1).any() and (not compiled.ENABLED or compiled.any_surplus(slot_owner, cap)):
        # owners with more replicas than bins: the serpentine bound is not enough
        slot_owner = separate_copies_batched(slot_owner, per_replica, cap)
    return refine_swaps(slot_owner, per_replica, cap, pairs, sweeps)


MAX_SWEEPS = 8


def refine_sweeps(slots: int) -> int:
    """Refinement sweeps for bins of ``slots`` slots: 3 below 12 slots, then ``slots // 2`` up to
    ``MAX_SWEEPS`` (see :func:`place_replicas`). A sweep scores ``S x S`` replica pairs per paired
    bin, so without the cap the refinement's work per bin grew as ``S**3``. Measured at 58 x 256
    experts on 64 GPUs (synthetic load, ``ray-eplb bench --scale`` growth shapes): at 24 / 32 slots
    per GPU, 8 sweeps instead of 12 / 16 cost 0.03% / 0.05% in-window balancedness (0.99954 vs
    0.99985, 0.99944 vs 0.99994) and changed next-window by +0.05% / +0.04%, for 12% / 30% less time;
    the plan's time then grows 3.2x from 8 to 32 slots per GPU (4.6x before). The trace cases have
    at most 17 slots per GPU (8 sweeps): unchanged."""
    return 3 if slots < 12 else min(slots // 2, MAX_SWEEPS)


def counts_and_place(
    expert_load: np.ndarray, num_phy: int, num_bins: int, method: str = "hybrid_tail", pairs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Replica counts (:func:`~ray_eplb.solver.counts.counts_np`) then :func:`place_replicas`:
    one compiled call where numba is present (same results), else the numpy stages.

    Shapes: ``expert_load [B, n]`` float64. Returns ``slot_owner [B, P, S]`` and ``bin_load [B, P]``.
    """
    num_rows, n = expert_load.shape
    if compiled.ENABLED and num_rows and 1 < n < num_phy:
        slots = num_phy // num_bins
        k = min(max(4, num_bins // 4) if pairs is None else pairs, num_bins // 2)
        tail = max(1, int(round(0.1 * (num_phy - n))))
        fit_owner, fit_load, counts, fits = compiled.solve_kernel(
            np.ascontiguousarray(expert_load, dtype=np.float64), num_phy, num_bins, k,
            refine_sweeps(slots), tail, method == "dhondt")
        if fits.all():
            return fit_owner, fit_load
        # Rows with an owner on more bins than there are: the numpy stages (rows are independent).
        slot_owner = np.empty((num_rows, num_bins, slots), dtype=np.int64)
        bin_load = np.empty((num_rows, num_bins))
        slot_owner[fits], bin_load[fits] = fit_owner, fit_load
        slot_owner[~fits], bin_load[~fits] = place_replicas(expert_load[~fits], counts[~fits], num_bins, pairs)
        return slot_owner, bin_load
    return place_replicas(expert_load, counts_np(expert_load, num_phy, method), num_bins, pairs)


def refine_swaps(
    slot_owner: np.ndarray,
    per_replica: np.ndarray,
    cap: np.ndarray,
    pairs: int = 4,
    sweeps: int = 4,
    budget: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the heaviest bins by swapping replicas with the lightest bins, keeping owners apart.

    Each sweep sorts the bins of every row by load and pairs the ``k``-th heaviest with the
    ``k``-th lightest (``k < pairs``; odd sweeps with the ``(k+1)``-th lightest); in each pair it
    makes the one swap that best evens the pair (replica ``a`` of the heavy bin for ``b`` of the
    light bin with ``0 < load_a - load_b < gap``, which lowers the pair's max) among swaps that
    take no owner over its cap in its new bin (of equally good swaps, the first in ``(a, b)``
    order: exactly what an ``argmax`` over the ``S x S`` scores returns). Bins of equal load sort
    in bin order. Stops when two sweeps change nothing, or after ``sweeps`` sweeps. Both the numpy
    code and the compiled kernel score all ``S x S`` swaps of a pair (the kernel as each heavy
    replica's best score, branch-free and vectorised, then the first pair reaching the best).

    ``budget`` (``[B]`` int64, updated in place): slot changes each row may still make; a swap
    changes two slots, and a row stops swapping when it cannot pay for one.

    Shapes: ``slot_owner [B, P, S]``, ``per_replica``/``cap`` ``[B, n]``. Returns the updated
    ``slot_owner`` (a copy) and ``bin_load [B, P]`` float64.
    """
    num_rows, num_bins, slots = slot_owner.shape
    io = slot_owner.reshape(num_rows * num_bins, slots).copy()  # [B*P, S] owner per slot, flat bins
    il = per_slot(per_replica, slot_owner).reshape(io.shape)  # [B*P, S] load per slot
    bin_load = il.sum(1).reshape(num_rows, num_bins)  # [B, P]
    k = min(pairs, num_bins // 2)
    if k < 1 or sweeps < 1:
        return slot_owner, bin_load
    ic = per_slot(cap, slot_owner).reshape(io.shape)  # [B*P, S] the slot owner's cap
    if compiled.ENABLED:  # the same sweeps, compiled (identical results)
        spend = budget if budget is not None else np.zeros(num_rows, dtype=np.int64)
        compiled.refine_kernel(io, il, ic, bin_load, per_replica.shape[1], k, sweeps, spend, budget is not None)
        return io.reshape(num_rows, num_bins, slots), bin_load
    n = per_replica.shape[1]
    # held[bin * n + owner]: replicas of an owner in a bin (a legality test is one gather), where
    # that table is small; else copies are counted on each pair (1024 GPUs x 384 experts x 61
    # layers would be 24M entries).
    held = bin_counts(io.reshape(num_rows, -1), num_bins, n).ravel() if num_rows * num_bins * n <= 1 << 21 else None
    first = np.arange(num_rows)[:, None] * num_bins  # [B, 1] flat bin id of each row's bin 0
    quiet = 0
    for sweep in range(sweeps):
        shift = sweep % 2 if num_bins > 2 else 0
        kk = min(k, (num_bins - shift) // 2)
        by_load = np.argsort(bin_load, axis=1, kind="stable") + first  # [B, P] flat bins, lightest first
        hb, lb = by_load[:, : -kk - 1 : -1], by_load[:, shift : shift + kk]  # [B, kk] paired bins
        oa, ob = io[hb], io[lb]  # [B, kk, S] owners in the heavy / light bin
        # A replica may enter the other bin only below its owner's cap there; a blocked one is
        # priced out (-inf leaving, +inf arriving) so no swap that moves it can score.
        # A move must not double an owner up on one bin while it leaves another bin bare: it may
        # join a bin that holds it only if the bin it leaves keeps a copy.
        if held is not None:
            a_there, a_here = held[(lb * n)[..., None] + oa], held[(hb * n)[..., None] + oa]  # [B, kk, S]
            b_there, b_here = held[(hb * n)[..., None] + ob], held[(lb * n)[..., None] + ob]
        else:
            cross = oa[..., :, None] == ob[..., None, :]  # [B, kk, S, S]
            a_there, b_there = cross.sum(-1), cross.sum(-2)  # [B, kk, S]
            a_here = (oa[..., :, None] == oa[..., None, :]).sum(-1)
            b_here = (ob[..., :, None] == ob[..., None, :]).sum(-1)
        ok_a = (a_there < ic[hb]) & ((a_there == 0) | (a_here >= 2))
        ok_b = (b_there < ic[lb]) & ((b_there == 0) | (b_here >= 2))
        la = np.where(ok_a, il[hb], -np.inf)  # [B, kk, S]
        lb_load = np.where(ok_b, il[lb], np.inf)
        gap = bin_load.ravel()[hb] - bin_load.ravel()[lb]  # [B, kk]
        d = la[..., :, None] - lb_load[..., None, :]  # [B, kk, S, S] what the heavy bin sheds
        score = np.minimum(d, gap[..., None, None] - d).reshape(num_rows * kk, -1)  # how much the max falls
        best = score.argmax(-1)  # [B*kk]
        top = score[np.arange(num_rows * kk), best]
        do = top > 1e-12 * gap.ravel()  # [B*kk] the max falls
        if budget is not None:  # each row pays 2 per swap, its heaviest pairs first
            do = do.reshape(num_rows, kk)
            do &= np.cumsum(do, 1) <= (budget // 2)[:, None]
            budget -= 2 * do.sum(1)
            do = do.ravel()
        if not do.any():
            quiet += 1
            if quiet == 2 or num_bins <= 2:
                break
            continue
        quiet = 0
        h, l_, best = hb.ravel()[do], lb.ravel()[do], best[do]  # flat bins and the chosen slots
        sa, sb = best // slots, best % slots
        if held is not None:
            a_own, b_own = io[h, sa], io[l_, sb]
            held[h * n + a_own] -= 1
            held[l_ * n + a_own] += 1
            held[l_ * n + b_own] -= 1
            held[h * n + b_own] += 1
        shed = il[h, sa] - il[l_, sb]
        bin_load.ravel()[h] -= shed
        bin_load.ravel()[l_] += shed
        for arr in (io, il, ic):
            arr[h, sa], arr[l_, sb] = arr[l_, sb], arr[h, sa].copy()
    return io.reshape(num_rows, num_bins, slots), bin_load
