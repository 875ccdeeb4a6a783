"""Incremental re-placement: improve a current placement with as few slot changes as pay.

Used by :func:`ray_eplb.solver.migration.migrate`. Numpy, vectorised over layers; its loops run
over batches of relocations and refinement sweeps, so its cost follows the slots that change.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.counts import counts_np
from ray_eplb.solver.maps import avoidable_duplicates_np, bin_counts, per_slot, replica_shares
from ray_eplb.solver.packing import refine_swaps, refine_sweeps
from ray_eplb.solver.peaks import lower_peaks, peaks_kernel
from ray_eplb.solver.relocate import relocate_kernel
from ray_eplb.solver.repair import repair_kernel, separate_copies_batched

BATCHES = 8  # relocations of a layer are made in about this many rounds when there are many
GOAL_SWEEPS = 32
TABLE_LIMIT = 1 << 21  # largest [L, P, E] copies-per-GPU table kept (else copies are counted per GPU)


def incremental(
    w: np.ndarray,
    old: np.ndarray,
    num_gpus: int,
    budget: np.ndarray,
    method: str = "hybrid_tail",
    pairs: int | None = 4,
    sweeps: int | None = None,
    goal: np.ndarray | None = None,
    target: np.ndarray | None = None,
    cnt: np.ndarray | None = None,
    old_dups: np.ndarray | None = None,
    report: bool = False,
):
    """Improve ``old`` for load ``w`` by at most ``budget`` slot changes per layer.

    1. *Relocations* (one slot each) toward ``target`` (default: the water-filling counts of
       ``w``): the under-replicated expert with the highest per-replica load gains a replica in
       place of one of the over-replicated expert that loses least (lowest ``w / (c - 1)``), on
       the GPU holding the loser that ends up lightest (:func:`relocate`).
    2. *Duplicate repair*: avoidable duplicates still there (a foreign old plan's) are swapped
       apart, two slots each, where the layer's budget pays for the whole repair (the rule of
       :func:`~ray_eplb.solver.repair.separate_copies`, compiled where numba is installed: each
       layer counted, repaired and charged in one pass; else
       :func:`~ray_eplb.solver.repair.separate_copies_batched`).
    3. *Swaps* (two slots each) with what is left. Given a ``goal [L]`` (the peak a fresh solve
       reaches; :func:`~ray_eplb.solver.migration.migrate` passes it): swaps that lower the
       GPUs above it, heaviest first, until none is (:func:`~ray_eplb.solver.peaks.lower_peaks`;
       where the budget binds, the swap that brings a GPU to the goal at once is preferred).
       Without one, or without numba (that search is a sequential loop; its numpy sweeps cost
       10-25x a fresh solve at the production shapes):
       :func:`~ray_eplb.solver.packing.refine_swaps` with ``pairs`` GPU pairs per sweep and as
       many sweeps as a fresh solve uses (3 below 12 slots per GPU).

    Measured (scale benchmark, previous window's plan, synthetic load): 4 fixed pairs stopped at
    in-window 0.943 at the Kimi-K2-like shape (fresh 0.996), pairing every GPU reached 0.992 but
    moved 31% of the slots; the goal reaches the fresh plan's in-window balance with 21% moved,
    and within 0.3% of it under a 25% budget.

    Every expert keeps at least one replica, and no expert is put twice on a GPU.

    Shapes: ``w [L, E]`` float64, ``old [L, R]`` int64, ``budget [L]`` int64 (not modified),
    ``cnt [L, E]`` (optional, not modified): ``old``'s replicas per expert when already counted;
    ``old_dups [L]`` (optional): ``old``'s avoidable duplicates when already counted (a layer
    without any, where no expert has more replicas than GPUs before or after, has none after the
    relocations either, so it is not searched for them). Returns ``[L, R]`` int64; with ``report``,
    ``(plan [L, R], peak [L], moved [L], dups [L])``, where the compiled goal swaps ran (else
    ``None`` for all three): each layer's max GPU load, its slots that differ from ``old`` and its
    avoidable duplicates, as :func:`~ray_eplb.solver.plan_stats.plan_stats` and
    :func:`~ray_eplb.solver.migration.moved_slots` would give them.
    """
    num_layers, num_experts = w.shape
    num_slots = old.shape[1]
    slots = num_slots // num_gpus
    fix_first = 2 * budget < num_slots  # a tight budget: prefer swaps that bring a GPU to the goal at once
    budget = budget.astype(np.int64).copy()
    if sweeps is None:
        sweeps = refine_sweeps(slots)
    if pairs is None:  # every GPU paired, as in a fresh solve
        pairs = max(4, num_gpus // 2)
    own = old.reshape(num_layers, num_gpus, slots).copy()  # [L, P, S] expert per slot
    cnt = bin_counts(old, 1, num_experts)[:, 0] if cnt is None else cnt.copy()  # [L, E] current replicas
    if target is None:
        target = counts_np(w, num_slots, method)  # [L, E]
    # Layers where an avoidable duplicate may be left after the relocations: one in ``old``, or an
    # expert on more GPUs than there are (thinning it can leave a stack avoidable). A relocation
    # puts its gainer on a GPU without a copy unless the gainer outnumbers the GPUs.
    if old_dups is None:
        may_dup = np.arange(num_layers)
    elif max(cnt.max(initial=0), target.max(initial=0)) <= num_gpus:  # (the common case, in two reductions)
        may_dup = np.nonzero(old_dups > 0)[0]
    else:
        may_dup = np.nonzero((old_dups > 0) | (cnt.max(1) > num_gpus) | (target.max(1) > num_gpus))[0]
    relocate(w, own, cnt, target, budget)

    # Avoidable duplicates left (a foreign old plan's, or a thinned expert's) are swapped apart
    # before any balancing swap: each frees a slot. A layer whose repair does not fit its budget
    # keeps them.
    if slots == 1 or not may_dup.size:  # nothing can stack
        pass
    elif repair_kernel is not None:  # (counted, repaired and charged in one pass per layer)
        repair_kernel(own, w, cnt, may_dup, budget)
    elif (dup := may_dup[avoidable_duplicates_np(own[may_dup].reshape(may_dup.size, -1), num_gpus,
                                                 num_experts) > 0]).size:
        per, cap = replica_shares(w, cnt, num_gpus)  # [L, E] each (the compiled stages take w and cnt)
        fixed = separate_copies_batched(own[dup], per[dup], cap[dup])
        cost = (fixed != own[dup]).sum((1, 2))  # [D] slots each repair changes
        fits = cost <= budget[dup]
        own[dup[fits]] = fixed[fits]
        budget[dup[fits]] -= cost[fits]
    peak = moved = dups = None
    if goal is not None and slots == 1:
        pass  # one slot per GPU: a swap exchanges two GPUs' loads, no peak can fall (the peak is the counts')
    elif goal is not None and peaks_kernel is not None:  # (own is this call's copy: changed in place)
        own, peak, moved, dups = lower_peaks(own, w, cnt, goal, budget, GOAL_SWEEPS, old.reshape(own.shape), fix_first,
                                             report=True, in_place=True)
    else:
        own, _ = refine_swaps(own, *replica_shares(w, cnt, num_gpus), pairs=pairs, sweeps=sweeps, budget=budget)
    own = own.reshape(num_layers, num_slots)
    return (own, peak, moved, dups) if report else own


def relocate(w: np.ndarray, own: np.ndarray, cnt: np.ndarray, target: np.ndarray, budget: np.ndarray) -> None:
    """Relocations toward ``target``, in place on ``own [L, P, S]``, ``cnt [L, E]``, ``budget [L]``:
    the compiled kernel (:mod:`ray_eplb.solver.relocate`) where numba is installed, else
    :func:`_relocate` (the same rule; a layer with many to make takes them in rounds)."""
    if relocate_kernel is not None:
        relocate_kernel(w, own, cnt, target, budget)
    else:
        _relocate(w, own, cnt, target, budget)


def _slot_table(own: np.ndarray, cnt: np.ndarray, width: int) -> np.ndarray:
    """``[L, E, width]`` slots (flat in the layer) of each expert of ``own [L, P, S]``, ascending,
    ``-1`` padded; ``cnt [L, E]`` replicas per expert."""
    num_layers, num_experts = cnt.shape
    flat = own.reshape(num_layers, -1)
    order = np.argsort(flat, axis=1, kind="stable")  # [L, R] slots grouped by expert
    first = np.cumsum(cnt, 1) - cnt  # [L, E]
    rank = np.arange(flat.shape[1]) - np.take_along_axis(first, np.take_along_axis(flat, order, 1), 1)
    table = np.full((num_layers, num_experts, width), -1, dtype=np.int32)
    rows = np.arange(num_layers)[:, None]
    table[rows, np.take_along_axis(flat, order, 1), rank] = order
    return table


def _ranked(
    w: np.ndarray, cnt: np.ndarray, units: np.ndarray, k: int, gains: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the first ``k`` of the experts' gain (or loss) units in the order the
    one-at-a-time rule takes them (see :func:`_relocate`).

    ``w``, ``cnt``, ``units``: ``[n, E]`` (units: replicas each expert gains, or sheds). Returns
    ``expert [n, k]``, ``load [n, k]`` (a gainer's per-replica load once it has that replica),
    and ``valid [n, k]`` (rows with fewer units leave the rest invalid).
    """
    num_rows, num_experts = w.shape
    d = units.ravel()
    owner = np.repeat(np.arange(d.size), d)  # [U] flat (row, expert) of each unit
    t = np.arange(owner.size) - np.repeat(np.cumsum(d) - d, d)  # [U] index of the unit within its expert
    c = cnt.ravel()[owner]
    wo = w.ravel()[owner]
    row, expert = owner // num_experts, owner % num_experts
    if gains:
        q = wo / (c + t)
        order = np.lexsort((expert, -q, row))  # per row: largest quotient first, lowest expert on ties
    else:
        q = wo / np.maximum(c - 1 - t, 1)
        order = np.lexsort((expert, q, row))
    per_row = np.bincount(row, minlength=num_rows)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # rank within row
    keep = order[pos < k]
    slot = pos[pos < k]
    out = np.zeros((num_rows, k), dtype=np.int64)
    load = np.zeros((num_rows, k))
    valid = np.zeros((num_rows, k), dtype=bool)
    out[row[keep], slot] = expert[keep]
    load[row[keep], slot] = wo[keep] / (c[keep] + t[keep] + 1)
    valid[row[keep], slot] = True
    return out, load, valid


