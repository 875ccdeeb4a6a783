"""What the migration-aware planner reads off a plan, in one pass: replica counts, peak GPU load,
avoidable duplicates, and whether any GPU stacks an expert beyond its cap.

:func:`plan_stats` is compiled (numba) where available: one loop over the slots instead of a
dozen numpy calls (a bincount, a gather, a sort, reductions), which cost more in dispatch than
in arithmetic at the production shapes. It gives exactly what the numpy code gives (the GPU
loads are summed as numpy sums a row), and that numpy code is the fallback.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.jit import njit
from ray_eplb.solver.maps import avoidable_duplicates_np, bin_counts, replica_shares

if njit is not None:
    from ray_eplb.solver.kernels_solve import _pairwise_sum
else:  # pragma: no cover
    _pairwise_sum = None


def plan_stats(
    plan: np.ndarray, w: np.ndarray, num_gpus: int, dups: bool = True, cap: bool = False,
    cnt: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(cnt [L, E] int64, peak [L] float64, dups [L] int64, within_cap [L] bool)`` of
    ``plan [L, R]`` under ``w [L, E]``: replicas per expert, the max GPU load (an expert's load
    split evenly among its replicas, as :func:`~ray_eplb.solver.migration.peak_load`), avoidable
    duplicates (as :func:`~ray_eplb.solver.maps.avoidable_duplicates_np`; ``None`` unless
    ``dups``), and whether no GPU holds more than ``ceil(count / P)`` copies of an expert
    (``None`` unless ``cap``). ``cnt`` (optional): ``plan``'s replicas per expert when already
    counted (returned as given, not recounted)."""
    num_layers, num_experts = w.shape
    if plan_stats_kernel is not None and num_layers:
        counted = cnt is not None
        cnt = np.ascontiguousarray(cnt, dtype=np.int64) if counted else np.zeros((num_layers, num_experts), dtype=np.int64)
        peak, dup, ok = plan_stats_kernel(np.ascontiguousarray(plan), np.ascontiguousarray(w), num_gpus, cnt, counted,
                                          cap)
        return cnt, peak, dup if dups else None, ok if cap else None
    if cnt is None:
        cnt = bin_counts(plan, 1, num_experts)[:, 0]  # [L, E]
    share, most = replica_shares(w, cnt, num_gpus)  # [L, E] each
    flat = plan + (np.arange(num_layers) * num_experts)[:, None]
    per = share.ravel()[flat]  # [L, R]
    peak = per.reshape(num_layers, num_gpus, -1).sum(-1).max(1) if num_layers else np.zeros(0)
    dup = avoidable_duplicates_np(plan, num_gpus, num_experts) if dups else None
    ok = None
    if cap:
        held = bin_counts(plan, num_gpus, num_experts)  # [L, P, E]
        ok = (held <= most[:, None, :]).all((1, 2))
    return cnt, peak, dup, ok


def _row_shares(w_row, cnt_row, num_bins, per, cap):  # pragma: no cover (compiled, inlined)
    """One row's owners (``w_row``/``cnt_row`` ``[n]``: load and replicas each), in place: ``per
    [n]`` the load one replica carries (``w / cnt``; 0 for an owner without a replica, which no
    slot holds), ``cap [n]`` the copies one of ``num_bins`` bins may hold (``ceil(cnt / P)``: 1
    unless the owner has more replicas than bins). Returns the copies the row must stack however it
    is placed, ``sum(max(cnt - P, 0))``. Shared by the plan statistics, the goal swaps and the
    duplicate repair; the numpy stages use :func:`~ray_eplb.solver.maps.replica_shares`."""
    unavoidable = 0
    for e in range(w_row.shape[0]):
        c = cnt_row[e]
        per[e] = w_row[e] / c if c > 0 else 0.0
        cap[e] = 1 if c <= num_bins else (c + num_bins - 1) // num_bins  # (no division mostly)
        unavoidable += max(c - num_bins, 0)
    return unavoidable


if njit is not None:
    _row_shares = njit(cache=True, nogil=True, inline="always")(_row_shares)


