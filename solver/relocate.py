"""Relocations in one batch: bring a deployed plan's replica counts to new ones, one slot each.

A relocation replaces one replica of an over-replicated expert (a *loser*) by one of an
under-replicated expert (a *gainer*). :func:`relocate` makes all of a layer's relocations at once:

1. which units move (within the budget): the gainers' units largest per-replica load first,
   ``w / (c + t)`` for the ``t``-th replica an expert gains; the losers' units cheapest first,
   ``w / (c - 1 - t)`` (:func:`ranked_units`);
2. which slot each loser gives up: a stacked copy first (an expert twice on a GPU), then the
   copy on the heaviest GPU;
3. where each gainer goes: the freed slots, lightest GPU first, the heaviest gainer units first
   (a longest-processing-time deal, one batch), never onto a GPU that already holds it; the few
   units such a deal would double up are placed one at a time.

Its cost is a few sorts of the slots that change, not a pass per relocation.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.peaks import njit


def ranked_units(
    w: np.ndarray, cnt: np.ndarray, units: np.ndarray, k: int, gains: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the first ``k`` of the experts' gain (or loss) units in the order above.

    ``w``, ``cnt``, ``units``: ``[n, E]`` (units: replicas each expert gains, or sheds). Returns
    ``expert [n, k]``, ``index [n, k]`` (the unit's ``t`` within its expert) and ``valid [n, k]``
    (rows with fewer units leave the rest invalid). Ties go to the lower expert id.
    """
    num_rows, num_experts = w.shape
    d = units.ravel()
    owner = np.repeat(np.arange(d.size), d)  # [U] flat (row, expert) of each unit
    t = np.arange(owner.size) - np.repeat(np.cumsum(d) - d, d)  # [U] index of the unit within its expert
    c = cnt.ravel()[owner]
    wo = w.ravel()[owner]
    row, expert = owner // num_experts, owner % num_experts
    if gains:
        order = np.lexsort((expert, -(wo / (c + t)), row))  # per row: largest quotient first
    else:
        order = np.lexsort((expert, wo / np.maximum(c - 1 - t, 1), row))  # smallest first
    per_row = np.bincount(row, minlength=num_rows)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # rank within row
    keep = order[pos < k]
    at = pos[pos < k]
    out = np.zeros((num_rows, k), dtype=np.int64)
    index = np.zeros((num_rows, k), dtype=np.int64)
    valid = np.zeros((num_rows, k), dtype=bool)
    out[row[keep], at], index[row[keep], at], valid[row[keep], at] = expert[keep], t[keep], True
    return out, index, valid


