"""The migration-aware planner's common path in one compiled call.

:func:`~ray_eplb.solver.migration.migrate` reads the old and the fresh plan's statistics, runs the
relocations, the duplicate repair and the goal swaps, and decides per layer between the
incremental plan, the aligned fresh plan and the old plan. Each stage is a compiled kernel, but
between them the numpy code ran about a hundred small array operations per call (masks, copies,
reductions over ``[L]`` and ``[L, E]`` arrays), 8% of a migration-aware call at the Qwen3-like
scale shape. :func:`migrate_compiled` calls the same kernels in the same order from one compiled
function and makes those decisions in scalar loops, so it gives exactly the plan of the numpy
path. It covers the common case: a fresh plan from the solve with its peaks (``known``), a
per-layer budget, more than one slot per GPU, at most 256 GPUs (the compiled kept-slots bound's
range). Where the fresh plan may still dominate a layer after the kept-slots bound, that layer
needs :func:`~ray_eplb.solver.migration.align` (scipy's assignment solver): it returns what it
planned (:class:`Partial`) and the numpy code aligns those layers and decides (measured: no call of
``ray-eplb bench --scale`` needed it; in ``ray-eplb bench --migration``, mixtral's layers do).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ray_eplb.solver.jit import njit

if njit is not None:
    from ray_eplb.solver.overlap import kept_kernel
    from ray_eplb.solver.peaks import LIGHT, peaks_kernel
    from ray_eplb.solver.plan_stats import plan_stats_kernel, shared_counts_kernel
    from ray_eplb.solver.relocate import relocate_kernel
    from ray_eplb.solver.repair import repair_kernel
else:  # pragma: no cover
    LIGHT = 0

MAX_GPUS = 256  # the compiled kept-slots bound's range (ray_eplb.solver.overlap.kept_upper_bound)


class Partial(NamedTuple):
    """What :func:`migrate_compiled` planned before a layer turned out to need the fresh plan
    aligned, for :func:`~ray_eplb.solver.migration.migrate` to finish (all ``[L]`` unless noted):
    the incremental plan ``own [L, P, S]``, its ``peak``, ``moved`` slots and avoidable ``dups``;
    the old plan's ``peak_old`` and ``dup_old``; the fresh plan's counts ``target [L, E]``,
    ``cand_peak``, ``cand_dups``, ``cand_ok`` (within its caps), ``fewest`` (its moved slots'
    lower bound) and ``tight`` (that bound from GPU overlaps already); ``settled`` (the old plan is
    the fresh plan: kept)."""

    own: np.ndarray
    peak: np.ndarray
    moved: np.ndarray
    dups: np.ndarray
    peak_old: np.ndarray
    dup_old: np.ndarray
    target: np.ndarray
    cand_peak: np.ndarray
    cand_dups: np.ndarray
    cand_ok: np.ndarray
    fewest: np.ndarray
    tight: np.ndarray
    settled: np.ndarray


def migrate_compiled(w: np.ndarray, old: np.ndarray, fresh: np.ndarray, cnt_old: np.ndarray, num_gpus: int,
                     budget: np.ndarray, known: tuple[np.ndarray, np.ndarray],
                     min_gain: float) -> np.ndarray | Partial | None:
    """:func:`~ray_eplb.solver.migration.migrate`'s plan ``[L, R]`` int64 for a per-layer
    ``budget [L]`` (not modified) and a fresh plan with ``known = (peak [L], spread [L] bool)``;
    a :class:`Partial` where a layer needs the fresh plan aligned; ``None`` where numba is missing
    or the shape is outside the common case (see the module docstring). Shapes: ``w [L, E]``
    float64, ``old``, ``fresh`` ``[L, R]`` int64, ``cnt_old [L, E]`` int64 (``old``'s replicas per
    expert)."""
    num_layers, num_slots = old.shape
    if _kernel is None or num_slots <= num_gpus or num_gpus > MAX_GPUS or not num_layers:
        return None
    out, done, *rest = _kernel(
        np.ascontiguousarray(w, dtype=np.float64), np.ascontiguousarray(old, dtype=np.int64),
        np.ascontiguousarray(fresh, dtype=np.int64), np.ascontiguousarray(cnt_old, dtype=np.int64), num_gpus,
        np.ascontiguousarray(budget, dtype=np.int64), np.ascontiguousarray(known[0], dtype=np.float64),
        np.ascontiguousarray(known[1], dtype=np.bool_), float(min_gain), LIGHT)
    return out if done else Partial(*rest)


def _migrate_kernel(w, old, fresh, cnt_old, num_gpus, budget_in, fresh_peak, spread, min_gain,
                    light):  # pragma: no cover (compiled)
    """See :func:`migrate_compiled`: ``(plan [L, R], True, ...)``, or ``(old, False, *Partial)``
    where a layer needs the fresh plan aligned. Each step names the numpy code it stands for."""
    num_layers, num_slots = old.shape
    num_experts = w.shape[1]
    slots = num_slots // num_gpus
    out = old.copy()
    # migrate: a layer whose old plan is the fresh plan itself is left as it is.
    settled = np.zeros(num_layers, dtype=np.bool_)
    open_rows = 0
    for r in range(num_layers):
        same = True
        for s in range(num_slots):
            if old[r, s] != fresh[r, s]:
                same = False
                break
        settled[r] = same
        open_rows += not same
    if open_rows == 0:  # (the rest: empty, unread)
        none_f, none_i, none_b = np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.bool_)
        return (out, True, np.empty((0, 0, 0), dtype=np.int64), none_f, none_i, none_i, none_f, none_i,
                np.empty((0, 0), dtype=np.int64), none_f, none_i, none_b, none_i, none_b, settled)
    # migrate: the old plan's statistics; FreshCandidate: the fresh plan's counts, the shared-slot
    # bound and the layers whose fresh statistics are not known from the solve.
    peak_old, dup_old, _ = plan_stats_kernel(old, w, num_gpus, cnt_old, True, False)
    target, kept, most = shared_counts_kernel(fresh, cnt_old)
    cand_peak = fresh_peak.copy()
    cand_dups = np.zeros(num_layers, dtype=np.int64)
    cand_ok = np.ones(num_layers, dtype=np.bool_)
    special = np.zeros(num_layers, dtype=np.bool_)
    for r in range(num_layers):
        special[r] = (not spread[r]) or most[r] > num_gpus
    if special.any():
        rows = np.nonzero(special)[0]
        p, d, o = plan_stats_kernel(fresh[rows], w[rows], num_gpus, target[rows], True, True)
        for i in range(rows.size):
            cand_peak[rows[i]], cand_dups[rows[i]], cand_ok[rows[i]] = p[i], d[i], o[i]
    # incremental: relocations toward the fresh counts, the duplicate repair, the goal swaps.
    # (A settled layer gets no budget: nothing changes in it, and its result is not used.)
    # A layer may hold an avoidable duplicate after the relocations if the old plan has one, or if
    # an expert has more replicas than GPUs before or after them.
    fix_first = np.empty(num_layers, dtype=np.bool_)
    budget = budget_in.copy()
    may_dup = np.zeros(num_layers, dtype=np.bool_)
    for r in range(num_layers):
        fix_first[r] = 2 * budget_in[r] < num_slots
        if settled[r]:
            budget[r] = 0
            continue
        top = 0
        for e in range(num_experts):
            top = max(top, cnt_old[r, e])
        may_dup[r] = dup_old[r] > 0 or top > num_gpus or most[r] > num_gpus
    own = old.copy().reshape(num_layers, num_gpus, slots)
    cnt = cnt_old.copy()
    relocate_kernel(w, own, cnt, target, budget)
    if may_dup.any():
        repair_kernel(own, w, cnt, np.nonzero(may_dup)[0], budget)
    limit = cand_peak * (1 + 1e-9) + 1e-12
    peak = np.empty(num_layers)
    moved = np.empty(num_layers, dtype=np.int64)
    dups = np.empty(num_layers, dtype=np.int64)
    peaks_kernel(own, w, cnt, old.reshape(num_layers, num_gpus, slots), limit, budget, light, fix_first, peak, moved,
                 dups)
    # FreshCandidate.pick: the layers where the fresh plan may dominate (a peak no higher and no
    # more moves, better in one), first by the count bound, then by the kept-slots bound.
    fewest = num_slots - kept
    tight = np.zeros(num_layers, dtype=np.bool_)
    done = True
    need = np.zeros(num_layers, dtype=np.bool_)
    for r in range(num_layers):
        need[r] = (not settled[r]) and _maybe(cand_ok[r], cand_peak[r], peak[r], fewest[r], moved[r])
    if need.any():
        rows = np.nonzero(need)[0]
        bins = (num_layers, num_gpus, slots)
        bound = kept_kernel(old.reshape(bins), fresh.reshape(bins), num_experts, rows)
        for i in range(rows.size):
            r = rows[i]
            fewest[r] = max(fewest[r], num_slots - bound[i])
            tight[r] = True
            # The fresh plan must be aligned to be compared: the numpy code does it.
            done = done and not _maybe(cand_ok[r], cand_peak[r], peak[r], fewest[r], moved[r])
    if not done:
        return (out, False, own, peak, moved, dups, peak_old, dup_old, target, cand_peak, cand_dups, cand_ok, fewest,
                tight, settled)
    # migrate: a layer takes its new plan where its peak falls by more than min_gain, or where it
    # sheds avoidable duplicates of the old plan (the numpy path compares only where the old plan
    # has any: the same, as a plan has none below zero); else it keeps the old plan.
    for r in range(num_layers):
        if settled[r]:
            continue
        worth = peak_old[r] - peak[r] > min_gain * peak_old[r] or dups[r] < dup_old[r]
        if worth:
            for g in range(num_gpus):
                for s in range(slots):
                    out[r, g * slots + s] = own[r, g, s]
    return (out, True, own, peak, moved, dups, peak_old, dup_old, target, cand_peak, cand_dups, cand_ok, fewest, tight,
            settled)


def _maybe(ok, cand_peak, peak, fewest, moves):  # pragma: no cover (compiled, inlined)
    """Whether the fresh plan may still dominate a layer (see
    :meth:`~ray_eplb.solver.migration.FreshCandidate.pick`): within its caps, and a lower peak at no
    more moves than its lower bound, or a peak no higher at fewer."""
    lower = cand_peak < peak * (1 - 1e-9)
    no_higher = cand_peak <= peak * (1 + 1e-9)
    return ok and ((lower and fewest <= moves) or (no_higher and fewest < moves))


if njit is not None:
    _maybe = njit(cache=True, nogil=True, inline="always")(_maybe)
_kernel = njit(cache=True, nogil=True)(_migrate_kernel) if njit is not None else None
