"""Relocations, compiled: bring a deployed plan's replica counts to new ones, one slot each.

A relocation replaces one replica of an over-replicated expert (a *loser*) by one of an
under-replicated expert (a *gainer*). The rule is :func:`ray_eplb.solver.incremental.incremental`'s
(one at a time on running counts: the gainer with the highest per-replica load, the loser that
loses least, on the GPU holding the loser that ends up lightest); its numpy code there makes many
relocations of a layer in rounds, this kernel makes them one at a time in microseconds.

:func:`_deal_kernel` instead frees the losers' copies on the heaviest GPUs and deals the gainers
onto the freed slots, lightest GPU first: it rebalances while it relocates. Measured: on the trace
chains of ``ray-eplb bench --migration`` (the current plan's peak within 1-3% of a fresh plan's)
it cost 0.6-0.9% next-window balance on dsv2lite 288 at every budget; on loads that shifted far
(the scale benchmark's Kimi-like shape on a tiled trace, peak 1.3x a fresh plan's) a 25% budget
reaches in-window 0.995 with it and 0.991 without (fresh 0.997). So the migration-aware planner
deals only in layers whose peak is more than ``SHIFTED`` above the goal.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.peaks import njit


def _relocate_kernel(w, own, cnt, target, budget):  # pragma: no cover (compiled)
    """Relocations one at a time (the rule of :func:`ray_eplb.solver.incremental.incremental`):
    the hottest gainer takes the slot of the cheapest loser, on a GPU that holds the loser
    (stacked there first), that holds the fewest copies of the gainer, and that ends up
    lightest. A layer stops at its budget, at its target, or when no GPU may take the pair.
    Same arguments as :func:`relocate`, in place; ``own [L, P, S]`` int64."""
    num_layers, num_gpus, slots = own.shape
    num_experts = w.shape[1]
    load = np.zeros(num_gpus)
    for r in range(num_layers):
        surplus = 0
        for e in range(num_experts):
            if cnt[r, e] > target[r, e]:
                surplus += cnt[r, e] - target[r, e]
        k = min(surplus, max(budget[r], 0))
        if k == 0:
            continue
        for g in range(num_gpus):
            load[g] = 0.0
            for s in range(slots):
                e = own[r, g, s]
                load[g] += w[r, e] / cnt[r, e]
        for _ in range(k):
            x, xq, y, yq = -1, -1.0, -1, np.inf
            for e in range(num_experts):
                if target[r, e] > cnt[r, e]:
                    q = w[r, e] / cnt[r, e]
                    if q > xq:
                        x, xq = e, q
                if cnt[r, e] > target[r, e]:
                    q = w[r, e] / max(cnt[r, e] - 1, 1)
                    if q < yq:
                        y, yq = e, q
            if x < 0 or y < 0:
                break
            least = 0
            if cnt[r, x] >= num_gpus:  # the gainer is on every GPU: those with its fewest copies
                least = slots + 1
                for g in range(num_gpus):
                    c = 0
                    for s in range(slots):
                        c += own[r, g, s] == x
                    least = min(least, c)
            per_y, joins = w[r, y] / cnt[r, y], w[r, x] / (cnt[r, x] + 1)
            best, best_copies, best_after = -1, 0, np.inf
            for g in range(num_gpus):
                cy, cx = 0, 0
                for s in range(slots):
                    cy += own[r, g, s] == y
                    cx += own[r, g, s] == x
                if cy == 0 or cx > least:
                    continue
                after = load[g] - per_y + joins
                if cy > best_copies or (cy == best_copies and after < best_after):
                    best, best_copies, best_after = g, cy, after
            if best < 0:
                break  # no GPU may take this pair: the layer stops relocating
            for s in range(slots):
                if own[r, best, s] == y:
                    own[r, best, s] = x
                    break
            budget[r] -= 1
            # Loads: every replica of x and y changes its share.
            old_x, old_y = w[r, x] / cnt[r, x], per_y
            cnt[r, x] += 1
            cnt[r, y] -= 1
            new_x, new_y = w[r, x] / cnt[r, x], w[r, y] / cnt[r, y]
            for g in range(num_gpus):
                for s in range(slots):
                    e = own[r, g, s]
                    if e == x:
                        load[g] += new_x - old_x
                    elif e == y:
                        load[g] += new_y - old_y
            load[best] += old_x - old_y  # the changed slot held y's old share, not x's


def _deal_kernel(w, own, cnt, target, budget):  # pragma: no cover (compiled)
    """Relocations of a layer dealt at once: the same units as :func:`_relocate_kernel` (the
    hottest gainers, the cheapest losers), each loser giving up a copy beyond its first on a GPU
    first, then its copy on the heaviest GPU; then the gainers' units, heaviest first, each to the
    lightest GPU with a freed slot that may take it (longest processing time first). A unit no
    freed slot may take leaves the slot its old expert. Same arguments, in place."""
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
deal_kernel = njit(cache=True, nogil=True)(_deal_kernel) if njit is not None else None