def relocate(w: np.ndarray, own: np.ndarray, cnt: np.ndarray, target: np.ndarray, budget: np.ndarray) -> None:
    """Relocations toward ``target`` (see the module docstring), in place on ``own [L, P, S]``,
    ``cnt [L, E]`` and ``budget [L]`` (one per relocation); ``w [L, E]`` float64."""
    if relocate_kernel is not None:
        relocate_kernel(w, own, cnt, target, budget)
        return
    num_layers, num_experts = w.shape
    _, num_gpus, slots = own.shape
    surplus = np.maximum(cnt - target, 0)  # [L, E] replicas each loser sheds
    moves = np.minimum(surplus.sum(1), np.maximum(budget, 0))  # [L]
    k = int(moves.max(initial=0))
    if k == 0:
        return
    col = np.arange(k)
    gain, _, ok_g = ranked_units(w, cnt, np.maximum(target - cnt, 0), k, gains=True)
    lose, t_lose, ok_l = ranked_units(w, cnt, surplus, k, gains=False)
    valid = ok_g & ok_l & (col < moves[:, None])  # [L, k]
    n_move = valid.sum(1)
    rows = np.nonzero(n_move)[0]
    if not rows.size:
        return
    flat = own.reshape(num_layers, -1)  # a view: writes go to own
    old_flat = flat.copy()
    per_old = w / cnt  # [L, E]
    new_cnt = cnt.copy()
    r_v, j_v = np.nonzero(valid)
    np.add.at(new_cnt, (r_v, gain[r_v, j_v]), 1)
    np.subtract.at(new_cnt, (r_v, lose[r_v, j_v]), 1)
    # 2. The slots the losers give up: the losers' slots sorted by (layer, expert, stacked first,
    # heaviest GPU first); the t-th unit of loser y takes the t-th of y's slots.
    gpu_load = per_old[np.arange(num_layers)[:, None, None], own].sum(-1)  # [L, P]
    is_loser = surplus > 0
    sl_r, sl_s = np.nonzero(is_loser[np.arange(num_layers)[:, None], flat])  # the losers' slots
    sl_e = flat[sl_r, sl_s]
    sl_g = sl_s // slots
    if slots > 1:  # a copy after the first of its expert on its GPU
        stacked = own[sl_r, sl_g] == sl_e[:, None]  # [M, S]
        stacked = (stacked & (np.arange(slots) < (sl_s % slots)[:, None])).any(1)
    else:
        stacked = np.zeros(sl_r.size, dtype=bool)
    order = np.lexsort((-gpu_load[sl_r, sl_g], ~stacked, sl_e, sl_r))
    key = (sl_r * num_experts + sl_e)[order]  # sorted
    unit_key = r_v * num_experts + lose[r_v, j_v]
    freed = sl_s[order][np.searchsorted(key, unit_key) + t_lose[r_v, j_v]]  # [V] flat slot in its layer
    flat[r_v, freed] = -1
    # 3. The freed slots, lightest GPU first (a GPU's second free slot counts one gainer later),
    # take the gainers' units, heaviest first.
    per_new = w / new_cnt
    layer_of = np.arange(num_layers)[:, None, None]
    load = np.where(own >= 0, per_new[layer_of, np.maximum(own, 0)], 0.0).sum(-1)  # [L, P]
    x = gain[r_v, j_v]
    unit_load = per_new[r_v, x]
    mean_unit = np.bincount(r_v, weights=unit_load, minlength=num_layers) / np.maximum(n_move, 1)
    g_free = freed // slots
    # rank of a freed slot among its GPU's freed slots
    o = np.lexsort((freed, g_free, r_v))
    grp = r_v[o] * num_gpus + g_free[o]
    start = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
    rank = np.empty(o.size, dtype=np.int64)
    rank[o] = np.arange(o.size) - np.repeat(start, np.diff(np.r_[start, o.size]))
    slot_key = load[r_v, g_free] + rank * mean_unit[r_v]
    slot_order = np.lexsort((slot_key, r_v))  # per layer, the freed slots lightest first
    unit_order = np.lexsort((-unit_load, r_v))  # per layer, the units heaviest first
    dest = freed[slot_order]  # the i-th unit of a layer (by load) takes its i-th freed slot
    ux = x[unit_order]
    ur = r_v[unit_order]
    dg = dest // slots
    # A unit may not join a GPU that already holds its expert, nor one another unit of it joins.
    if slots > 1:
        # (an expert on every GPU already may join one holding the fewest copies of it)
        there = (own[ur, dg] == ux[:, None]).sum(1)
        wide = np.nonzero(new_cnt[ur, ux] > num_gpus)[0]
        least = np.zeros(ur.size, dtype=np.int64)
        if wide.size:
            least[wide] = (own[ur[wide]] == ux[wide][:, None, None]).sum(-1).min(1)
        there = there > least
        pair = (ur * num_gpus + dg) * num_experts + ux
        srt = np.sort(pair)
        repeated = np.zeros(pair.size, dtype=bool)
        dup_keys = srt[1:][srt[1:] == srt[:-1]]
        if dup_keys.size:
            first = np.unique(pair, return_index=True)[1]
            repeated = np.isin(pair, dup_keys)
            repeated[first] = False
        clash = there | repeated
    else:
        clash = np.zeros(ur.size, dtype=bool)
    fine = ~clash
    flat[ur[fine], dest[fine]] = ux[fine]
    placed = np.nonzero(fine)[0]
    for i in np.nonzero(clash)[0]:  # few: each to the lightest free GPU without its expert, else trade
        layer, e = ur[i], ux[i]
        mine = own[layer]  # [P, S] a view
        free = (mine < 0).any(1)  # [P]
        lay_load = np.where(mine >= 0, per_new[layer, np.maximum(mine, 0)], 0.0).sum(1)
        copies = (mine == e).sum(1)
        clean = free & (copies == copies.min())
        if clean.any():
            g = int(np.argmin(np.where(clean, lay_load, np.inf)))
            own[layer, g, int(np.argmax(mine[g] < 0))] = e
            continue
        # No free GPU may take e: trade places with a unit placed in this batch (e to its GPU, it
        # to the free one) where that spreads both experts; else the slot keeps its old expert.
        g = int(np.argmax(free))
        s = int(np.argmax(mine[g] < 0))
        mates = placed[ur[placed] == layer]
        d_g = dest[mates] // slots
        y = ux[mates]
        ok = ((mine[d_g] == e).sum(1) < copies[g]) & ((mine[g][None, :] == y[:, None]).sum(1)
                                                      < (mine[d_g] == y[:, None]).sum(1))
        if ok.any():
            j = mates[np.argmax(ok)]
            own[layer, g, s] = ux[j]
            flat[layer, dest[j]] = e
        else:
            back = old_flat[layer, g * slots + s]
            own[layer, g, s] = back
            new_cnt[layer, back] += 1
            new_cnt[layer, e] -= 1
            n_move[layer] -= 1
    cnt[:] = new_cnt
    budget -= n_move


