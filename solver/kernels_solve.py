"""Compiled kernels of the replica counts and of the fused solve (see
:mod:`ray_eplb.solver.compiled`): each computes exactly what the numpy stages it names compute."""
from __future__ import annotations

import math

import numpy as np

from ray_eplb.solver.jit import jit as _jit
from ray_eplb.solver.jit import njit as _njit
from ray_eplb.solver.kernels_place import refine_kernel, snake_kernel


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


def _pairwise_sum(a, start, n):  # pragma: no cover (compiled)
    """``a[start:start+n].sum()`` exactly as numpy sums a contiguous row: blocks of at most 128
    summed by :func:`_block_sum`, longer runs split in two halves (the first a multiple of 8) and
    added (:func:`_long_sum`). Kept this small so the compiler inlines it: with the long case in
    the same function it was a call per GPU, 8% of the goal swaps' time at 9 slots per GPU."""
    return _block_sum(a, start, n) if n <= 128 else _long_sum(a, start, n)


if _njit is not None:  # inlined into each caller by numba itself (a compiled call is not; the fresh
    # solve sums every GPU's load with it: 5-10% of its time at the scale shapes)
    _block_sum = _njit(cache=True, nogil=True, inline="always")(_block_sum)
    _pairwise_sum = _njit(cache=True, nogil=True, inline="always")(_pairwise_sum)


@_jit
def _long_sum(a, start, n):  # pragma: no cover (compiled)
    """:func:`_pairwise_sum` for ``n > 128``. Iterative (numba's cache cannot hold a recursive
    function)."""
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
        # ``ldexp(x, -shift)`` as a product with 2**-shift where that is a double (both are the
        # correctly rounded x * 2**-shift); 5x faster than calling ldexp on every number.
        if shift >= -1023:
            f = math.ldexp(1.0, -shift)
            for i in range(n):
                scaled[r, i] = 1.0 * f if zero[r] else w[r, i] * f
        else:
            for i in range(n):
                scaled[r, i] = math.ldexp(w[r, i], -shift)
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
