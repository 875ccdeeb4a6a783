"""Swaps aimed at a goal peak: the migration-aware planner's way to spend a move budget.

:func:`~ray_eplb.solver.packing.refine_swaps` pairs a fixed number of the heaviest bins with the
lightest ones per sweep, whatever their loads. Starting from a deployed plan, that either stops
short (a few pairs: the heavy bins beyond them are never lowered) or spends moves on bins that do
not set the peak (every bin paired). :func:`lower_peaks` pairs exactly the bins above a goal
(the peak a fresh solve reaches for the same load) with the lightest bins, sweep after sweep,
so every swap it makes lowers a bin that is above the goal, and it stops once none is.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.jit import njit

if njit is not None:
    from ray_eplb.solver.kernels_solve import _pairwise_sum
    from ray_eplb.solver.plan_stats import _row_shares
from ray_eplb.solver.maps import bin_counts, per_slot, replica_shares

TABLE_LIMIT = 1 << 22  # largest [B, P, n] copies table kept
# The lightest bins the heaviest bin tries. Measured against 8 (the goal swaps alone on captured
# Kimi-K2-like and Qwen3-like inputs, and ``ray-eplb bench --migration``): 10-12% less time in the
# search, moved slots within 1% and in-window balance within 0.01%; next-window balance within
# 0.2% in 55 of the benchmark's 66 cells, and from -0.83% to +1.42% in the others (8 up, 3 down;
# dsv2lite 288 with a 25% budget +0.31%, back within 0.5% of from-scratch).
LIGHT = 4
PAIRS_PER_SWAP = 512  # fewer (at least 2) where bins hold many slots: the kernel tries ~this many replica pairs
QUIET_SWEEPS = 3  # sweeps in a row without a swap before a row's search ends (it looks further each time)


def lower_peaks(
    slot_owner: np.ndarray,
    w: np.ndarray,
    cnt: np.ndarray,
    goal: np.ndarray,
    budget: np.ndarray,
    sweeps: int,
    orig: np.ndarray | None = None,
    fix_first: np.ndarray | None = None,
    report: bool = False,
    in_place: bool = False,
):
    """Swap replicas between bins above ``goal`` and the lightest bins until none is above it.

    The heaviest bin first: among swaps of one of its replicas (``a``) for one of a light bin's
    (``b``) with ``0 < load_a - load_b < gap`` (the pair's max falls), where ``fix_first`` (``[B]``
    bool; default all) the one that evens the pair most among those that bring the heavy bin to
    the goal without taking the light one past it, else (and otherwise) the one that evens the
    pair most. A replica's load is its owner's ``w / cnt``. A swap must take no owner over its cap
    in its new bin (``ceil(cnt / P)``: one copy unless the owner has more replicas than bins), and
    may put an owner on a bin that holds it only if the bin it leaves keeps a copy (no avoidable
    duplicate is made).

    * Compiled (numba): one swap at a time, the heaviest bin against the ``LIGHT`` lightest
      (the lightest that has such a fixing swap); a swap costs the slots it makes differ from
      ``orig`` (``[B, P, S]``, default ``slot_owner``) less those it makes equal again. A row
      stops at its goal, when its budget cannot pay, or when its heaviest bin has no swap.
    * numpy fallback: sweeps; each takes every bin above the goal, heaviest first, against the
      ``LIGHT`` lightest bins (a light bin chosen by several goes to the heaviest), two slots per
      swap; a row stops at its goal, its budget, or after ``QUIET_SWEEPS`` sweeps without a swap
      (each looks ``LIGHT`` bins further along); all stop after ``sweeps`` sweeps.

    Measured (``ray-eplb bench --migration``, next-window balance): preferring the fixing swap
    costs 0.1-0.3% on dsv2lite 288 when moves are free, and a binding budget needs it (Kimi-like
    shape, tiled trace, 25% budget: in-window 0.991 without it, 0.995 with it, fresh 0.997).

    Shapes: ``slot_owner [B, P, S]`` (a changed copy is returned; with ``in_place``, on the
    compiled path, that array itself is changed and returned), ``w [B, n]`` float64 (load per
    owner), ``cnt [B, n]`` int64 (replicas per owner: ``slot_owner``'s counts, which swaps keep),
    ``goal [B]`` float64, ``budget [B]`` int64 (updated in place). With ``report``, returns
    ``(plan [B, P, S], peak [B], moved [B], dups [B])``: the compiled path also gives each row's
    max bin load (summed as :func:`~ray_eplb.solver.plan_stats.plan_stats` sums it: the same
    value), its slots that differ from ``orig`` and its avoidable duplicates (bins as the GPUs),
    which spares the caller a pass over the plan; the numpy path gives ``None`` for all three.
    """
    num_rows, num_bins, slots = slot_owner.shape
    if num_bins < 2 or not num_rows:
        return (slot_owner, None, None, None) if report else slot_owner
    n = w.shape[1]
    limit = goal * (1 + 1e-9) + 1e-12
    if peaks_kernel is not None:
        io = slot_owner if in_place else slot_owner.copy()
        peak, moved, dups = np.empty(num_rows), np.empty(num_rows, dtype=np.int64), np.empty(num_rows, dtype=np.int64)
        peaks_kernel(io, np.ascontiguousarray(w, dtype=np.float64), np.ascontiguousarray(cnt, dtype=np.int64),
                     slot_owner if orig is None else orig, limit, budget, LIGHT,
                     np.ones(num_rows, dtype=np.bool_) if fix_first is None else fix_first, peak, moved, dups)
        return (io, peak, moved, dups) if report else io
    per_replica, cap = replica_shares(w, cnt, num_bins)  # [B, n] each
    io = slot_owner.reshape(num_rows * num_bins, slots).copy()  # [B*P, S] owner per slot, flat bins
    il = per_slot(per_replica, slot_owner).reshape(io.shape)  # [B*P, S] load per slot
    ic = per_slot(cap, slot_owner).reshape(io.shape)  # [B*P, S] the slot owner's cap
    bin_load = il.sum(1).reshape(num_rows, num_bins)  # [B, P]
    # held[bin * n + owner]: copies per (bin, owner), where that table is small; else counted per pair.
    held = bin_counts(io.reshape(num_rows, -1), num_bins, n).ravel() if num_rows * num_bins * n <= TABLE_LIMIT else None
    first = np.arange(num_rows)[:, None] * num_bins  # [B, 1] flat bin of each row's bin 0
    quiet = np.zeros(num_rows, dtype=np.int64)
    for _ in range(sweeps):
        over = (bin_load > limit[:, None]).sum(1)  # [B] bins above the goal
        live = np.nonzero((over > 0) & (budget >= 2) & (quiet < QUIET_SWEEPS))[0]
        if not live.size:
            break
        heavy = np.minimum(over[live], num_bins // 2)  # [n] heavy bins paired per row
        by_load = np.argsort(bin_load[live], axis=1) + first[live]  # [n, P] flat bins, lightest first
        # Flat list of the heavy bins (row-major, heaviest first); each tries the LIGHT lightest
        # bins (a row without a swap last sweep looks LIGHT further along).
        at = np.repeat(np.arange(live.size), heavy)  # [F] index into live
        rank = np.arange(at.size) - np.repeat(np.cumsum(heavy) - heavy, heavy)  # [F]
        hb = by_load[at, num_bins - 1 - rank]  # [F] flat heavy bin
        q = (quiet[live] * LIGHT)[at][:, None] + np.arange(min(num_bins, LIGHT))  # [F, C] light ranks
        cand_ok = q < num_bins - heavy[at][:, None]
        lb = by_load[at[:, None], np.minimum(q, num_bins - 1)]  # [F, C] flat light bins
        oa, ob = io[hb][:, None, :], io[lb]  # [F, 1, S], [F, C, S]
        if held is not None:
            a_there, a_here = held[(lb * n)[..., None] + oa], held[(hb * n)[:, None, None] + oa]
            b_there, b_here = held[(hb * n)[:, None, None] + ob], held[(lb * n)[..., None] + ob]
        else:
            cross = oa[..., :, None] == ob[..., None, :]  # [F, C, S, S]
            a_there, b_there = cross.sum(-1), cross.sum(-2)
            a_here = (oa[..., :, None] == oa[..., None, :]).sum(-1)
            b_here = (ob[..., :, None] == ob[..., None, :]).sum(-1)
        ok_a = (a_there < ic[hb][:, None, :]) & ((a_there == 0) | (a_here >= 2))  # [F, C, S]
        ok_b = (b_there < ic[lb]) & ((b_there == 0) | (b_here >= 2))
        la = np.where(ok_a, il[hb][:, None, :], -np.inf)  # a blocked replica cannot leave
        lbl = np.where(ok_b & cand_ok[..., None], il[lb], np.inf)
        load_h = bin_load.ravel()[hb][:, None]  # [F, 1]
        gap = load_h - bin_load.ravel()[lb]  # [F, C]
        room = limit[live][at][:, None]  # [F, 1]
        d = la[..., :, None] - lbl[..., None, :]  # [F, C, S, S] what the heavy bin sheds
        score = np.minimum(d, gap[..., None, None] - d)  # how much the pair's max falls
        # A swap that brings the heavy bin to the goal without taking the light one past it
        # comes first; among those, and else, the one that evens the pair most.
        fix = (load_h[..., None, None] - d <= room[..., None, None]) & (
            bin_load.ravel()[lb][..., None, None] + d <= room[..., None, None])
        score = score.reshape(at.size, -1)
        if fix_first is not None:
            fix &= fix_first[live][at][:, None, None, None]
        fixed = np.where(fix.reshape(at.size, -1) & (score > 0), score, -np.inf)
        best = np.where(np.isfinite(fixed.max(1)), fixed.argmax(1), score.argmax(1))  # [F]
        top = score[np.arange(at.size), best]
        pick, best = best // (slots * slots), best % (slots * slots)
        do = top > 1e-12 * gap[np.arange(at.size), pick]  # [F] the pair's max falls
        # A light bin chosen by several heavy bins goes to the heaviest; the others wait a sweep.
        key = np.where(do, lb[np.arange(at.size), pick], -1 - np.arange(at.size))
        keep = np.zeros(at.size, dtype=bool)
        keep[np.unique(key, return_index=True)[1]] = True
        do &= keep
        before = np.repeat(np.cumsum(heavy) - heavy, heavy)
        used = np.cumsum(do) - np.r_[0, np.cumsum(do)][before]  # [F] swaps so far in the row, this one included
        do &= used <= (budget[live] // 2)[at]  # heaviest first, within the budget
        made = np.bincount(at[do], minlength=live.size)
        budget[live] -= 2 * made
        quiet[live] = np.where(made > 0, 0, quiet[live] + 1)
        if not do.any():
            continue
        h, lo = hb[do], lb[do, pick[do]]
        sa, sb = best[do] // slots, best[do] % slots
        if held is not None:  # the paired bins of a sweep are distinct: no index repeats
            a_own, b_own = io[h, sa], io[lo, sb]
            held[h * n + a_own] -= 1
            held[lo * n + a_own] += 1
            held[lo * n + b_own] -= 1
            held[h * n + b_own] += 1
        shed = il[h, sa] - il[lo, sb]
        bin_load.ravel()[h] -= shed
        bin_load.ravel()[lo] += shed
        for arr in (io, il, ic):
            arr[h, sa], arr[lo, sb] = arr[lo, sb], arr[h, sa].copy()
    io = io.reshape(num_rows, num_bins, slots)
    return (io, None, None, None) if report else io


def _move(order, sl, i, g, x):  # pragma: no cover
    """Move bin ``g`` (now of load ``x``) from place ``i`` of ``order``/``sl`` (``[P]``: the bins
    in (load, index) order and their loads) to where it belongs among its neighbours; returns
    its new place."""
    n = order.shape[0]
    while i > 0 and (sl[i - 1] > x or (sl[i - 1] == x and order[i - 1] > g)):
        order[i], sl[i] = order[i - 1], sl[i - 1]
        i -= 1
    while i < n - 1 and (sl[i + 1] < x or (sl[i + 1] == x and order[i + 1] < g)):
        order[i], sl[i] = order[i + 1], sl[i + 1]
        i += 1
    order[i], sl[i] = g, x
    return i


def _peaks_kernel(io, w, cnt, orig, limit, budget, light, fix_first, peak, moved, dups):  # pragma: no cover
    """One row at a time, the heaviest bin first, until it is at its goal: see :func:`lower_peaks`.

    ``io``/``orig`` ``[B, P, S]`` (owner, owner in the starting plan), ``w``/``cnt`` ``[B, n]``
    (load and replicas per owner: a replica carries ``w / cnt``, an owner may have ``ceil(cnt /
    P)`` copies on a bin), ``limit [B]``, ``budget [B]`` (slots that may still differ from
    ``orig``; updated); ``io`` and ``budget`` in place. A swap costs the slots it makes differ from
    ``orig`` less those it makes equal again. Bin loads start as numpy's ``sum(-1)`` of the
    slot loads gives them. Out: ``peak [B]`` (each row's max bin load at the end, summed afresh
    that way, not the running loads), ``moved [B]`` (its slots that differ from ``orig``) and
    ``dups [B]`` (its copies of an owner beyond the first on a bin, less the ``cnt - P`` an
    owner with more replicas than bins cannot avoid: its avoidable duplicates).
    """
    num_rows, num_bins, slots = io.shape
    num_owners = w.shape[1]
    held = np.zeros((num_bins, num_owners), dtype=np.int32)  # copies per (bin, owner) of the row
    per = np.empty(num_owners)  # the row's load per replica of each owner
    cap = np.empty(num_owners, dtype=np.int64)  # the row's copies per bin allowed for each owner
    il = np.empty((num_bins, slots))  # the row's load per slot
    ic = np.empty((num_bins, slots), dtype=np.int64)  # the row's slot owner's cap
    load = np.empty(num_bins)  # the row's bin loads
    top = min(light, max(2, PAIRS_PER_SWAP // (slots * slots)), num_bins - 1)
    cand = np.empty(top, dtype=np.int64)  # the lightest bins, lightest first
    ok_slot = np.empty(slots, dtype=np.int64)  # a light bin's replicas that may move to the heavy bin:
    ok_own = np.empty(slots, dtype=np.int64)  # their slots, owners and loads
    ok_load = np.empty(slots)
    scores = np.empty(slots)  # the pairs' scores of one heavy replica
    order = np.empty(num_bins, dtype=np.int64)
    sl = np.empty(num_bins)  # load[order]: the order's loads, read without an indirection
    cand_at = np.empty(top, dtype=np.int64)  # where each light bin is in the order
    for r in range(num_rows):
        own, start = io[r], orig[r]  # [P, S] views
        lim, spend, fix = limit[r], budget[r], fix_first[r]
        unavoidable = _row_shares(w[r], cnt[r], num_bins, per, cap)
        for g in range(num_bins):
            x = 0.0  # (numpy sums fewer than 8 numbers in order)
            for s in range(slots):
                e = own[g, s]
                held[g, e] += 1
                il[g, s] = per[e]
                ic[g, s] = cap[e]
                x += il[g, s]
            load[g] = x if slots < 8 else _pairwise_sum(il[g], 0, slots)
        # The bins in (load, index) order, kept sorted as swaps change two loads: the heaviest
        # (lowest index among equals) and the lightest are read off it, not searched for.
        for g in range(num_bins):  # (an insertion sort: stable, and nothing allocated per row)
            x = load[g]
            i = g
            while i > 0 and sl[i - 1] > x:
                order[i], sl[i] = order[i - 1], sl[i - 1]
                i -= 1
            order[i], sl[i] = g, x
        for _ in range(4 * num_bins * slots):
            i = num_bins - 1
            while i > 0 and sl[i - 1] == sl[num_bins - 1]:
                i -= 1
            h, h_at = order[i], i
            load_h = load[h]
            if load_h <= lim or spend < 1:
                break
            m = 0
            for i in range(num_bins):
                if m == top:
                    break
                if order[i] != h:
                    cand[m], cand_at[m] = order[i], i
                    m += 1
            best_fix, best_any = -1.0, 0.0
            pick_fix, pick_any = -1, -1
            for q in range(m):
                if pick_fix >= 0:
                    break  # a fixing swap with a lighter bin was found
                lo = cand[q]
                load_lo = load[lo]
                gap = load_h - load_lo
                if gap <= 0 or best_any >= 0.5 * gap:
                    break  # (lighter bins first: no later pair can even more than gap / 2)
                lightest, heaviest = np.inf, -np.inf  # the light bin's lightest/heaviest replica that may move
                nb = 0  # the light bin's replicas that may move to the heavy bin, in slot order
                for sb in range(slots):  # (depends on the two bins only: checked once per pair of bins)
                    b = own[lo, sb]
                    b_there = held[h, b]
                    if not (b_there >= ic[lo, sb] or (b_there > 0 and held[lo, b] < 2)):
                        x = il[lo, sb]
                        ok_slot[nb], ok_own[nb], ok_load[nb] = sb, b, x
                        nb += 1
                        lightest = min(lightest, x)
                        heaviest = max(heaviest, x)
                for sa in range(slots):
                    load_a = il[h, sa]
                    # A pair sheds d in [load_a - heaviest, load_a - lightest] and scores min(d, gap - d):
                    # skip the replica when no such score can beat the best so far and no such d can
                    # bring the heavy bin to the goal (both bounds are exact in floating point).
                    most = load_a - lightest
                    if min(most, gap - (load_a - heaviest)) <= best_any and (not fix or load_h - most > lim):
                        continue
                    a = own[h, sa]
                    a_there = held[lo, a]
                    if a_there >= ic[h, sa] or (a_there > 0 and held[h, a] < 2):
                        continue
                    # Branch-free over the light bin's replicas (selects, not jumps): which pair wins is
                    # data-dependent, and mispredicted branches here cost more than the arithmetic
                    # (Kimi-K2-like tiled trace: 21% less time in this kernel, the same swaps).
                    base = (q * slots + sa) * slots
                    tol = 1e-12 * gap
                    if not fix and spend >= 2:
                        # No fixing swap to prefer and no cost to check (no budget binds): the pairs'
                        # scores (-1 where a pair may not swap) and their max in one pass, then the
                        # first pair with that max, which is the one the running selects below would
                        # keep. Those selects chain each pair to the last through the best so far;
                        # the max does not: 14-19% less time in this kernel on the scale shapes
                        # without a budget, the same swaps. (The running selects alone, without the
                        # fixing test, ran 25% slower at Kimi-like tiled: compiled into jumps.)
                        top_score = -1.0
                        for k in range(nb):
                            d = load_a - ok_load[k]
                            score = min(d, gap - d)
                            score = score if (a != ok_own[k]) & (d > tol) & (d < gap) else -1.0
                            scores[k] = score
                            top_score = max(top_score, score)
                        if top_score > best_any:
                            for k in range(nb):
                                if scores[k] == top_score:
                                    pick_any = base + ok_slot[k]
                                    break
                            best_any = top_score
                        continue
                    for k in range(nb):
                        b = ok_own[k]
                        d = load_a - ok_load[k]
                        sb = ok_slot[k]
                        ok = (a != b) & (d > tol) & (d < gap)
                        if spend < 2:  # (a swap costs at most 2: checked only when that may not fit)
                            cost = (int(b != start[h, sa]) - int(a != start[h, sa])
                                    + int(a != start[lo, sb]) - int(b != start[lo, sb]))
                            ok = ok & (cost <= spend)
                        score = min(d, gap - d)
                        fixes = ok & fix & (load_h - d <= lim) & (load_lo + d <= lim)
                        better_fix = fixes & (score > best_fix)
                        better_any = ok & (not fixes) & (score > best_any)
                        best_fix = score if better_fix else best_fix
                        pick_fix = base + sb if better_fix else pick_fix
                        best_any = score if better_any else best_any
                        pick_any = base + sb if better_any else pick_any
            pick = pick_fix if pick_fix >= 0 else pick_any
            if pick < 0:
                break  # the heaviest bin cannot be lowered: neither can the peak
            lo, lo_at = cand[pick // (slots * slots)], cand_at[pick // (slots * slots)]
            sa, sb = (pick // slots) % slots, pick % slots
            a, b = own[h, sa], own[lo, sb]
            spend -= (int(b != start[h, sa]) - int(a != start[h, sa])
                      + int(a != start[lo, sb]) - int(b != start[lo, sb]))
            held[h, a] -= 1
            held[lo, a] += 1
            held[lo, b] -= 1
            held[h, b] += 1
            shed = il[h, sa] - il[lo, sb]
            load[h] -= shed
            load[lo] += shed
            own[h, sa], own[lo, sb] = b, a
            il[h, sa], il[lo, sb] = il[lo, sb], il[h, sa]
            ic[h, sa], ic[lo, sb] = ic[lo, sb], ic[h, sa]
            # Each back to its place in the order (the other bins stay sorted), the heavy bin first.
            sl[lo_at] = load[lo]  # (the light bin's new load, as the heavy bin's move sees it)
            h_to = _move(order, sl, h_at, h, load[h])
            if h_to < h_at and h_to <= lo_at < h_at:  # the bins it passed each moved up one place
                lo_at += 1
            elif h_to > h_at and h_at < lo_at <= h_to:
                lo_at -= 1
            _move(order, sl, lo_at, lo, load[lo])
        budget[r] = spend
        best, differ, stacked = -np.inf, 0, 0
        for g in range(num_bins):  # clear the row's copies for the next row; its peak, moves and stacks
            x = 0.0
            for s in range(slots):
                e = own[g, s]
                stacked += max(held[g, e] - 1, 0)  # (counted at the owner's first slot in the bin, then cleared)
                held[g, e] = 0
                differ += e != start[g, s]
                x += il[g, s]
            if slots >= 8:
                x = _pairwise_sum(il[g], 0, slots)
            best = max(best, x)
        peak[r], moved[r], dups[r] = best, differ, stacked - unavoidable


if njit is not None:
    _move = njit(cache=True, nogil=True, inline="always")(_move)
peaks_kernel = njit(cache=True, nogil=True)(_peaks_kernel) if njit is not None else None
