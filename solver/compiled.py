"""Compiled kernels (numba) for the solve's sequential inner loops, with the numpy code as fallback.

The vectorised numpy stages cost their dispatch overhead more than their arithmetic: a solve is
hundreds of small array ops (tens of microseconds each) on arrays of 10^2-10^4 numbers. The
kernels here run the same algorithms as scalar loops in one compiled call, so each costs
microseconds. Every kernel computes *exactly* what the numpy stage it replaces computes (same
floating-point operations in the same order, same tie rules), so a plan does not depend on
whether numba is installed; the unit tests compare both paths on the trace cases and random inputs.

Use: :data:`ENABLED` is true when numba imports, ``RAY_EPLB_NUMBA`` is not ``0`` and the warm-up
compiles; the stages call the kernels then, and their numpy code otherwise. Kernels are compiled with ``cache=True``
(numba's on-disk cache: a fresh process loads them in milliseconds once any process compiled
them) and are warmed up once on a tiny input the first time this module is imported, so no solve
pays the compile. They are single-threaded (no ``parallel=True``): a solve runs on one core.
"""
from __future__ import annotations

import math
import os

import numpy as np

try:
    if os.environ.get("RAY_EPLB_NUMBA", "1") == "0":
        raise ImportError("disabled by RAY_EPLB_NUMBA=0")
    from numba import njit
except ImportError:
    njit = None

ENABLED = njit is not None


def _jit(fn):
    return njit(cache=True, nogil=True)(fn) if ENABLED else fn


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
                best, pick = _best_swap(la, lb, gap) if slots >= 24 else _scan_swaps(la, lb, gap)
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
def _best_swap(la, lb, gap):  # pragma: no cover (compiled)
    """The first ``(a, b)`` in row-major order maximising ``min(d, gap - d)``, ``d = la[a] - lb[b]``
    (``la``/``lb`` ``[S]``; what ``argmax`` over the ``S x S`` scores returns), in ``O(S log S)``.

    Along ``lb`` ascending, ``d`` falls and ``gap - d`` rises (float rounding is monotone), so
    ``d >= gap - d`` holds on a prefix; the score is ``gap - d`` there (rising) and ``d`` after
    (falling): a row's maximum is at the last prefix or the first suffix position. Only a row
    that beats the best so far is scanned for its first maximal ``b``. Returns ``(score, a*S + b)``.
    """
    slots = la.size
    order = np.argsort(lb)
    best, pick = -np.inf, 0
    for a in range(slots):
        if la[a] == -np.inf:
            continue
        lo_, hi_ = 0, slots  # first position where d < gap - d
        while lo_ < hi_:
            mid = (lo_ + hi_) // 2
            d = la[a] - lb[order[mid]]
            if d >= gap - d:
                lo_ = mid + 1
            else:
                hi_ = mid
        top = -np.inf
        if lo_ > 0:
            d = la[a] - lb[order[lo_ - 1]]
            top = min(d, gap - d)
        if lo_ < slots:
            d = la[a] - lb[order[lo_]]
            top = max(top, min(d, gap - d))
        if top > best:
            for b in range(slots):
                d = la[a] - lb[b]
                if min(d, gap - d) == top:
                    best, pick = top, a * slots + b
                    break
    return best, pick


@_jit
def _scan_swaps(la, lb, gap):  # pragma: no cover (compiled)
    """:func:`_best_swap` by the plain ``S x S`` scan (faster below about 24 slots)."""
    slots = la.size
    best, pick = -np.inf, 0
    for a in range(slots):
        if la[a] == -np.inf:
            continue
        for b in range(slots):
            d = la[a] - lb[b]
            score = min(d, gap - d)
            if score > best:
                best, pick = score, a * slots + b
    return best, pick


@_jit
def _seat_sum(w, r, t):  # pragma: no cover (compiled)
    """``sum_i max(ceil(w[r, i] / t), 1)``: exact (whole numbers in float64)."""
    total = 0.0
    for i in range(w.shape[1]):
        total += max(np.ceil(w[r, i] / t), 1.0)
    return total