def _plan_stats_kernel(plan, w, num_gpus, cnt, counted, want_cap):  # pragma: no cover (compiled)
    """:func:`plan_stats` for ``plan [L, R]`` int64, ``w [L, E]`` float64, one layer at a time:
    ``(peak, dups, within_cap)`` (``within_cap`` all true unless ``want_cap``); ``cnt [L, E]`` is
    counted here (zeros on entry) unless ``counted``. A GPU's copies of an expert are told apart
    by a stamp per (layer, GPU), so nothing is cleared between GPUs (28% less time at Kimi-K2-like
    shapes than clearing a count per slot)."""
    num_layers, num_slots = plan.shape
    num_experts = w.shape[1]
    slots = num_slots // num_gpus
    peak = np.zeros(num_layers)
    dup = np.zeros(num_layers, dtype=np.int64)
    ok = np.ones(num_layers, dtype=np.bool_)
    per = np.empty(num_experts)
    cap = np.empty(num_experts, dtype=np.int64)
    loads = np.empty(slots)
    mark = np.full(num_experts, -1, dtype=np.int64)  # the last (layer, GPU) stamp that met each expert
    seen = np.zeros(num_experts, dtype=np.int64)  # its copies on that GPU
    for r in range(num_layers):
        if not counted:
            for i in range(num_slots):
                cnt[r, plan[r, i]] += 1
        extra = _row_shares(w[r], cnt[r], num_gpus, per, cap)
        best = -np.inf
        pairs = 0
        for g in range(num_gpus):
            base = g * slots
            stamp = r * num_gpus + g
            x = 0.0  # (numpy sums fewer than 8 numbers in order)
            for s in range(slots):
                e = plan[r, base + s]
                loads[s] = per[e]
                x += per[e]
                if mark[e] == stamp:  # a copy beyond the first on this GPU
                    pairs += 1
                    seen[e] += 1
                    if want_cap and seen[e] > cap[e]:
                        ok[r] = False
                else:
                    mark[e] = stamp
                    seen[e] = 1
            if slots >= 8:
                x = _pairwise_sum(loads, 0, slots)
            if x > best:
                best = x
        peak[r] = best
        dup[r] = pairs - extra
    return peak, dup, ok


plan_stats_kernel = njit(cache=True, nogil=True)(_plan_stats_kernel) if njit is not None else None


def shared_counts(plan: np.ndarray, cnt_other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cnt [L, E], kept [L], most [L])`` of ``plan [L, R]`` int64 (ids in ``[0, E)``, not
    checked: a plan the solver made) against ``cnt_other [L, E]`` (another plan's replicas per
    expert): its replicas per expert, ``sum_e min(cnt, cnt_other)`` (the slots the two plans can
    share at most) and ``max_e cnt``, all int64. One compiled pass where numba is installed (a
    count, a minimum, two sums and a maximum in numpy)."""
    if shared_counts_kernel is not None:
        return shared_counts_kernel(np.ascontiguousarray(plan, dtype=np.int64),
                                    np.ascontiguousarray(cnt_other, dtype=np.int64))
    cnt = bin_counts(plan, 1, cnt_other.shape[1])[:, 0]
    return cnt, np.minimum(cnt, cnt_other).sum(1), cnt.max(1, initial=0)


def _shared_counts_kernel(plan, cnt_other):  # pragma: no cover (compiled)
    """:func:`shared_counts`, one row at a time."""
    num_layers, num_slots = plan.shape
    num_experts = cnt_other.shape[1]
    cnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    kept = np.zeros(num_layers, dtype=np.int64)
    most = np.zeros(num_layers, dtype=np.int64)
    for r in range(num_layers):
        for s in range(num_slots):
            cnt[r, plan[r, s]] += 1
        k, m = 0, 0
        for e in range(num_experts):
            c = cnt[r, e]
            k += min(c, cnt_other[r, e])
            m = max(m, c)
        kept[r], most[r] = k, m
    return cnt, kept, most


shared_counts_kernel = njit(cache=True, nogil=True)(_shared_counts_kernel) if njit is not None else None