def _relocate(w: np.ndarray, own: np.ndarray, cnt: np.ndarray, target: np.ndarray, budget: np.ndarray) -> None:
    """Relocations toward ``target`` (see :func:`incremental`), in place on ``own [L, P, S]``,
    ``cnt [L, E]`` and ``budget [L]``. Only the layers still relocating, and only the GPUs that
    hold a loser, are computed on (a table of each expert's slots is kept up to date)."""
    num_layers, num_experts = w.shape
    _, num_gpus, slots = own.shape
    total = int(np.abs(target - cnt).sum(1).max(initial=0)) // 2
    if total == 0:
        return
    # One at a time unless a layer has many to make: in a round of k, later pairs see GPU loads
    # from the round's start. With one slot per GPU that changes nothing (every GPU of the loser
    # carries the same load), so rounds start at 16 there; else at 64 (at 17-64, dsv2lite 288 in
    # ``bench --migration`` lost 0.18% next-window balance with rounds).
    many = 2 * BATCHES if slots == 1 else 8 * BATCHES
    k = 1 if total <= many else min(-(-total // BATCHES), num_experts)
    width = int(max(cnt.max(), target.max()))
    table = _slot_table(own, cnt, width)  # [L, E, W]
    flat_own = own.reshape(num_layers, -1)  # a view: writes go to own
    # Copies per (layer, GPU, expert), where that table is small (not at 1024 GPUs x 384 experts).
    held = bin_counts(flat_own, num_gpus, num_experts) if own.size * num_experts // slots <= TABLE_LIMIT else None
    stuck = np.zeros(num_layers, dtype=bool)
    col = np.arange(k)
    for _ in range(total + 1):
        need = target - cnt  # [L, E]
        live = np.nonzero((need > 0).any(1) & (budget > 0) & ~stuck)[0]
        if not live.size:
            break
        c_, w_, o_ = cnt[live], w[live], own[live]  # the live layers only
        r = np.arange(live.size)[:, None]  # [n, 1]
        # The round's k (gainer, loser) pairs: what the one-at-a-time rule picks k times in a
        # row on running counts (the hottest gainer, which may come again; the cheapest loser).
        # Every unit a gainer still needs has a quotient w / (c + t), every unit a loser sheds
        # w / max(c - 1 - t, 1): the rule takes the gain quotients largest first, the loss
        # quotients smallest first, so one sort of each list per round gives all k pairs.
        left = target[live] - c_
        gain, joins, ok_g = _ranked(w_, c_, np.maximum(left, 0), k, gains=True)
        lose, _, ok_l = _ranked(w_, c_, np.maximum(-left, 0), k, gains=False)
        valid = ok_g & ok_l
        valid &= col < budget[live, None]
        per = w_ / c_  # [n, E] per-replica load now
        gpu_load = per_slot(per, o_).sum(-1)  # [n, P]
        # Candidates: the GPUs holding the loser (its slots from the table).
        reach = int(c_[r, lose].max())  # only as wide as this round's losers need
        cand_slot = table[live[:, None], lose, :reach]  # [n, k, W]
        real = cand_slot >= 0
        g = np.where(real, cand_slot, 0) // slots  # [n, k, W] candidate GPU
        if held is not None:  # copies per (GPU, expert) from the table
            lr = live[:, None, None]
            copies = np.where(real, held[lr, g, lose[..., None]], 0)  # [n, k, W] loser's copies there
            gain_here = held[lr, g, gain[..., None]]  # [n, k, W]
        else:
            on_g = o_[r[:, :, None], g]  # [n, k, W, S] experts on each candidate GPU
            copies = np.where(real, (on_g == lose[..., None, None]).sum(-1), 0)  # loser's copies there
            gain_here = (on_g == gain[..., None, None]).sum(-1)  # [n, k, W]
        # A gainer joins a GPU among those holding the fewest of its replicas (none, unless it
        # outnumbers the GPUs): no avoidable duplicate.
        fewest = np.zeros(gain.shape, dtype=np.int64)  # [n, k]
        wide = np.nonzero(c_[r, gain] >= num_gpus)
        if wide[0].size and held is not None:
            fewest[wide] = held[live[wide[0]], :, gain[wide]].min(1)
        elif wide[0].size:  # rare: count it on every GPU
            fewest[wide] = (o_[wide[0]] == gain[wide][:, None, None]).sum(-1).min(1)
        ok = real & (copies > 0) & (gain_here <= fewest[..., None])
        # Thin a GPU where the loser is stacked first (that frees a wasted slot), then the one
        # that ends up lightest.
        ok &= copies == np.where(ok, copies, 0).max(-1, keepdims=True)
        after = gpu_load[r[:, :, None], g] - per[r, lose][..., None] + joins[..., None]
        taken = np.zeros(gpu_load.shape, dtype=bool)  # [n, P] GPUs changed this round
        done = np.zeros(live.size, dtype=bool)
        for j in range(k):
            ok_j = ok[:, j] & ~taken[r, g[:, j]]  # [n, W]
            pick = np.where(ok_j, after[:, j], np.inf).argmin(1)  # [n] chosen candidate
            rr = r[:, 0]
            go = np.nonzero(valid[:, j] & ok_j[rr, pick] & np.isfinite(after[rr, j, pick]))[0]
            if not go.size:
                continue
            layer, x, y = live[go], gain[go, j], lose[go, j]
            gpu = g[go, j, pick[go]]
            slot = gpu * slots + (own[layer, gpu] == y[:, None]).argmax(1)  # first slot of the loser there
            flat_own[layer, slot] = x
            # The table: the slot leaves y's list (the last entry fills its place), joins x's.
            pos = (table[layer, y] == slot[:, None]).argmax(1)
            last = cnt[layer, y] - 1
            table[layer, y, pos] = table[layer, y, last]
            table[layer, y, last] = -1
            table[layer, x, cnt[layer, x]] = slot
            cnt[layer, y] -= 1
            cnt[layer, x] += 1
            if held is not None:
                held[layer, gpu, y] -= 1
                held[layer, gpu, x] += 1
            budget[layer] -= 1
            taken[go, gpu] = True
            done[go] = True
        stuck[live[~done]] = True