@_jit
def counts_kernel(w, total, num_phy, tail, dhondt):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.counts.counts_np` after its scaling: the water level, then the
    bulk fill and hybrid tail (or D'Hondt). ``w [X, n]`` float64 (rows scaled, positive sums),
    ``total [X]`` its row sums. Returns ``[X, n]`` int64."""
    num_rows, n = w.shape
    m = num_phy - n
    lo, hi = total / num_phy, total / m
    s_lo, s_hi = np.empty(num_rows), np.empty(num_rows)
    for r in range(num_rows):
        s_lo[r], s_hi[r] = _seat_sum(w, r, lo[r]), _seat_sum(w, r, hi[r])
    for _ in range(64):  # the same bisection as the numpy code: every row until all brackets are small
        widest = 0.0
        for r in range(num_rows):
            if s_lo[r] != num_phy and s_hi[r] != num_phy:
                widest = max(widest, s_lo[r] - s_hi[r])
        if widest <= 32:
            break
        for r in range(num_rows):
            t = 0.5 * (lo[r] + hi[r])
            s_t = _seat_sum(w, r, t)
            if s_t <= num_phy:
                hi[r], s_hi[r] = t, s_t
            else:
                lo[r], s_lo[r] = t, s_t
    counts = np.empty((num_rows, n), dtype=np.int64)
    quot = np.empty(64)
    for r in range(num_rows):
        on_lo = s_lo[r] == num_phy
        for i in range(n):
            counts[r, i] = int(max(np.ceil(w[r, i] / (lo[r] if on_lo else hi[r])), 1.0))
        need = 0 if on_lo else int(num_phy - s_hi[r])
        if need > 0:  # t* is the (need+1)-th largest quotient w_i / k, k in [c_hi_i, c_lo_i)
            size = 0
            for i in range(n):
                c_lo = int(max(np.ceil(w[r, i] / lo[r]), 1.0))
                for k in range(counts[r, i], c_lo):
                    if size == quot.size:
                        quot = np.concatenate((quot, np.empty(quot.size)))
                    quot[size] = w[r, i] / k
                    size += 1
            level = np.sort(quot[:size])[size - 1 - min(need, size - 1)]
            extra = np.zeros(n, dtype=np.int64)
            for i in range(n):
                c_lo = int(max(np.ceil(w[r, i] / lo[r]), 1.0))
                for k in range(counts[r, i], c_lo):
                    if w[r, i] / k > level:
                        extra[i] += 1
            counts[r] += extra
        free = num_phy - counts[r].sum()
        if dhondt:
            for _ in range(free):
                counts[r, np.argmax(w[r] / counts[r])] += 1
        else:
            _fill_row(w[r], counts[r], free, tail)
    return counts


@_jit
def _fill_row(w, c, free, tail):  # pragma: no cover (compiled)
    """The bulk fill and hybrid tail of one row (``w``, ``c`` ``[n]``; ``c`` updated in place)."""
    n = w.size
    last = min(free, tail)
    bulk = free - last
    while bulk > 0:
        chunk = min(bulk, n)
        order = np.argsort(-(w / c), kind="mergesort")
        for j in range(chunk):
            c[order[j]] += 1
        bulk -= chunk
    for _ in range(last):
        avg = w / c
        top = np.argmax(avg)
        top_val = avg[top]
        avg[top] = -np.inf
        second = avg.max()
        p_d, p_s = np.argmax(w / (c + 1)), np.argmax(w / (2 * c + 1))
        heavy_d, heavy_s = w[p_d], w[p_s]
        new_d, new_s = heavy_d / (c[p_d] + 1), heavy_s / (c[p_s] + 1)
        others_d = second if p_d == top else top_val
        others_s = second if p_s == top else top_val
        peak_d, peak_s = max(others_d, new_d), max(others_s, new_s)
        use_sl = peak_s < peak_d or (
            peak_s == peak_d and (others_s < others_d or (others_s == others_d and heavy_s > heavy_d)))
        c[p_s if use_sl else p_d] += 1


@_jit
def _order_desc(v, out, tmp, keys, ktmp, hist):  # pragma: no cover (compiled)
    """``out [n]``: the stable order of ``v [n]`` (finite, >= 0) by value descending, i.e. what
    ``np.argsort(-v, kind="stable")`` gives. An LSD radix sort on the complemented bit patterns
    (a non-negative double's bits order as the value does), 8 bits a pass, skipping the bytes
    all keys share: branch-free, 2x numba's merge sort on a hundred values. ``tmp``, ``keys``,
    ``ktmp`` ``[n]`` and ``hist [256]``: scratch."""
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
    for p in range(8):
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
    covers fewer bins than ``min(count, P)``."""
    num_rows, num_bins, slots = slot_owner.shape
    n = cap.shape[1]
    held = np.zeros((num_bins, n), dtype=np.int64)
    for r in range(num_rows):
        held[:] = 0
        for b in range(num_bins):
            for s in range(slots):
                held[b, slot_owner[r, b, s]] += 1
        for e in range(n):
            bins, total, doubled = 0, 0, False
            for b in range(num_bins):
                c = held[b, e]
                if c > cap[r, e]:
                    return True
                bins += c > 0
                total += c
                doubled |= c >= 2
            if doubled and bins < min(total, num_bins):
                return True
    return False


@_jit
def maps_kernel(phy2log, log2phy):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.maps.logical_maps_np` for ``phy2log [L, R]`` int64 with ids in
    ``[0, E)``: fills ``log2phy [L, E, R-E+1]`` (``-1`` on entry; allocated by numpy, which asks
    the OS for huge pages: this output is the largest array of a solve) with each expert's slots
    in ascending order. Returns ``logcnt [L, E]`` int64 and the largest count; writes nothing
    when that exceeds ``R - E + 1`` (the caller rejects it)."""
    num_layers, num_slots = phy2log.shape
    num_experts, width = log2phy.shape[1], log2phy.shape[2]
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    most = 0
    for r in range(num_layers):
        for s in range(num_slots):
            logcnt[r, phy2log[r, s]] += 1
        for e in range(num_experts):
            most = max(most, logcnt[r, e])
    if most > width:
        return logcnt, most
    fill = np.zeros(num_experts, dtype=np.int64)
    for r in range(num_layers):
        fill[:] = 0
        for s in range(num_slots):
            e = phy2log[r, s]
            log2phy[r, e, fill[e]] = s
            fill[e] += 1
    return logcnt, most


@_jit
def _block_sum(a, start, n):  # pragma: no cover (compiled)
    """numpy's sum of ``n <= 128`` contiguous numbers: sequential below 8, else 8 lanes."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[start + i]
        return res
    s = start
    r0, r1, r2, r3 = a[s], a[s + 1], a[s + 2], a[s + 3]
    r4, r5, r6, r7 = a[s + 4], a[s + 5], a[s + 6], a[s + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[s + i]
        r1 += a[s + i + 1]
        r2 += a[s + i + 2]
        r3 += a[s + i + 3]
        r4 += a[s + i + 4]
        r5 += a[s + i + 5]
        r6 += a[s + i + 6]
        r7 += a[s + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[s + i]
        i += 1
    return res


@_jit
def _pairwise_sum(a, start, n):  # pragma: no cover (compiled)
    """``a[start:start+n].sum()`` exactly as numpy sums a contiguous row: blocks of at most 128
    summed by :func:`_block_sum`, longer runs split in two halves (the first a multiple of 8) and
    added. Iterative (numba's cache cannot hold a recursive function)."""
    if n <= 128:
        return _block_sum(a, start, n)
    at = np.empty(64, dtype=np.int64)  # frames: start, length, left half's sum, which half is next
    size = np.empty(64, dtype=np.int64)
    left = np.empty(64)
    right_next = np.zeros(64, dtype=np.bool_)
    depth = 0
    at[0], size[0] = start, n
    while True:
        half = size[depth] // 2
        half -= half % 8
        child_at = at[depth] + half if right_next[depth] else at[depth]
        child_n = size[depth] - half if right_next[depth] else half
        if child_n > 128:
            depth += 1
            at[depth], size[depth], right_next[depth] = child_at, child_n, False
            continue
        v = _block_sum(a, child_at, child_n)
        while True:  # hand v up to the frames it completes
            if not right_next[depth]:
                left[depth], right_next[depth] = v, True
                break
            v = left[depth] + v
            if depth == 0:
                return v
            depth -= 1


@_jit
def solve_kernel(w, num_phy, num_bins, k, sweeps, tail, dhondt):  # pragma: no cover (compiled)
    """:func:`~ray_eplb.solver.counts.counts_np` then :func:`~ray_eplb.solver.packing.place_replicas`
    in one call, for ``w [X, n]`` float64 with ``1 < n < num_phy``. Returns ``slot_owner [F, P, S]``
    and ``bin_load [F, P]`` of the ``F`` rows that fit, ``counts [X, n]`` and ``fits [X]``: a row
    fits unless an owner has more replicas than bins (the caller places those with numpy stages)."""
    num_rows, n = w.shape
    scaled = np.empty((num_rows, n))
    total = np.empty(num_rows)
    zero = np.zeros(num_rows, dtype=np.bool_)
    for r in range(num_rows):
        top = 0.0
        for i in range(n):
            top = max(top, w[r, i])
        zero[r] = top == 0.0  # (loads are >= 0: an all-zero row)
        shift = math.frexp(1.0 if zero[r] else top)[1]
        for i in range(n):
            scaled[r, i] = math.ldexp(1.0 if zero[r] else w[r, i], -shift)
        total[r] = _pairwise_sum(scaled[r], 0, n)
    counts = counts_kernel(scaled, total, num_phy, tail, dhondt)
    fits = np.ones(num_rows, dtype=np.bool_)
    for r in range(num_rows):
        if zero[r]:  # everyone num_phy // n, the first num_phy % n one more
            for i in range(n):
                counts[r, i] = num_phy // n + (1 if i < num_phy % n else 0)
        for i in range(n):
            fits[r] &= counts[r, i] <= num_bins
    slots = num_phy // num_bins
    rows = np.nonzero(fits)[0]
    if rows.size == 0:
        return np.empty((0, num_bins, slots), dtype=np.int64), np.empty((0, num_bins)), counts, fits
    # Rows are independent (refinement stops when every row is settled), so the rows that fit
    # are placed here and the others, on return, by the numpy stages.
    sub_w = np.empty((rows.size, n))
    sub_c = np.empty((rows.size, n), dtype=np.int64)
    for j in range(rows.size):
        sub_w[j], sub_c[j] = w[rows[j]], counts[rows[j]]
    slot_owner = snake_kernel(sub_w, sub_c, num_bins)
    io = slot_owner.reshape(rows.size * num_bins, slots)
    il = np.empty((rows.size * num_bins, slots))
    bin_load = np.empty((rows.size, num_bins))
    for j in range(rows.size):
        for b in range(num_bins):
            row = j * num_bins + b
            for s in range(slots):
                il[row, s] = sub_w[j, io[row, s]] / sub_c[j, io[row, s]]
            bin_load[j, b] = _pairwise_sum(il[row], 0, slots)
    ic = np.ones((rows.size * num_bins, slots), dtype=np.int64)
    refine_kernel(io, il, ic, bin_load, n, k, sweeps, np.zeros(rows.size, dtype=np.int64), False)
    return slot_owner, bin_load, counts, fits


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a tiny input."""
    if not ENABLED:
        return
    io = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], dtype=np.int64)
    il = np.array([[3.0, 1.0], [2.0, 0.5], [3.0, 2.0], [1.0, 0.5]])
    refine_kernel(io, il, np.ones_like(io), il.sum(1).reshape(1, 4), 4, 2, 2, np.zeros(1, dtype=np.int64), False)
    w = np.array([[0.9, 0.5, 0.25, 0.125]])
    snake_kernel(w, np.array([[3, 2, 2, 1]]), 4)
    rounds_kernel(w, 2)
    for dhondt in (False, True):
        solve_kernel(w, 8, 2, 1, 2, 1, dhondt)
    maps_kernel(io.reshape(2, 4), np.full((2, 4, 5), -1, dtype=np.int64))
    any_surplus(io.reshape(1, 4, 2), np.ones((1, 4), dtype=np.int64))
    for dhondt in (False, True):
        counts_kernel(w, w.sum(1), 9, 1, dhondt)


try:
    warm_up()
except Exception as exc:  # noqa: BLE001 (a numba that cannot compile these must not break the solver)
    import warnings

    ENABLED = False
    warnings.warn(f"ray_eplb.solver: compiled kernels disabled, the numpy code runs ({type(exc).__name__}: {exc})",
                  RuntimeWarning, stacklevel=1)
