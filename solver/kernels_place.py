"""Compiled kernels of the refinement and the dealing (see :mod:`ray_eplb.solver.compiled`):
each computes exactly what the numpy stage it names computes."""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.jit import jit as _jit


@_jit
def refine_kernel(io, il, ic, bin_load, num_owners, k, sweeps, budget, use_budget):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.packing.refine_swaps`' sweeps, in place.

    ``io [B*P, S]`` int64 owner per slot, ``il [B*P, S]`` float64 load per slot, ``ic [B*P, S]``
    int64 the slot owner's cap, ``bin_load [B, P]`` float64, ``num_owners`` (``n``), ``budget [B]`` int64 (read only
    where ``use_budget``). Per sweep and row: bins sorted by load (stable), the ``j``-th heaviest
    paired with the ``(shift + j)``-th lightest, in each pair the first best-scoring legal swap
    over all ``S x S`` replica pairs. Stops after two sweeps in a row change nothing in any row.
    """
    num_rows, num_bins = bin_load.shape
    slots = io.shape[1]
    in_h = np.zeros(num_owners, dtype=np.int64)  # copies of each owner in the pair's heavy bin
    in_l = np.zeros(num_owners, dtype=np.int64)  # ... and in its light bin
    la = np.empty(slots)  # heavy-bin loads (-inf: may not leave)
    lb = np.empty(slots)  # light-bin loads (+inf: may not leave)
    tops = np.empty(slots)  # scratch of the swap search
    order = np.empty(num_bins, dtype=np.int64)  # bins of a row by load, lightest first
    quiet = 0
    for sweep in range(sweeps):
        shift = sweep % 2 if num_bins > 2 else 0
        kk = min(k, (num_bins - shift) // 2)
        changed = False
        for r in range(num_rows):
            if num_bins <= 32:  # stable insertion sort: ties keep bin order
                for i in range(num_bins):
                    v = bin_load[r, i]
                    j = i - 1
                    while j >= 0 and bin_load[r, order[j]] > v:
                        order[j + 1] = order[j]
                        j -= 1
                    order[j + 1] = i
            else:
                order[:] = np.argsort(bin_load[r], kind="mergesort")  # stable too
            first = r * num_bins
            allowed = budget[r] // 2 if use_budget else 0
            spent = 0  # pairs that would swap, heaviest first (what the budget is checked on)
            paid = 0
            for j in range(kk):
                bh, bl = order[num_bins - 1 - j], order[shift + j]
                h, lo = first + bh, first + bl
                gap = bin_load[r, bh] - bin_load[r, bl]
                # Legal loads: a replica may enter the other bin only below its owner's cap there,
                # and may join a bin that holds its owner only if the bin it leaves keeps a copy.
                for s in range(slots):
                    in_h[io[h, s]] += 1
                    in_l[io[lo, s]] += 1
                for a in range(slots):
                    x, y = io[h, a], io[lo, a]
                    la[a] = il[h, a] if in_l[x] < ic[h, a] and (in_l[x] == 0 or in_h[x] >= 2) else -np.inf
                    lb[a] = il[lo, a] if in_h[y] < ic[lo, a] and (in_h[y] == 0 or in_l[y] >= 2) else np.inf
                for s in range(slots):
                    in_h[io[h, s]] = 0
                    in_l[io[lo, s]] = 0
                best, pick = _scan_rows(la, lb, gap, tops)
                do = best > 1e-12 * gap
                if use_budget and do:
                    spent += 1
                    do = spent <= allowed
                if not do:
                    continue
                changed = True
                paid += 1
                sa, sb = pick // slots, pick % slots
                shed = il[h, sa] - il[lo, sb]
                bin_load[r, bh] -= shed
                bin_load[r, bl] += shed
                io[h, sa], io[lo, sb] = io[lo, sb], io[h, sa]
                il[h, sa], il[lo, sb] = il[lo, sb], il[h, sa]
                ic[h, sa], ic[lo, sb] = ic[lo, sb], ic[h, sa]
            if use_budget:
                budget[r] -= 2 * paid
        if not changed:
            quiet += 1
            if quiet == 2 or num_bins <= 2:
                break
        else:
            quiet = 0


@_jit
def _scan_rows(la, lb, gap, tops):  # pragma: no cover (compiled)
    """The first ``(a, b)`` in row-major order maximising ``min(d, gap - d)``, ``d = la[a] - lb[b]``
    (``la``/``lb`` ``[S]``; what ``argmax`` over the ``S x S`` scores returns) and its score, as
    ``(score, a*S + b)``. Two passes: every row's best score into ``tops [S]`` (scratch), one
    light replica at a time against all heavy ones (a branch-free element-wise maximum the
    compiler vectorises; a maximum does not depend on the order it is taken in, and no NaN
    arises from the ``-inf``/``+inf`` markers), then the first maximal ``b`` of the first row
    that reaches the overall best. Against a one-pass scan keeping the first strict improvement:
    2x faster at 17 slots (qwen3_235b 136's refinement), 1.2-1.4x at 9, as fast at 5; 2-4x the
    sorted search (binary search per heavy replica) it replaces from 24 slots."""
    slots = la.size
    for a in range(slots):
        tops[a] = -np.inf
    for b in range(slots):
        y = lb[b]
        for a in range(slots):
            d = la[a] - y
            e = gap - d
            v = d if d < e else e
            tops[a] = v if v > tops[a] else tops[a]
    best, at = -np.inf, -1
    for a in range(slots):
        if tops[a] > best:
            best, at = tops[a], a
    if at >= 0:
        for b in range(slots):
            d = la[at] - lb[b]
            if min(d, gap - d) == best:
                return best, at * slots + b
    return best, 0


@_jit
def _order_desc(v, out, tmp, keys, ktmp, hist):  # pragma: no cover (compiled)
    """``out [n]``: the stable order of ``v [n]`` (finite, >= 0) by value descending, i.e. what
    ``np.argsort(-v, kind="stable")`` gives. An LSD radix sort on the top three bytes of the
    complemented bit patterns (a non-negative double's bits order as the value does: sign,
    exponent and 12 mantissa bits), 8 bits a pass, skipping the bytes all keys share, then an
    insertion sort on the whole keys, which moves only keys whose top bytes tie (few: they
    agree to 1 part in 4096, or are equal and already in order). Twice as fast on a hundred
    values as all eight passes, which were 2x numba's merge sort. ``tmp``, ``keys``, ``ktmp``
    ``[n]`` and ``hist [256]``: scratch."""
    n = v.size
    bits = v.view(np.uint64)
    same_and, same_or = ~np.uint64(0), np.uint64(0)
    for i in range(n):
        key = ~bits[i]
        keys[i] = key
        out[i] = i
        same_and &= key
        same_or |= key
    varies = same_and ^ same_or
    src_i, dst_i, src_k, dst_k = out, tmp, keys, ktmp
    moved = False
    for p in range(5, 8):
        shift = np.uint64(8 * p)
        if (varies >> shift) & np.uint64(255) == 0:
            continue
        hist[:] = 0
        for i in range(n):
            hist[(src_k[i] >> shift) & np.uint64(255)] += 1
        start = 0
        for b in range(256):
            count = hist[b]
            hist[b] = start
            start += count
        for i in range(n):
            d = (src_k[i] >> shift) & np.uint64(255)
            at = hist[d]
            hist[d] = at + 1
            dst_i[at], dst_k[at] = src_i[i], src_k[i]
        src_i, dst_i, src_k, dst_k = dst_i, src_i, dst_k, src_k
        moved = not moved
    if moved:
        out[:] = tmp
        keys[:] = ktmp
    for i in range(1, n):  # stable: a key moves only past strictly larger ones
        key, idx = keys[i], out[i]
        j = i - 1
        while j >= 0 and keys[j] > key:
            keys[j + 1], out[j + 1] = keys[j], out[j]
            j -= 1
        keys[j + 1], out[j + 1] = key, idx
    return out


@_jit
def snake_kernel(expert_load, counts, num_bins):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.packing.pack_snake`: serpentine dealing, each round turn taken
    one at a time (the straddling owner's replicas go to the first positions whose bins it does
    not hold). ``expert_load``/``counts`` ``[B, n]`` (every count <= ``P``). Returns
    ``slot_owner [B, P, S]`` int64."""
    num_rows, n = counts.shape
    num_items = 0
    for e in range(n):
        num_items += counts[0, e]
    slots = num_items // num_bins
    out = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    own = np.empty(num_items, dtype=np.int64)
    pos = np.empty((slots, num_bins), dtype=np.int64)
    held = np.empty(num_bins, dtype=np.bool_)
    item = np.empty(num_bins, dtype=np.int64)
    per = np.empty(n)
    by_owner, tmp = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    keys, ktmp, hist = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64), np.empty(256, dtype=np.int64)
    for r in range(num_rows):
        for e in range(n):  # owners with no replica sort anywhere: they deal nothing
            per[e] = expert_load[r, e] / counts[r, e] if counts[r, e] > 0 else 0.0
        _order_desc(per, by_owner, tmp, keys, ktmp, hist)  # heaviest replica first, ties by owner
        at = 0
        for e in by_owner:
            for _ in range(counts[r, e]):
                own[at] = e
                at += 1
        for i in range(num_bins):
            pos[0, i] = i
        for t in range(slots - 1):
            q = (t + 1) * num_bins
            mover = own[q - 1]
            lead = 0
            while lead < num_bins and q + lead < num_items and own[q + lead] == mover:
                lead += 1
            if lead == 0:
                for i in range(num_bins):
                    pos[t + 1, i] = i
                continue
            # Position p of round t+1 deals to the bin that position P-1-p of round t dealt to.
            free = 0
            for i in range(num_bins):
                held[num_bins - 1 - pos[t, i]] = own[t * num_bins + i] == mover
            for p in range(num_bins):
                free += not held[p]
            taken = 0
            for p in range(num_bins):
                chosen = (not held[p] and taken < lead) if free >= lead else p < lead
                if chosen:
                    taken += 1
                    item[p] = taken - 1
                else:
                    item[p] = lead + p - taken
            for p in range(num_bins):
                pos[t + 1, item[p]] = p
        for t in range(slots):
            for i in range(num_bins):
                b = pos[t, i] if t % 2 == 0 else num_bins - 1 - pos[t, i]
                out[r, b, t] = own[t * num_bins + i]
    return out


@_jit
def rounds_kernel(load, num_bins):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.packing.pack_rounds`: ``load [B, M]`` float64 -> ``[B, P, M/P]``
    int64 item ids (heaviest items first, each round's items meet the bins lightest first)."""
    num_rows, num_items = load.shape
    slots = num_items // num_bins
    assign = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    new = np.empty(num_bins)
    for r in range(num_rows):
        order = np.argsort(-load[r], kind="mergesort")
        bin_load = np.zeros(num_bins)
        perm = np.arange(num_bins)
        for t in range(slots):
            for p in range(num_bins):
                item = order[t * num_bins + p]
                assign[r, perm[p], t] = item
                new[p] = bin_load[p] + load[r, item]
            idx = np.argsort(new, kind="mergesort")
            bin_load = new[idx]
            perm = perm[idx]
    return assign