def _relocate_kernel(w, own, cnt, target, budget):  # pragma: no cover (compiled)
    """:func:`relocate`'s three steps one layer at a time, the deal a true longest-processing-time
    one (each gainer unit, heaviest first, to the lightest GPU with a freed slot that may take
    it). Same arguments, in place; ``own [L, P, S]`` int64."""
    num_layers, num_gpus, slots = own.shape
    num_experts = w.shape[1]
    gain_of = np.zeros(num_experts, dtype=np.int64)
    lose_of = np.zeros(num_experts, dtype=np.int64)
    for r in range(num_layers):
        surplus = 0
        for e in range(num_experts):
            if cnt[r, e] > target[r, e]:
                surplus += cnt[r, e] - target[r, e]
        k = min(surplus, max(budget[r], 0))
        if k == 0:
            continue
        # 1. the units, one at a time: the hottest gainer, the cheapest loser
        for e in range(num_experts):
            gain_of[e] = 0
            lose_of[e] = 0
        for _ in range(k):
            bg, bq = -1, -1.0
            bl, lq = -1, np.inf
            for e in range(num_experts):
                if target[r, e] > cnt[r, e] + gain_of[e]:
                    q = w[r, e] / (cnt[r, e] + gain_of[e])
                    if q > bq:
                        bg, bq = e, q
                if cnt[r, e] - lose_of[e] > target[r, e]:
                    q = w[r, e] / max(cnt[r, e] - 1 - lose_of[e], 1)
                    if q < lq:
                        bl, lq = e, q
            if bg < 0 or bl < 0:
                break
            gain_of[bg] += 1
            lose_of[bl] += 1
        # 2. free the losers' slots: a copy beyond the first on its GPU first, then the heaviest GPU
        load = np.zeros(num_gpus)
        for g in range(num_gpus):
            for s in range(slots):
                e = own[r, g, s]
                load[g] += w[r, e] / cnt[r, e]
        freed = np.empty(k, dtype=np.int64)
        was = np.empty(k, dtype=np.int64)
        n_free = 0
        for e in range(num_experts):
            for _ in range(lose_of[e]):
                best, best_key, best_load = -1, 2, -1.0
                for g in range(num_gpus):
                    seen = 0
                    for s in range(slots):
                        if own[r, g, s] == e:
                            key = 0 if seen > 0 else 1
                            seen += 1
                            if key < best_key or (key == best_key and load[g] > best_load):
                                best, best_key, best_load = g * slots + s, key, load[g]
                g, s = best // slots, best % slots
                own[r, g, s] = -1
                freed[n_free] = best
                was[n_free] = e
                n_free += 1
        for e in range(num_experts):
            cnt[r, e] += gain_of[e] - lose_of[e]
        for g in range(num_gpus):
            load[g] = 0.0
            for s in range(slots):
                e = own[r, g, s]
                if e >= 0:
                    load[g] += w[r, e] / cnt[r, e]
        # 3. the deal: gainer units by their new per-replica load, heaviest first (lowest id on ties)
        moved = 0
        for _ in range(n_free):
            x, xq = -1, -1.0
            for e in range(num_experts):
                if gain_of[e] > 0 and w[r, e] / cnt[r, e] > xq:
                    x, xq = e, w[r, e] / cnt[r, e]
            gain_of[x] -= 1
            least = 0
            if cnt[r, x] > num_gpus:  # on every GPU already: the GPUs with its fewest copies
                least = slots + 1
                for g in range(num_gpus):
                    c = 0
                    for s in range(slots):
                        c += own[r, g, s] == x
                    least = min(least, c)
            pick, pick_load = -1, np.inf
            for i in range(n_free):
                if freed[i] < 0:
                    continue
                g = freed[i] // slots
                c = 0
                for s in range(slots):
                    c += own[r, g, s] == x
                if c <= least and load[g] < pick_load:
                    pick, pick_load = i, load[g]
            if pick < 0:  # no freed slot may take it: the lightest keeps its old expert
                for i in range(n_free):
                    if freed[i] >= 0 and load[freed[i] // slots] < pick_load:
                        pick, pick_load = i, load[freed[i] // slots]
                own[r, freed[pick] // slots, freed[pick] % slots] = was[pick]
                cnt[r, was[pick]] += 1
                cnt[r, x] -= 1
            else:
                own[r, freed[pick] // slots, freed[pick] % slots] = x
                moved += 1
            g = freed[pick] // slots
            load[g] += w[r, own[r, g, freed[pick] % slots]] / cnt[r, own[r, g, freed[pick] % slots]]
            freed[pick] = -1
        budget[r] -= moved


relocate_kernel = njit(cache=True, nogil=True)(_relocate_kernel) if njit is not None else None
