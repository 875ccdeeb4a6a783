"""Many duplicate repairs per pass: the migration-aware planner's way to clear a foreign plan.

A plan from another solver (DeepSeek's greedy puts replicas of one expert on one GPU freely) can
hold tens of avoidable duplicates per layer. :func:`~ray_eplb.solver.packing.separate_copies`
repairs one per row per pass; here every bin with a surplus copy gets a repair in the same pass,
as long as the repairs touch disjoint bins (then none changes what is legal for another).
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.jit import njit
from ray_eplb.solver.maps import bin_counts, per_slot
from ray_eplb.solver.plan_stats import _row_shares


def separate_copies_batched(slot_owner: np.ndarray, per_replica: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """:func:`~ray_eplb.solver.packing.separate_copies`, with many repairs per row per pass.

    Each pass takes the first surplus copy (see :func:`~ray_eplb.solver.packing.surplus_copies`)
    of every bin that has one, and swaps it with the closest-load replica it may take from a bin
    without surplus copies (the same legality rules: no owner over its cap, none doubled up while
    it leaves a bin bare). Of the repairs aiming at one bin, the cheapest goes ahead; the others
    wait for the next pass. Rows where no such repair exists finish with ``separate_copies``
    (which may also swap between two bins that both hold surplus copies).

    Shapes: ``slot_owner [B, P, S]`` (a repaired copy is returned), ``per_replica``/``cap`` ``[B, n]``.
    """
    own = slot_owner.copy()
    num_rows, num_bins, slots = own.shape
    n = cap.shape[1]
    for _ in range(num_bins * slots):
        bad = surplus_copies(own, cap)  # [B, P, S]
        src = bad.any(2)  # [B, P] bins with a surplus copy
        if not src.any():
            return own
        rb, pb = np.nonzero(src)  # [C] one repair per such bin
        sb = bad[rb, pb].argmax(1)  # [C] its first surplus slot
        o = own[rb]  # [C, P, S]
        c = np.arange(rb.size)
        x_own = o[c, pb, sb]  # [C]
        held = bin_counts(own.reshape(num_rows, -1), num_bins, n)  # [B, P, n]
        x_in = held[rb, :, x_own]  # [C, P] copies of x's owner per bin
        x_cap = cap[rb, x_own][:, None]  # [C, 1]
        over_cap = x_in[c, pb] > x_cap[:, 0]
        x_ok = (x_in < x_cap) & ((x_in == 0) | over_cap[:, None]) & ~src[rb]  # [C, P] only bins without surplus
        flat = (rb * n)[:, None, None]
        y_in_xbin = held[rb[:, None, None], pb[:, None, None], o]  # [C, P, S] y's owner in x's bin
        y_home = held[rb[:, None, None], np.arange(num_bins)[None, :, None], o]  # [C, P, S] y's owner at home
        y_cap = cap.ravel()[flat + o]  # [C, P, S]
        y_ok = (y_in_xbin < y_cap) & ((y_in_xbin == 0) | (y_home >= 2))
        ok = x_ok[:, :, None] & y_ok & (o != x_own[:, None, None])
        load = per_replica.ravel()[flat + o]  # [C, P, S]
        cost = np.where(ok, np.abs(load - per_replica[rb, x_own][:, None, None]), np.inf).reshape(rb.size, -1)
        best = cost.argmin(1)  # [C]
        best_cost = cost[c, best]
        fine = np.isfinite(best_cost)
        if not fine.any():
            break
        py, sy = best // slots, best % slots
        # One repair per target bin and row: the cheapest (a stable sort keeps bin order on ties).
        order = np.lexsort((best_cost, py, rb))
        order = order[fine[order]]
        key = rb[order] * num_bins + py[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = key[1:] != key[:-1]
        go = order[first]
        r, a, b = rb[go], pb[go], sb[go]
        ty, tsy = py[go], sy[go]
        own[r, a, b], own[r, ty, tsy] = own[r, ty, tsy], own[r, a, b].copy()
    left = np.nonzero(surplus_copies(own, cap).any((1, 2)))[0]
    if left.size:
        own[left] = separate_copies(own[left], per_replica[left], cap[left])
    return own


def _earlier_copies(slot_owner: np.ndarray) -> np.ndarray:
    """``[B, P, S]``: copies of each slot's owner in earlier slots of its bin (by sorting each
    bin's slots: ``O(S log S)``, not an ``S x S`` comparison)."""
    slots = slot_owner.shape[-1]
    order = np.argsort(slot_owner, axis=-1, kind="stable")  # equal owners keep slot order
    srt = np.take_along_axis(slot_owner, order, -1)
    start = np.ones(srt.shape, dtype=bool)
    start[..., 1:] = srt[..., 1:] != srt[..., :-1]
    pos = np.broadcast_to(np.arange(slots), srt.shape)
    run_start = np.maximum.accumulate(np.where(start, pos, 0), axis=-1)
    earlier = np.empty_like(slot_owner)
    np.put_along_axis(earlier, order, pos - run_start, -1)
    return earlier