@_jit
def any_surplus(slot_owner, cap):  # pragma: no cover (compiled)
    """Whether :func:`~ray_eplb.solver.repair.surplus_copies` marks any slot of ``slot_owner
    [B, P, S]`` (``cap [B, n]``): an owner over its cap in a bin, or doubled up in a bin while it
    covers fewer bins than ``min(count, P)``. Touches only the owners present (``P*S`` per row,
    not ``P*n``: 9x fewer steps at 32 slots per GPU on 64 GPUs with 256 experts)."""
    num_rows, num_bins, slots = slot_owner.shape
    n = cap.shape[1]
    held = np.zeros((num_bins, n), dtype=np.int64)
    bins = np.zeros(n, dtype=np.int64)  # bins an owner covers
    total = np.zeros(n, dtype=np.int64)  # its copies
    doubled = np.zeros(n, dtype=np.bool_)  # twice or more in some bin
    for r in range(num_rows):
        for b in range(num_bins):
            for s in range(slots):
                e = slot_owner[r, b, s]
                held[b, e] += 1
                c = held[b, e]
                if c > cap[r, e]:
                    return True
                bins[e] += c == 1
                doubled[e] |= c == 2
                total[e] += 1
        for b in range(num_bins):
            for s in range(slots):
                e = slot_owner[r, b, s]
                if doubled[e] and bins[e] < min(total[e], num_bins):
                    return True
        for b in range(num_bins):
            for s in range(slots):
                e = slot_owner[r, b, s]
                held[b, e] = 0
                bins[e], total[e], doubled[e] = 0, 0, False
    return False


