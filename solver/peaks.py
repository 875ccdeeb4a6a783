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

from ray_eplb.solver.maps import bin_counts, per_slot
from ray_eplb.solver.packing import SORTED_SWAPS_FROM, best_swaps

TABLE_LIMIT = 1 << 22  # largest [B, P, n] copies table kept
QUIET_SWEEPS = 3  # sweeps in a row without a swap before a row's search ends (pairings rotate)


def lower_peaks(
    slot_owner: np.ndarray,
    per_replica: np.ndarray,
    cap: np.ndarray,
    goal: np.ndarray,
    budget: np.ndarray,
    sweeps: int,
) -> np.ndarray:
    """Swap replicas between bins above ``goal`` and the lightest bins until none is above it.

    Each sweep sorts every row's bins by load; the ``h`` bins above the row's goal (heaviest
    first) are paired with the ``h`` lightest (lightest first; later sweeps pair them one or two
    further along, so a pair without a useful swap is not tried forever), and each pair makes the
    one swap that best evens it (replica ``a`` of the heavy bin for ``b`` of the light bin with
    ``0 < load_a - load_b < gap``: the pair's max falls). A swap must take no owner over its cap
    in its new bin, and may put an owner on a bin that holds it only if the bin it leaves keeps a
    copy (no avoidable duplicate is made). A swap changes two slots: a row stops when its budget
    cannot pay for one, when no bin is above its goal, or after ``QUIET_SWEEPS`` sweeps without a
    swap; all stop after ``sweeps`` sweeps.

    Shapes: ``slot_owner [B, P, S]`` (a changed copy is returned), ``per_replica``/``cap``
    ``[B, n]``, ``goal [B]`` float64, ``budget [B]`` int64 (updated in place).
    """
    num_rows, num_bins, slots = slot_owner.shape
    if num_bins < 2 or not num_rows:
        return slot_owner
    n = per_replica.shape[1]
    io = slot_owner.reshape(num_rows * num_bins, slots).copy()  # [B*P, S] owner per slot, flat bins
    il = per_slot(per_replica, slot_owner).reshape(io.shape)  # [B*P, S] load per slot
    ic = per_slot(cap, slot_owner).reshape(io.shape)  # [B*P, S] the slot owner's cap
    bin_load = il.sum(1).reshape(num_rows, num_bins)  # [B, P]
    # held[bin * n + owner]: copies per (bin, owner), where that table is small; else counted per pair.
    held = bin_counts(io.reshape(num_rows, -1), num_bins, n).ravel() if num_rows * num_bins * n <= TABLE_LIMIT else None
    first = np.arange(num_rows)[:, None] * num_bins  # [B, 1] flat bin of each row's bin 0
    limit = goal * (1 + 1e-9) + 1e-12
    quiet = np.zeros(num_rows, dtype=np.int64)
    for sweep in range(sweeps):
        over = (bin_load > limit[:, None]).sum(1)  # [B] bins above the goal
        live = np.nonzero((over > 0) & (budget >= 2) & (quiet < QUIET_SWEEPS))[0]
        if not live.size:
            break
        shift = sweep % 3
        kk = int(min(over[live].max(), (num_bins - shift) // 2))
        if kk < 1:
            break
        by_load = np.argsort(bin_load[live], axis=1) + first[live]  # [n, P] flat bins, lightest first
        hb, lb = by_load[:, : -kk - 1 : -1], by_load[:, shift : shift + kk]  # [n, kk] paired bins
        oa, ob = io[hb], io[lb]  # [n, kk, S]
        if held is not None:
            a_there, a_here = held[(lb * n)[..., None] + oa], held[(hb * n)[..., None] + oa]  # [n, kk, S]
            b_there, b_here = held[(hb * n)[..., None] + ob], held[(lb * n)[..., None] + ob]
        else:
            cross = oa[..., :, None] == ob[..., None, :]  # [n, kk, S, S]
            a_there, b_there = cross.sum(-1), cross.sum(-2)
            a_here = (oa[..., :, None] == oa[..., None, :]).sum(-1)
            b_here = (ob[..., :, None] == ob[..., None, :]).sum(-1)
        ok_a = (a_there < ic[hb]) & ((a_there == 0) | (a_here >= 2))
        ok_b = (b_there < ic[lb]) & ((b_there == 0) | (b_here >= 2))
        la = np.where(ok_a, il[hb], -np.inf)  # [n, kk, S] a blocked replica cannot leave
        lbl = np.where(ok_b, il[lb], np.inf)
        gap = bin_load.ravel()[hb] - bin_load.ravel()[lb]  # [n, kk]
        if slots < SORTED_SWAPS_FROM:
            d = la[..., :, None] - lbl[..., None, :]  # [n, kk, S, S] what the heavy bin sheds
            score = np.minimum(d, gap[..., None, None] - d).reshape(live.size * kk, -1)
            best = score.argmax(-1)
            top = score[np.arange(best.size), best]
        else:
            best, top = best_swaps(la.reshape(-1, slots), lbl.reshape(-1, slots), gap.ravel())
        do = (top > 1e-12 * gap.ravel()).reshape(live.size, kk)
        do &= np.arange(kk) < over[live, None]  # only bins above the goal
        do &= np.cumsum(do, 1) <= (budget[live] // 2)[:, None]  # heaviest first, within the budget
        made = do.sum(1)
        budget[live] -= 2 * made
        quiet[live] = np.where(made > 0, 0, quiet[live] + 1)
        do = do.ravel()
        if not do.any():
            continue
        h, lo, best = hb.ravel()[do], lb.ravel()[do], best[do]
        sa, sb = best // slots, best % slots
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
    return io.reshape(num_rows, num_bins, slots)
