"""Migration-aware placement: keep experts where they are, and spend a move budget where it pays.

Every slot whose expert changes costs a weight transfer, so a new placement is judged by its
balance *and* by how many slots it changes relative to the current one (``old``).

* :func:`align` relabels a freshly solved placement (nodes, GPUs within nodes, slots within GPUs)
  to keep as many slots as possible, without changing any GPU's expert set, so its balance is
  exactly the same. Matching is a maximum-weight assignment (scipy's ``linear_sum_assignment``).
* :func:`incremental` starts from ``old`` and moves only what pays: first *relocations* that bring
  the replica counts to the fresh plan's (one slot each: a replica of an over-replicated expert
  is replaced by one of an under-replicated expert, on the GPU where that helps most), then swaps
  (two slots each) that lower every GPU above the fresh plan's peak, all under a per-layer budget.
* :func:`migrate` runs it per layer (or under a total budget, spent where it gains most per moved
  slot) and, given the fresh plan, takes that plan aligned wherever it dominates the incremental
  one: no higher peak with no more moved slots.

Its cost follows the slots that change: a layer already at the fresh plan is left before any
other work, relocations and swaps are compiled loops (numba; numpy code without it) whose work
is per move, and the fresh alternative is ruled out by a bound from sparse GPU overlaps before
any assignment solve (which then runs only on GPUs whose expert sets differ). What the call
reads off a plan (replica counts, peak, avoidable duplicates, the cap check) comes from one
compiled pass per plan, counted once and shared: :func:`~ray_eplb.solver.plan_stats.plan_stats`
for the old and the fresh plan, the goal swaps' last pass for the new one; with one slot per GPU
the goal swaps are skipped (no swap can lower a peak there). In the common case the whole call is
one compiled function that runs these kernels and makes the per-layer decisions in loops
(:mod:`~ray_eplb.solver.migrate_compiled`: the same plan, without the numpy glue between stages).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ray_eplb.solver.budgets import hull_spend
from ray_eplb.solver.incremental import incremental
from ray_eplb.solver.maps import bin_counts, checked_slot_counts
from ray_eplb.solver.migrate_compiled import Partial, migrate_compiled
from ray_eplb.solver.overlap import kept_upper_bound, match_gpus, sparse_overlap
from ray_eplb.solver.plan_stats import plan_stats, shared_counts


def moved_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``[L]`` slots whose expert differs between ``old`` and ``new`` (both ``[L, R]``)."""
    return (old != new).sum(1)


def _assign(score: np.ndarray) -> np.ndarray:
    """Max-weight perfect matching per problem: ``score [K, m, m]`` -> ``perm [K, m]``,
    ``perm[k, i]`` = the column given to row ``i``."""
    perm = np.empty(score.shape[:2], dtype=np.int64)
    for k in range(score.shape[0]):  # one small assignment problem each (scipy has no batch API)
        rows, cols = linear_sum_assignment(score[k], maximize=True)
        perm[k, rows] = cols
    return perm