@_jit
def slot_counts_kernel(phy2log, num_experts):  # pragma: no cover (compiled)
    """``(logcnt [L, E] int64, True)``: the slots of each expert per row of ``phy2log [L, R]`` int64;
    or ``(partial counts, False)`` at the first id outside ``[0, E)`` (the check is the counting
    pass itself: one pass instead of a min, a max and a count)."""
    num_layers, num_slots = phy2log.shape
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    for r in range(num_layers):
        for s in range(num_slots):
            e = phy2log[r, s]
            if e < 0 or e >= num_experts:
                return logcnt, False
            logcnt[r, e] += 1
    return logcnt, True


@_jit
def fill_maps_kernel(phy2log, log2phy):  # pragma: no cover (compiled)
    """Fill ``log2phy [L, E, M]`` (``-1`` on entry; :func:`~ray_eplb.solver.maps.logical_maps_np`
    passes a block of layers at a time, just filled) with each expert's slots of ``phy2log [L, R]``
    int64 in ascending order. ``M`` must be at least the most slots of any expert (the caller counts
    them first with :func:`slot_counts_kernel`)."""
    num_layers, num_slots = phy2log.shape
    fill = np.zeros(log2phy.shape[1], dtype=np.int64)
    for r in range(num_layers):
        fill[:] = 0
        for s in range(num_slots):
            e = phy2log[r, s]
            log2phy[r, e, fill[e]] = s
            fill[e] += 1