def surplus_copies(slot_owner: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """``[B, P, S]`` bool: a later copy of an owner in its bin that wastes a slot.

    A copy is surplus when its bin already holds ``cap`` copies of the owner earlier in the bin,
    or when its owner is doubled up in this bin while missing from another bin although it has
    replicas enough for more bins (it covers fewer than ``min(count, P)`` bins): then moving it
    to a bin without the owner saves a duplicate pair.

    ``slot_owner [B, P, S]``; ``cap [B, n]`` copies allowed per bin for each owner.
    """
    num_rows, num_bins, slots = slot_owner.shape
    n = cap.shape[1]
    earlier = _earlier_copies(slot_owner)  # [B, P, S] copies before this one in its bin
    held = bin_counts(slot_owner.reshape(num_rows, -1), num_bins, n)  # [B, P, n]
    short = (held > 0).sum(1) < np.minimum(held.sum(1), num_bins)  # [B, n] covers too few bins
    return (earlier >= per_slot(cap, slot_owner)) | ((earlier > 0) & per_slot(short, slot_owner))


def separate_copies(slot_owner: np.ndarray, per_replica: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Swap surplus copies of an owner out of a bin, each for the closest-load replica it can take.

    A surplus slot (see :func:`surplus_copies`) swaps with the replica, in another bin, whose load
    is nearest its own, such that neither owner exceeds its cap in its new bin or leaves a bin
    bare to double up on another; a copy that is within its cap goes only to a bin without its
    owner. One repair per row per pass; a surplus slot with no legal swap is skipped until another
    repair in its row changes what is legal. Ends when none is left or none can be repaired.

    Shapes: ``slot_owner [B, P, S]`` (a repaired copy is returned), ``per_replica``/``cap`` ``[B, n]``.
    """
    own = slot_owner.copy()
    num_rows, num_bins, slots = own.shape
    stuck = np.zeros(own.shape, dtype=bool)  # surplus slots with no legal swap (until one happens)
    for _ in range(2 * num_bins * slots):
        bad = surplus_copies(own, cap)  # [B, P, S]
        todo = (bad & ~stuck).reshape(num_rows, -1)
        r = np.nonzero(todo.any(1))[0]  # rows with a surplus copy still worth a try
        if not r.size:
            break
        at = todo[r].argmax(1)
        pb, sb = at // slots, at % slots  # [r] its bin and slot
        o = own[r]  # [r, P, S]
        x_own = o[np.arange(len(r)), pb, sb]  # [r]
        load = per_slot(per_replica[r], o)  # [r, P, S]
        # Copies of x's owner per bin; of each candidate y's owner in x's bin and in y's own bin.
        x_in = (o == x_own[:, None, None]).sum(-1)  # [r, P]
        y_in_xbin = (o[:, :, :, None] == o[np.arange(len(r)), pb][:, None, None, :]).sum(-1)  # [r, P, S]
        y_home = (o[..., :, None] == o[..., None, :]).sum(-1)  # [r, P, S]
        x_cap = cap[r, x_own][:, None]  # [r, 1]
        over_cap = (x_in[np.arange(len(r)), pb] > x_cap[:, 0])  # [r] x is beyond its cap here
        # x goes where its owner is below cap, and to a bin without it unless x only fixes a cap;
        # y comes to x's bin below its cap, and joins its owner there only if it leaves one behind.
        x_ok = (x_in < x_cap) & ((x_in == 0) | over_cap[:, None])  # [r, P]
        y_ok = (y_in_xbin < per_slot(cap[r], o)) & ((y_in_xbin == 0) | (y_home >= 2))
        ok = x_ok[:, :, None] & y_ok & (o != x_own[:, None, None])
        ok[np.arange(len(r)), pb] = False
        cost = np.where(ok, np.abs(load - per_replica[r, x_own][:, None, None]), np.inf)
        best = cost.reshape(len(r), -1).argmin(1)
        fine = np.isfinite(cost.reshape(len(r), -1)[np.arange(len(r)), best])
        stuck[r[~fine], pb[~fine], sb[~fine]] = True  # try this row's next surplus slot first
        r, pb, sb, best = r[fine], pb[fine], sb[fine], best[fine]
        stuck[r] = False  # a swap changes what is legal: everything in the row is worth a retry
        py, sy = best // slots, best % slots
        own[r, pb, sb], own[r, py, sy] = own[r, py, sy], own[r, pb, sb].copy()
    return own


def _count_row(own, held, covered, count):  # pragma: no cover (compiled)
    """Copies per (bin, owner) into ``held [P, n]`` (all zero on entry), bins holding each owner
    into ``covered [n]`` and replicas per owner into ``count [n]``, for one row ``own [P, S]``."""
    covered[:] = 0
    count[:] = 0
    for g in range(own.shape[0]):
        for s in range(own.shape[1]):
            e = own[g, s]
            if held[g, e] == 0:
                covered[e] += 1
            held[g, e] += 1
            count[e] += 1


def _separate_row(own, per, cap, held, covered, count, stuck):  # pragma: no cover (compiled)
    """:func:`separate_copies` on one row ``own [P, S]`` (in place; ``per``/``cap`` ``[n]``), its
    copies counted by :func:`_count_row` and kept up to date; ``stuck [P, S]`` is scratch."""
    num_bins, slots = own.shape
    stuck[:, :] = False
    for _ in range(2 * num_bins * slots):
        pg, ps = -1, -1
        for g in range(num_bins):  # the first surplus copy not marked stuck
            for s in range(slots):
                e = own[g, s]
                if held[g, e] < 2 or stuck[g, s]:
                    continue  # (a lone copy on its bin is never surplus: every cap is at least 1)
                earlier = 0
                for t in range(s):
                    earlier += own[g, t] == e
                if earlier >= cap[e] or (earlier > 0 and covered[e] < min(count[e], num_bins)):
                    pg, ps = g, s
                    break
            if pg >= 0:
                break
        if pg < 0:
            break
        x = own[pg, ps]
        over = held[pg, x] > cap[x]
        best, best_cost = -1, np.inf
        for b in range(num_bins):
            if b == pg:
                continue
            if not (held[b, x] < cap[x] and (held[b, x] == 0 or over)):
                continue
            for t in range(slots):
                y = own[b, t]
                if y == x:
                    continue
                if not (held[pg, y] < cap[y] and (held[pg, y] == 0 or held[b, y] >= 2)):
                    continue
                cost = abs(per[y] - per[x])
                if cost < best_cost:
                    best, best_cost = b * slots + t, cost
        if best < 0:
            stuck[pg, ps] = True
            continue
        b, t = best // slots, best % slots
        y = own[b, t]
        own[pg, ps], own[b, t] = y, x
        for g, e, d in ((pg, x, -1), (b, x, 1), (b, y, -1), (pg, y, 1)):
            if d < 0 and held[g, e] == 1:
                covered[e] -= 1
            if d > 0 and held[g, e] == 0:
                covered[e] += 1
            held[g, e] += d
        stuck[:, :] = False


def _clear_row(own, held):  # pragma: no cover (compiled)
    """Zero the entries of ``held [P, n]`` that row ``own [P, S]`` set."""
    for g in range(own.shape[0]):
        for s in range(own.shape[1]):
            held[g, own[g, s]] = 0


def _separate_kernel(slot_owner, per_replica, cap):  # pragma: no cover (compiled)
    """:func:`separate_copies`, compiled: the same repairs in the same order, one row at a time,
    with copies per (bin, owner) kept up to date instead of recounted per pass."""
    own = slot_owner.copy()
    num_rows, num_bins, slots = own.shape
    n = cap.shape[1]
    held = np.zeros((num_bins, n), dtype=np.int64)
    covered = np.zeros(n, dtype=np.int64)  # bins holding each owner
    count = np.zeros(n, dtype=np.int64)
    stuck = np.zeros((num_bins, slots), dtype=np.bool_)
    for r in range(num_rows):
        _count_row(own[r], held, covered, count)
        _separate_row(own[r], per_replica[r], cap[r], held, covered, count, stuck)
        _clear_row(own[r], held)
    return own


def _repair_kernel(own, w, cnt, rows, budget):  # pragma: no cover (compiled)
    """In place on ``own [L, P, S]``: each of ``rows [K]`` that holds an avoidable duplicate (as
    :func:`~ray_eplb.solver.maps.avoidable_duplicates_np` counts them, ``P`` bins as the GPUs) is
    repaired as :func:`separate_copies` repairs it, and keeps the repair only if the slots it
    changes fit ``budget [L]`` (then spent, in place). ``w``/``cnt`` ``[L, n]``: load and replicas
    per owner (a replica carries ``w / cnt``, an owner may have ``ceil(cnt / P)`` copies on a bin).
    One pass over each row, instead of a count of every row's duplicates, copies of the rows that
    have one, their repair and a comparison to charge it."""
    _, num_bins, slots = own.shape
    n = w.shape[1]
    held = np.zeros((num_bins, n), dtype=np.int64)
    covered = np.zeros(n, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    per = np.empty(n)
    cap = np.empty(n, dtype=np.int64)
    stuck = np.zeros((num_bins, slots), dtype=np.bool_)
    saved = np.empty((num_bins, slots), dtype=own.dtype)
    for r in rows:
        row = own[r]
        _count_row(row, held, covered, count)
        avoidable = 0  # copies beyond the first on a bin, less those an owner with more replicas than bins must have
        for e in range(n):
            avoidable += count[e] - covered[e] - max(count[e] - num_bins, 0)
        if avoidable > 0:
            _row_shares(w[r], cnt[r], num_bins, per, cap)
            saved[:, :] = row
            _separate_row(row, per, cap, held, covered, count, stuck)
            changed = 0
            for g in range(num_bins):
                for s in range(slots):
                    changed += row[g, s] != saved[g, s]
            if changed <= budget[r]:
                budget[r] -= changed
            else:
                _clear_row(row, held)
                row[:, :] = saved
                continue
        _clear_row(row, held)


if njit is not None:
    _count_row = njit(cache=True, nogil=True)(_count_row)
    _separate_row = njit(cache=True, nogil=True)(_separate_row)
    _clear_row = njit(cache=True, nogil=True)(_clear_row)
separate_kernel = njit(cache=True, nogil=True)(_separate_kernel) if njit is not None else None
repair_kernel = njit(cache=True, nogil=True)(_repair_kernel) if njit is not None else None