def align(old: np.ndarray, new: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """Relabel ``new`` to keep as many of ``old``'s slots as possible; every GPU keeps its set.

    Per layer: nodes of ``new`` are matched to node positions (maximum total overlap with the
    experts ``old`` has there), then GPUs to GPU positions within each node, then within each GPU
    an expert that ``old`` already has there keeps its old slot. Whole nodes move together, so
    groups a hierarchical plan keeps on one node stay on one node; pass ``num_nodes=1`` to let
    GPUs move freely (a global plan).

    Shapes: ``old``, ``new`` ``[L, R]`` int64. Returns ``[L, R]`` int64.
    """
    num_layers, num_slots = new.shape
    gpus_node, slots = num_gpus // num_nodes, num_slots // num_gpus
    num_experts = int(max(old.max(initial=0), new.max(initial=0))) + 1
    rows = np.arange(num_layers)[:, None]
    blocks = new.reshape(num_layers, num_nodes, gpus_node * slots)
    if num_nodes > 1:
        # A node pair is worth the slots its best GPU matching keeps (not just the experts the
        # nodes share: those may sit on GPUs that cannot all be matched).
        # GPU overlaps from the sparse pairs (no dense GPUs x experts histograms, no BLAS call).
        layer, i, j, shared = sparse_overlap(old.reshape(num_layers, num_gpus, slots),
                                             new.reshape(num_layers, num_gpus, slots), num_experts)
        pair = np.zeros((num_layers, num_nodes, num_nodes, gpus_node, gpus_node), dtype=np.int64)
        pair[layer, i // gpus_node, j // gpus_node, i % gpus_node, j % gpus_node] = shared
        pair = pair.reshape(-1, gpus_node, gpus_node)  # [L*N*N, g, g] GPU overlaps per node pair
        perm = _assign(pair)  # [L*N*N, g]
        value = np.take_along_axis(pair, perm[:, :, None], 2)[..., 0].sum(1)  # [L*N*N]
        blocks = blocks[rows, _assign(value.reshape(num_layers, num_nodes, num_nodes))]  # [L, N, g*S]
    sub = blocks.reshape(num_layers * num_nodes, gpus_node * slots)  # node sub-problems
    old_sub = old.reshape(num_layers * num_nodes, gpus_node * slots)
    if gpus_node > 1:
        perm = match_gpus(old_sub.reshape(-1, gpus_node, slots), sub.reshape(-1, gpus_node, slots), num_experts)
        sub = sub.reshape(-1, gpus_node, slots)[np.arange(sub.shape[0])[:, None], perm]
    return keep_slots(old.reshape(-1, slots), sub.reshape(-1, slots)).reshape(num_layers, num_slots)


def keep_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per GPU (row), order ``new``'s experts so those also in ``old`` keep their slot.

    ``old``, ``new``: ``[G, S]``. Repeated experts are told apart by occurrence number.
    """
    num, slots = new.shape

    def keys(x: np.ndarray) -> np.ndarray:  # expert * S + how many times it appeared before
        same = (x[:, :, None] == x[:, None, :]) & np.tri(slots, k=-1, dtype=bool)
        return x * slots + same.sum(-1)

    eq = keys(old)[:, :, None] == keys(new)[:, None, :]  # [G, S, S]
    kept, used = eq.any(2), eq.any(1)  # old slot keeps its expert / new entry already placed
    free_slots = np.argsort(kept, axis=1, kind="stable")  # [G, S] slots to fill first
    spare = np.argsort(used, axis=1, kind="stable")  # [G, S] entries still to place first
    r = np.arange(num)[:, None]
    fill = np.arange(slots) < (~kept).sum(1, keepdims=True)  # [G, S] positions that take a spare
    out = old.copy()
    out[r, free_slots] = np.where(fill, new[r, spare], old[r, free_slots])
    return out


def peak_load(phy2log: np.ndarray, w: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]`` max GPU load of ``phy2log [L, R]`` under ``w [L, E]`` (loads split among replicas)."""
    num_layers, num_experts = w.shape
    flat = phy2log + (np.arange(num_layers) * num_experts)[:, None]
    cnt = bin_counts(phy2log, 1, num_experts)[:, 0]  # [L, E]
    per = (w / np.maximum(cnt, 1)).ravel()[flat]  # [L, R]
    return per.reshape(num_layers, num_gpus, -1).sum(-1).max(1)


def check_old(old, num_layers: int, num_replicas: int, num_experts: int, counts: bool = False):
    """Validate ``old_phy2log`` (a tensor or array ``[L, R]``) and return it as int64 numpy; with
    ``counts``, also its replicas per expert ``[L, E]`` int64 (counted by the check anyway)."""
    arr = old.detach().cpu().numpy() if hasattr(old, "detach") else np.asarray(old)
    if arr.shape != (num_layers, num_replicas):
        raise ValueError(f"old_phy2log has shape {tuple(arr.shape)}, expected ({num_layers}, {num_replicas})")
    cnt = checked_slot_counts(arr, num_experts) if np.issubdtype(arr.dtype, np.integer) else None  # [L, E]
    if arr.size and cnt is None:
        raise ValueError(f"old_phy2log must hold expert ids in [0, {num_experts}), got {arr.dtype} "
                         f"in [{arr.min()}, {arr.max()}]")
    arr = arr.astype(np.int64, copy=False)
    if num_layers and (cnt == 0).any():
        layer, expert = np.argwhere(cnt == 0)[0]
        raise ValueError(f"old_phy2log gives expert {expert} of layer {layer} no slot")
    if counts:
        return arr, bin_counts(arr, 1, num_experts)[:, 0] if cnt is None else cnt
    return arr


class FreshCandidate:
    """A from-scratch plan as each layer's alternative to the incremental one (see :func:`migrate`).

    It is relabelled by :func:`align` (GPUs move freely: the most slots kept) only in the layers
    where it could dominate, and only once: a layer whose fresh plan has a higher peak, stacks an
    expert beyond ``ceil(count / P)`` on a GPU (a hierarchical layer may), or must move more slots
    than the incremental plan (a lower bound from the replica counts, without the matching) is
    skipped. Shapes: ``old``, ``fresh`` ``[L, R]`` int64, ``w [L, E]`` float64.
    """

    def __init__(self, old: np.ndarray, fresh: np.ndarray, w: np.ndarray, num_gpus: int,
                 cnt_old: np.ndarray | None = None, known: tuple[np.ndarray, np.ndarray] | None = None):
        num_layers, num_experts = w.shape
        self.old, self.fresh, self.w, self.num_gpus = old, fresh, w, num_gpus
        # [L, E] replicas, [L] peak, [L] avoidable duplicates (alignment keeps every GPU's set: the
        # aligned plan's too), [L] no expert stacked beyond its cap.
        if cnt_old is None:
            cnt_old = bin_counts(old, 1, num_experts)[:, 0]
        if known is None:
            self.cnt, self.peak, self.dups, self.ok = plan_stats(fresh, w, num_gpus, dups=True, cap=True)
            kept = np.minimum(cnt_old, self.cnt).sum(1)
        else:
            # ``known``: ``(peak [L], spread [L] bool)`` from the solve, ``spread`` where a row's
            # replicas of an expert are on distinct GPUs by construction (a global solve's); such
            # a row without an expert on more than all GPUs has no duplicate, none beyond its cap.
            self.cnt, kept, most = shared_counts(fresh, cnt_old)  # [L, E], [L], [L] in one pass
            self.peak = known[0].astype(np.float64)  # (a copy: aligned rows' peaks are written here)
            self.dups = np.zeros(num_layers, dtype=np.int64)
            self.ok = np.ones(num_layers, dtype=bool)
            rows = np.nonzero(~known[1] | (most > num_gpus))[0]
            if rows.size:
                _, self.peak[rows], self.dups[rows], self.ok[rows] = plan_stats(
                    fresh[rows], w[rows], num_gpus, dups=True, cap=True)
        # [L] lower bound on its moved slots: an expert keeps at most min(old, new) replicas' slots
        # (``kept``: the sum of those minima).
        self.fewest = old.shape[1] - kept
        self.tight = np.zeros(num_layers, dtype=bool)  # [L] fewest from GPU overlaps already
        self.plan = None  # [L, R] aligned rows, allocated when a layer is first aligned
        self.moves = np.full(num_layers, old.shape[1] + 1)  # [L]
        self.done = np.zeros(num_layers, dtype=bool)

    @classmethod
    def planned(cls, old: np.ndarray, fresh: np.ndarray, w: np.ndarray, num_gpus: int, part: Partial):
        """The candidate with the statistics and bounds the compiled path computed (``part``, its
        rows those of ``old``), as :meth:`__init__` and a first :meth:`pick` leave them."""
        self = cls.__new__(cls)
        self.old, self.fresh, self.w, self.num_gpus = old, fresh, w, num_gpus
        self.cnt, self.peak, self.dups, self.ok = part.target, part.cand_peak, part.cand_dups, part.cand_ok
        self.fewest, self.tight, self.plan = part.fewest, part.tight, None
        self.moves, self.done = np.full(len(old), old.shape[1] + 1), np.zeros(len(old), dtype=bool)
        return self

    def pick(self, new: np.ndarray, peak: np.ndarray, moves: np.ndarray, dups: np.ndarray | None = None):
        """Per layer, the fresh plan where it dominates ``new [L, R]`` (its ``peak``, ``moves``
        ``[L]``): a peak no higher, no more moves, and better in one of the two (peaks equal
        within float rounding are a tie). Returns the chosen ``(plan, peak, moves, dups)``
        (``dups [L]``, avoidable duplicates, only when given for ``new``)."""
        # It moves at least `fewest` slots: it can dominate only with a lower peak at no more
        # moves, or an equal peak at fewer (else the alignment is skipped).
        lower, no_higher = self.peak < peak * (1 - 1e-9), self.peak <= peak * (1 + 1e-9)
        maybe = self.ok & ((lower & (self.fewest <= moves)) | (no_higher & (self.fewest < moves)))
        need = np.nonzero(maybe & ~self.tight)[0]
        if need.size:  # a tighter bound from sparse GPU overlaps before any assignment solve
            num_slots = self.old.shape[1]
            bins = (self.old.shape[0], self.num_gpus, num_slots // self.num_gpus)
            kept = kept_upper_bound(self.old.reshape(bins), self.fresh.reshape(bins), self.w.shape[1], need)
            self.fewest[need] = np.maximum(self.fewest[need], num_slots - kept)
            self.tight[need] = True
            maybe = self.ok & ((lower & (self.fewest <= moves)) | (no_higher & (self.fewest < moves)))
        rows = np.nonzero(maybe & ~self.done)[0]
        if rows.size:
            if self.plan is None:
                self.plan = self.old.copy()
            self.plan[rows] = align(self.old[rows], self.fresh[rows], 1, self.num_gpus)
            self.moves[rows] = moved_slots(self.old[rows], self.plan[rows])
            self.peak[rows] = plan_stats(self.plan[rows], self.w[rows], self.num_gpus, dups=False)[1]  # other sum order
            self.done[rows] = True
        lower = self.peak < peak * (1 - 1e-9)
        take = maybe & (self.moves <= moves) & (lower | (self.moves < moves))
        if not take.any():  # (a layer never aligned has moves above any plan's: it is never taken)
            return new, peak, moves, dups
        return (np.where(take[:, None], self.plan, new), np.where(take, self.peak, peak),
                np.where(take, self.moves, moves), None if dups is None else np.where(take, self.dups, dups))


def _keep_worth(old, new, peak, moves, dups, peak_old, dup_old, min_gain):
    """Per layer, ``new`` where its peak falls by more than ``min_gain`` of ``peak_old``, or where it
    sheds avoidable duplicates of ``old`` (``dups < dup_old``; ``dups`` ``None``: ``old`` has none),
    else ``old``: ``(plan [L, R], gain [L], moves [L])``. Removing an avoidable duplicate frees a
    slot: always worth it, whatever the hysteresis."""
    gain = peak_old - peak  # [L] absolute peak reduction
    worth = gain > min_gain * peak_old
    if dups is not None:
        worth |= dups < dup_old
    if worth.all():
        return new, gain, moves
    return np.where(worth[:, None], new, old), np.where(worth, gain, 0.0), np.where(worth, moves, 0)


def migrate(
    w: np.ndarray,
    old: np.ndarray,
    num_gpus: int,
    budget: np.ndarray,
    total: int | None,
    min_gain: float,
    method: str,
    fresh: np.ndarray | None = None,
    known: tuple[np.ndarray, np.ndarray] | None = None,
    cnt_old: np.ndarray | None = None,
) -> np.ndarray:
    """Incremental re-placement from ``old`` with per-layer ``budget [L]`` or a ``total`` budget.

    ``fresh`` (optional): a from-scratch plan for ``w``. It is relabelled by :func:`align` to keep
    what it can, and a layer takes it instead of the incremental plan where it dominates: a max
    GPU load on ``w`` no higher, no more moved slots, and better in one of the two. The
    incremental plan is a local search toward fixed replica counts and can stop above what a
    fresh solve reaches with as few moves (mixtral, 2 slots per GPU: 4 of 9 layer rebalances).
    Where the fresh plan's lower peak costs more moves it is not taken: on the traces of
    ``ray-eplb bench --migration`` that trade moved 4-6x the slots (e.g. dsv2lite 288: 64% vs
    11% per rebalance) for a predicted 0.1-3% lower peak that did not show on the next window.

    Given ``fresh``, a layer where nothing can pay is kept as it is without any planning: its
    ``old`` is ``fresh`` itself, or, with one slot per GPU,
    ``old`` has the fresh plan's replica counts (then the same peak). The fresh plan's counts are
    the relocations' target and its peak the swaps' goal (:func:`incremental`).

    A layer changes only if its max GPU load falls by more than ``min_gain`` (relative), or if it
    sheds avoidable duplicates of ``old`` (always done where the budget allows): else it keeps
    ``old`` (hysteresis). With a ``total``, each layer is also planned with budgets of 1, 2,
    4, ... slots (below what its unlimited plan moves), and the total is spent greedily on the
    steps between these plans with the most peak reduction per extra moved slot
    (:func:`~ray_eplb.solver.budgets.hull_spend`); the same total split evenly over the layers is the fallback.

    ``known`` (optional, with ``fresh``): ``(peak [L], spread [L] bool)`` from the solve that made
    ``fresh``: its max GPU load per layer, and the layers whose experts' replicas it put on
    distinct GPUs by construction (a global solve's), which are then not recounted for
    duplicates (:class:`FreshCandidate`). ``cnt_old`` (optional): ``old``'s replicas per expert
    when already counted (:func:`check_old` counts them).

    Shapes: ``w [L, E]`` float64, ``old [L, R]`` int64, ``fresh [L, R]`` int64, ``cnt_old [L, E]``
    int64. Returns ``[L, R]``.
    """
    num_layers, num_experts = w.shape
    one_slot = old.shape[1] == num_gpus
    if fresh is not None and known is not None and total is None and not one_slot:  # one compiled call
        cnt_old = bin_counts(old, 1, num_experts)[:, 0] if cnt_old is None else cnt_old
        planned = migrate_compiled(w, old, fresh, cnt_old, num_gpus, budget, known, min_gain)
        if isinstance(planned, Partial):  # a layer needs the fresh plan aligned: done here
            rows = np.nonzero(~planned.settled)[0]  # (settled layers keep old)
            part = Partial(*(a[rows] for a in planned))
            cand = FreshCandidate.planned(old[rows], fresh[rows], w[rows], num_gpus, part)
            new, peak, moves, dups = cand.pick(part.own.reshape(rows.size, -1), part.peak, part.moved,
                                               part.dups if part.dup_old.any() else None)
            planned = old.copy()
            planned[rows] = _keep_worth(old[rows], new, peak, moves, dups, part.peak_old, part.dup_old, min_gain)[0]
        if planned is not None:
            return planned
    if fresh is not None:
        # Cheap exit for layers where nothing can pay, before any other work: ``old`` is the
        # fresh plan itself, or (one slot per GPU: the peak is set by the replica counts alone)
        # ``old`` already has the fresh plan's counts. (Exiting wherever the peak is no higher
        # than fresh cost llama4 144 in ``bench --migration`` 0.17% next-window balance:
        # refining such a layer still pays there.)
        settled = (old == fresh).all(1)  # [L] (the fresh plan is the answer for its own layers)
        if one_slot and not settled.all():
            if cnt_old is None:
                cnt_old = bin_counts(old, 1, num_experts)[:, 0]
            settled |= (cnt_old == bin_counts(fresh, 1, num_experts)[:, 0]).all(1)
        if settled.any():
            out = old.copy()
            rows = np.nonzero(~settled)[0]
            if rows.size:
                out[rows] = migrate(w[rows], old[rows], num_gpus, budget[rows], total, min_gain, method, fresh[rows],
                                    None if known is None else (known[0][rows], known[1][rows]),
                                    None if cnt_old is None else cnt_old[rows])
            return out
    cnt_old, peak_old, dup_old, _ = plan_stats(old, w, num_gpus, dups=not one_slot, cnt=cnt_old)  # [L, E], [L], [L]
    if one_slot:
        dup_old = np.zeros(num_layers, dtype=np.int64)
    cand = None if fresh is None else FreshCandidate(old, fresh, w, num_gpus, cnt_old, known)
    goal = None if cand is None else cand.peak.copy()
    target = None if cand is None else cand.cnt
    count_dups = bool(dup_old.any())

    def plan(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        new, peak, moves, dups = incremental(w, old, num_gpus, b, method, goal=goal, target=target, cnt=cnt_old,
                                             old_dups=dup_old, report=True)
        if peak is None:  # (the compiled goal swaps report the peak, the moves and the duplicates)
            _, peak, dups, _ = plan_stats(new, w, num_gpus, dups=count_dups)
        if not count_dups:
            dups = None
        if moves is None:
            moves = moved_slots(old, new)
        if cand is not None:
            new, peak, moves, dups = cand.pick(new, peak, moves, dups)
        return _keep_worth(old, new, peak, moves, dups, peak_old, dup_old, min_gain)

    new, gain, moves = plan(budget)
    if total is None or moves.sum() <= total:
        return new
    # Plans: nothing, then budgets of 1, 2, 4, ... slots, then each layer's unlimited plan.
    levels = [(old, np.zeros_like(gain), np.zeros_like(moves))]
    b = 1
    while b < moves.max():
        levels.append(plan(np.minimum(moves, b)))
        b *= 2
    levels.append((new, gain, moves))
    gains = np.stack([lv[1] for lv in levels])  # [K, L] peak reduction of each plan
    moved = np.stack([lv[2] for lv in levels])  # [K, L] slots moved by each plan
    at = hull_spend(gains, moved, total)  # [L]
    layers = np.arange(num_layers)
    greedy = np.stack([lv[0] for lv in levels])[at, layers]  # [L, R]
    # The same total split evenly is the fallback: keep whichever lowers the summed peak more.
    even = plan(np.full(num_layers, total // max(num_layers, 1)))
    return greedy if gains[at, layers].sum() >= even[1].sum() else even[0]
