"""Many duplicate repairs per pass: the migration-aware planner's way to clear a foreign plan.

A plan from another solver (DeepSeek's greedy puts replicas of one expert on one GPU freely) can
hold tens of avoidable duplicates per layer. :func:`~ray_eplb.solver.packing.separate_copies`
repairs one per row per pass; here every bin with a surplus copy gets a repair in the same pass,
as long as the repairs touch disjoint bins (then none changes what is legal for another).
"""
from __future__ import annotations

import numpy as np
from ray_eplb.solver.maps import bin_counts
from ray_eplb.solver.packing import separate_copies, surplus_copies


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

