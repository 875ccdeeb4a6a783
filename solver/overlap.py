"""Sparse GPU overlaps and the matching of new GPU expert sets to GPU positions.

A GPU holds a few experts (``S`` slots), so two placements of a layer share experts between only
a few GPU pairs: ``sum_e c_old[e] * c_new[e]`` pairs at most, against ``P^2`` for a dense overlap
matrix. Everything here works on those pairs, so its cost follows the slots, not GPUs squared:

* :func:`sparse_overlap` lists the (layer, old GPU, new GPU, shared slots) quadruples
  (:func:`overlap` is the dense reference the tests compare with);
* :func:`match_gpus` is the maximum-overlap matching used by
  :func:`~ray_eplb.solver.migration.align` on one node: GPUs whose expert multiset is the same in
  both plans are matched directly (always part of some maximum matching: for ``A = old_i =
  new_j``, ``|A & new_j'| + |old_i' & A| <= |A| + |old_i' & new_j'|``), and an assignment solve
  runs only on the GPUs left over, on their dense sub-matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ray_eplb.solver.jit import njit
from ray_eplb.solver.maps import bin_counts


def _entries(bins: np.ndarray, num_experts: int, keep: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``bins [K, m, S]`` -> per distinct (row, bin, expert): ``row * E + expert``, bin, copies;
    only bins where ``keep [K, m]`` is true (all when ``None``)."""
    num_rows, num_bins, slots = bins.shape
    key = np.repeat(np.arange(num_rows * num_bins), slots) * num_experts + bins.ravel()
    if keep is not None:
        key = key[np.repeat(keep.ravel(), slots)]
    if slots > 1:
        key, mult = np.unique(key, return_counts=True)
    else:
        mult = np.ones(key.size, dtype=np.int64)
    flat_bin = key // num_experts
    return (flat_bin // num_bins) * num_experts + key % num_experts, flat_bin % num_bins, mult


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[..., m, m]`` multiset overlap of every bin of ``a`` with every bin of ``b`` (``[..., m, E]``).

    The dense reference (a BLAS product), for tests: the planner itself uses the sparse pairs of
    :func:`sparse_overlap`, whose cost follows the slots.
    """
    # Sets (no expert twice in a bin): the overlap is a dot product. Rows where an expert fills
    # two slots of a bin (an expert with more replicas than GPUs) take the minimum instead.
    out = np.matmul(a.astype(np.float32), np.swapaxes(b, -1, -2).astype(np.float32)).astype(np.int64)
    multi = np.nonzero((a.max((-2, -1), initial=0) > 1) | (b.max((-2, -1), initial=0) > 1))
    if multi[0].size:
        shape = out.shape[:-2] + a.shape[-2:]
        ra, rb = np.broadcast_to(a, shape)[multi], np.broadcast_to(b, shape)[multi]  # [k, m, E]
        out[multi] = np.minimum(ra[:, :, None, :], rb[:, None, :, :]).sum(-1)
    return out


def sparse_overlap(
    old: np.ndarray, new: np.ndarray, num_experts: int, keep_old: np.ndarray | None = None,
    keep_new: np.ndarray | None = None, skip: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Shared slots of every (old bin, new bin) pair that shares any, per row.

    ``old``, ``new``: ``[K, m, S]`` expert per slot. A pair shares ``sum_e min(old copies, new
    copies)`` slots. ``keep_old``, ``keep_new`` (``[K, m]`` bool, optional): only these bins; ``skip``
    (``[K, E]`` bool, optional): experts left out. Returns ``(row, i, j, shared)``, each ``[Q]``
    int64, one entry per pair with ``shared > 0``, sorted by ``(row, i, j)``.
    """
    num_rows, num_bins, _ = old.shape
    ka, ia, ma = _entries(old, num_experts, keep_old)
    kb, ib, mb = _entries(new, num_experts, keep_new)
    if skip is not None:  # experts left out (their shared slots are not counted)
        a_in, b_in = ~skip.ravel()[ka], ~skip.ravel()[kb]
        ka, ia, ma, kb, ib, mb = ka[a_in], ia[a_in], ma[a_in], kb[b_in], ib[b_in], mb[b_in]
    order = np.argsort(kb, kind="stable")
    kb, ib, mb = kb[order], ib[order], mb[order]
    start = np.searchsorted(kb, ka, "left")
    many = np.searchsorted(kb, ka, "right") - start  # [Na] new entries of the same (row, expert)
    a = np.repeat(np.arange(ka.size), many)
    b = np.repeat(start - (np.cumsum(many) - many), many) + np.arange(a.size)
    row = ka[a] // num_experts
    key = (row * num_bins + ia[a]) * num_bins + ib[b]
    weight = np.minimum(ma[a], mb[b])
    if num_rows * num_bins * num_bins <= 1 << 22:  # small enough to count densely: no sort
        dense = np.bincount(key, weights=weight, minlength=num_rows * num_bins * num_bins)
        uniq = np.flatnonzero(dense)
        shared = dense[uniq].astype(np.int64)
    else:
        uniq, inv = np.unique(key, return_inverse=True)
        shared = np.bincount(inv.ravel(), weights=weight, minlength=uniq.size).astype(np.int64)
    return uniq // (num_bins * num_bins), (uniq // num_bins) % num_bins, uniq % num_bins, shared


def kept_upper_bound(old: np.ndarray, new: np.ndarray, num_experts: int, rows: np.ndarray | None = None) -> np.ndarray:
    """``[K]``: no matching of the bins of ``new [K, m, S]`` to those of ``old`` keeps more slots
    than ``min(sum_i max_j shared, sum_j max_i shared)`` (from :func:`sparse_overlap`), or than
    that bound with the shared slots of very replicated experts replaced by their copies per bin.
    ``rows`` (optional, ``[n]`` int64): only these rows (``[n]`` out), read in place, not copied."""
    if kept_kernel is not None and old.shape[1] <= 256:  # exact sums, no hot experts left out: as tight or tighter
        rows = np.arange(old.shape[0]) if rows is None else rows
        return kept_kernel(old, new, num_experts, np.ascontiguousarray(rows, dtype=np.int64))
    if rows is not None:
        old, new = old[rows], new[rows]
    num_rows, num_bins, slots = old.shape
    # An expert on most bins of both plans adds ~c_old * c_new pairs; such "hot" experts are left
    # out of the pairs and bounded instead by their copies in each bin (still an upper bound).
    c_old = bin_counts(old.reshape(num_rows, -1), 1, num_experts)[:, 0]  # [K, E]
    c_new = bin_counts(new.reshape(num_rows, -1), 1, num_experts)[:, 0]
    hot = c_old * c_new > 8 * slots * num_bins // max(num_experts, 1) + 64  # [K, E]
    row, i, j, shared = sparse_overlap(old, new, num_experts, skip=hot if hot.any() else None)
    extra = []  # [K, m] hot copies per bin, old side and new side
    for bins in (old, new):
        extra.append(np.take_along_axis(hot, bins.reshape(num_rows, -1), 1).reshape(num_rows, num_bins, slots).sum(-1))
    out = []
    for side, (order, key) in enumerate(((None, row * num_bins + i), (np.lexsort((j, row)), row * num_bins + j))):
        total = extra[side].sum(1)  # [K]
        k, v = (key, shared) if order is None else (key[order], shared[order])
        if k.size:
            starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
            best = np.maximum.reduceat(v, starts)  # [groups] each bin's largest overlap
            total = total + np.bincount(k[starts] // num_bins, weights=best, minlength=num_rows).astype(np.int64)
        out.append(total)
    return np.minimum(*out)


def match_gpus(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    """Per row, the new bin for each old bin position with the most shared slots in total.

    ``old``, ``new``: ``[K, m, S]``. Returns ``perm [K, m]``: position ``i`` takes new bin
    ``perm[k, i]``. Bins with equal multisets are paired first; the rest by an assignment solve
    on their sub-matrix (shared slots from :func:`sparse_overlap`).
    """
    num_rows, num_bins, slots = old.shape
    both = np.sort(np.concatenate([old, new], 1), axis=-1).reshape(-1, slots)  # [K*2m, S] multisets
    row = np.repeat(np.arange(num_rows), 2 * num_bins)
    side = np.tile(np.repeat([0, 1], num_bins), num_rows)  # 0 old, 1 new
    pos = np.tile(np.arange(num_bins), 2 * num_rows)
    order = np.lexsort((pos, side) + tuple(both[:, s] for s in range(slots - 1, -1, -1)) + (row,))
    srt = both[order]
    new_set = np.ones(order.size, dtype=bool)
    new_set[1:] = (srt[1:] != srt[:-1]).any(1) | (row[order][1:] != row[order][:-1])
    cls = np.cumsum(new_set) - 1  # [K*2m] class id in sorted order
    s = side[order]
    # Rank within (class, side): old members of a class are first (side 0), then new ones.
    starts = np.flatnonzero(new_set | np.r_[True, s[1:] != s[:-1]])
    run = np.repeat(starts, np.diff(np.r_[starts, order.size]))
    rank = np.arange(order.size) - run
    key_old = np.full(num_rows * num_bins, -1, dtype=np.int64)
    key_new = np.full(num_rows * num_bins, -1, dtype=np.int64)
    flat = row[order] * num_bins + pos[order]
    big = 2 * num_bins + 1
    key_old[flat[s == 0]] = (cls * big + rank)[s == 0]
    key_new[flat[s == 1]] = (cls * big + rank)[s == 1]
    # Pair old bin and new bin with the same (class, rank).
    srt_new = np.argsort(key_new, kind="stable")
    hit = np.searchsorted(key_new[srt_new], key_old)
    hit = np.minimum(hit, key_new.size - 1)
    found = key_new[srt_new][hit] == key_old
    perm = np.full(num_rows * num_bins, -1, dtype=np.int64)
    perm[found] = srt_new[hit[found]] % num_bins
    perm = perm.reshape(num_rows, num_bins)
    left = perm < 0  # [K, m] old positions the direct pairing left over
    todo = np.nonzero(left.sum(1) > 1)[0]
    if todo.size and slots > 1:  # (one slot per bin: leftover bins never share an expert)
        used = np.zeros((todo.size, num_bins), dtype=bool)
        row_of, pos_of = np.nonzero(perm[todo] >= 0)
        used[row_of, perm[todo][row_of, pos_of]] = True
        k, i, j, shared = sparse_overlap(old[todo], new[todo], num_experts, left[todo], ~used)
        bounds = np.searchsorted(k, np.arange(todo.size + 1))  # pairs are sorted by row
        index = np.cumsum(np.concatenate([left[todo], ~used], 1), 1) - 1  # [T, 2m] rank among the free
        for t in np.nonzero(np.diff(bounds))[0]:  # assignment only where leftover bins share experts
            a, b = bounds[t], bounds[t + 1]
            free_old, free_new = np.flatnonzero(left[todo[t]]), np.flatnonzero(~used[t])
            score = np.zeros((free_old.size, free_new.size))
            score[index[t, i[a:b]], index[t, num_bins + j[a:b]] - free_old.size] = shared[a:b]
            ra, cb = linear_sum_assignment(score, maximize=True)
            perm[todo[t], free_old[ra]] = free_new[cb]
    # The rest pair up in order: leftover positions with leftover new bins.
    left = perm < 0
    if left.any():
        used = np.zeros((num_rows, num_bins), dtype=bool)
        row_of, pos_of = np.nonzero(~left)
        used[row_of, perm[row_of, pos_of]] = True
        free_new = np.argsort(used, axis=1, kind="stable")  # [K, m] unused new bins first
        rank = np.cumsum(left, 1) - 1  # [K, m] index among a row's leftover positions
        rows_l, pos_l = np.nonzero(left)
        perm[rows_l, pos_l] = free_new[rows_l, rank[rows_l, pos_l]]
    return perm


def _kept_kernel(old, new, num_experts, rows):  # pragma: no cover (compiled)
    """``min(sum_i max_j shared, sum_j max_i shared)`` for the rows ``rows [n]`` of ``old``, ``new``
    ``[K, m, S]`` (``[n]`` out), with ``shared`` the multiset overlap of old bin ``i`` and new bin
    ``j`` (each copy of an expert in new bin ``j`` meets the old bins still holding an unmatched
    copy of it). Tables are int32 (counts of a row's slots) and the maxima are taken in one pass in
    memory order, which also clears the overlaps: 20-25% less time than int64 and a column-wise
    pass at 32-64 GPUs."""
    _, num_bins, slots = old.shape
    out = np.zeros(rows.size, dtype=np.int64)
    shared = np.zeros((num_bins, num_bins), dtype=np.int32)
    held = np.zeros((num_bins, num_experts), dtype=np.int32)  # copies per old bin
    bins_of = np.empty((num_experts, num_bins * slots), dtype=np.int32)  # distinct old bins of each expert
    many = np.zeros(num_experts, dtype=np.int64)
    seen = np.zeros(num_experts, dtype=np.int64)  # copies met so far in the current new bin
    col_best = np.zeros(num_bins, dtype=np.int32)
    for t in range(rows.size):
        r = rows[t]
        for i in range(num_bins):
            for s in range(slots):
                e = old[r, i, s]
                if held[i, e] == 0:
                    bins_of[e, many[e]] = i
                    many[e] += 1
                held[i, e] += 1
        for j in range(num_bins):
            for s in range(slots):
                e = new[r, j, s]
                for k in range(many[e]):
                    i = bins_of[e, k]
                    if seen[e] < held[i, e]:
                        shared[i, j] += 1
                seen[e] += 1
            for s in range(slots):
                seen[new[r, j, s]] = 0
        rows_best, cols_best = 0, 0
        for j in range(num_bins):
            col_best[j] = 0
        for i in range(num_bins):  # one pass in memory order: row and column maxima, then reset
            m = 0
            for j in range(num_bins):
                v = shared[i, j]
                m = max(m, v)
                col_best[j] = max(col_best[j], v)
                shared[i, j] = 0
            rows_best += m
        for j in range(num_bins):
            cols_best += col_best[j]
        out[t] = min(rows_best, cols_best)
        for i in range(num_bins):  # reset for the next row (only what was touched)
            for s in range(slots):
                e = old[r, i, s]
                held[i, e] = 0
                many[e] = 0
    return out


kept_kernel = njit(cache=True, nogil=True)(_kept_kernel) if njit is not None else None
