"""Packing stages: items (groups or expert replicas) into bins (nodes or GPUs) with equal slots.

All functions work on numpy arrays batched over ``B`` independent rows (layers, or layer x node
sub-problems) and are vectorised across rows; the only Python loops run over rounds of slots and
refinement sweeps, never over rows.

Vocabulary: a row has ``M = P * S`` items, ``P`` bins of ``S`` slots each. ``load [B, M]`` is an
item's load, ``owner [B, M]`` the logical expert an item is a replica of (items with one owner
should not share a bin: a second replica on a GPU is a wasted slot). ``assign [B, P, S]`` lists
the item index in each slot of each bin.
"""
from __future__ import annotations

import numpy as np


def pack_rounds(load: np.ndarray, num_bins: int) -> np.ndarray:
    """Balanced packing by rounds (LPT per round), for distinct items such as expert groups.

    Items are taken heaviest first, ``P`` per round (``S`` rounds); within a round, items sorted by
    load descending meet bins sorted by load ascending (the min-max optimal matching for one round).

    Args:
        load: ``[B, M]`` float64 item loads.
        num_bins: ``P``; must divide ``M``.

    Returns:
        ``assign [B, P, S]`` int64 item indices.
    """
    num_rows, num_items = load.shape
    slots = num_items // num_bins
    rows = np.arange(num_rows)[:, None]  # [B, 1]
    offs = rows * num_bins  # flat indexing (row offset + column): cheaper than 2-D fancy indexing
    order = np.argsort(-load, axis=1, kind="stable")  # [B, M] heaviest first
    sorted_load = np.take_along_axis(load, order, 1).reshape(num_rows, slots, num_bins)  # [B, S, P]
    bin_load = np.zeros((num_rows, num_bins))  # [B, P] ascending
    perm = np.tile(np.arange(num_bins), (num_rows, 1))  # [B, P] bin id at each rank
    bin_of = np.empty((num_rows, slots, num_bins), dtype=np.int64)  # [B, S, P] bin of each item
    for r in range(slots):
        bin_of[:, r] = perm
        new = bin_load + sorted_load[:, r]  # lightest bin takes the heaviest item
        idx = np.argsort(new, axis=1) + offs
        bin_load, perm = new.ravel()[idx], perm.ravel()[idx]
    assign = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    assign[rows[:, :, None], bin_of, np.arange(slots)[None, :, None]] = order.reshape(num_rows, slots, num_bins)
    return assign


def pack_snake(expert_load: np.ndarray, counts: np.ndarray, num_bins: int) -> np.ndarray:
    """Serpentine packing of replicas that keeps each owner's replicas on distinct bins.

    Items sorted by load descending are dealt in rounds of ``P``: forward over the bins in even
    rounds, backward in odd ones, so every bin gets one item of every load tier (hot and cold
    experts mixed on every GPU) and the rounds' excesses cancel pairwise. Replicas of one owner
    have equal loads and sit together, so within a round they meet distinct bins; only the owner
    that ends a round and goes on into the next could meet itself, since the turn revisits the
    bins just dealt. Its items of the new round are dealt to the first positions whose bins it
    does not hold, the other items keep their order on the remaining positions. So no bin holds
    two replicas of an owner with at most ``P`` of them.

    Items are the replicas of ``n`` owners listed owner by owner: owner ``e``'s are items
    ``start_e .. start_e + counts_e - 1`` with ``start = cumsum(counts) - counts``, each of load
    ``expert_load_e / counts_e``.

    Args:
        expert_load: ``[B, n]`` float64 load of each owner (split evenly among its items).
        counts: ``[B, n]`` int64 items per owner (>= 1); every row sums to ``M``.
        num_bins: ``P``; must divide ``M``.

    Returns:
        ``assign [B, P, S]`` int64 item indices.
    """
    num_rows, n = counts.shape
    num_items = int(counts[0].sum())
    slots = num_items // num_bins
    rows = np.arange(num_rows)[:, None]  # [B, 1]
    rank = np.arange(num_bins)  # [P]
    # Sort owners (not items) by per-item load, then expand: cheaper than sorting M items.
    by_owner = np.argsort(-(expert_load / counts), axis=1, kind="stable")  # [B, n]
    sorted_counts = np.take_along_axis(counts, by_owner, 1)  # [B, n]
    start = np.take_along_axis(np.cumsum(counts, 1) - counts, by_owner, 1)  # [B, n] first item of each
    block = np.cumsum(sorted_counts, 1) - sorted_counts  # [B, n] where each block starts when sorted
    order = np.repeat((start - block).ravel(), sorted_counts.ravel()).reshape(num_rows, num_items)
    order += np.arange(num_items)  # [B, M] item at each sorted position
    own = np.repeat(by_owner.ravel(), sorted_counts.ravel()).reshape(num_rows, slots, num_bins)  # [B, S, P]
    pos = np.tile(rank, (num_rows, slots, 1))  # [B, S, P] dealing position of each item in its round
    offs = rows * num_bins  # [B, 1]: flat indexing (row offset + column) is 2-4x cheaper than 2-D here
    if slots > 1:
        last = own[:, :-1, -1:]  # [B, S-1, 1] owner ending each round
        lead = np.cumprod(own[:, 1:] == last, axis=2).sum(2)  # [B, S-1] its items in the next round
        for r in np.nonzero(lead.any(0))[0]:
            # Position q of round r+1 deals to the bin that position P-1-q of round r dealt to.
            held = np.zeros(num_rows * num_bins, dtype=bool)
            held[num_bins - 1 - pos[:, r] + offs] = own[:, r] == last[:, r]
            free = ~held.reshape(num_rows, num_bins)  # [B, P] next-round positions it may take
            n_lead = lead[:, r, None]  # [B, 1]
            chosen = free & (np.cumsum(free, 1) <= n_lead)  # [B, P] the first n_lead of them
            # An owner with more items than bins may find too few: deal it plainly (capped later).
            chosen = np.where(free.sum(1, keepdims=True) >= n_lead, chosen, rank < n_lead)
            taken = np.cumsum(chosen, 1)  # [B, P]
            # Item dealt at each position: its own items at the chosen ones, the others in order.
            item = np.where(chosen, taken - 1, n_lead + rank - taken)  # [B, P]
            nxt = np.empty(num_rows * num_bins, dtype=np.int64)
            nxt[item + offs] = rank
            pos[:, r + 1] = nxt.reshape(num_rows, num_bins)
    forward = (np.arange(slots) % 2 == 0)[None, :, None]  # [1, S, 1]
    bins = np.where(forward, pos, num_bins - 1 - pos)  # [B, S, P]
    assign = np.empty(num_rows * num_bins * slots, dtype=np.int64)
    assign[((bins + offs[:, :, None]) * slots + np.arange(slots)[None, :, None]).ravel()] = order.ravel()
    return assign.reshape(num_rows, num_bins, slots)


def place_replicas(
    expert_load: np.ndarray,
    counts: np.ndarray,
    load: np.ndarray,
    owner: np.ndarray,
    cap: np.ndarray,
    num_bins: int,
    pairs: int = 4,
    sweeps: int = 8,
) -> np.ndarray:
    """Replicas -> GPUs: serpentine packing, a repair of any surplus copy, swap refinement.

    Shapes: ``expert_load``/``counts`` ``[B, n]`` (see :func:`pack_snake`); per item ``load``,
    ``owner``, ``cap`` ``[B, M]`` (``cap``: the fewest copies of the item's owner a bin must be
    allowed, ``ceil(count / P)``). Returns ``assign [B, P, S]``.
    """
    assign = pack_snake(expert_load, counts, num_bins)
    num_rows, _, slots = assign.shape
    rows = np.arange(num_rows)[:, None]
    if (cap > 1).any():  # owners with more replicas than bins: the serpentine bound is not enough
        own = owner[rows[:, :, None], assign]
        if surplus_copies(own, cap[rows[:, :, None], assign]).any():
            assign = separate_copies(assign, load, owner, cap)
    return refine_swaps(assign, load, owner, cap, pairs, sweeps)


def surplus_copies(own: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """``[B, P, S]`` bool: a slot whose owner already fills its per-bin cap earlier in the bin.

    ``own [B, P, S]`` owners per slot; ``cap [B, P, S]`` copies allowed per bin for that slot's
    owner (``ceil(count / P)``: 1 unless the owner has more items than there are bins).
    """
    slots = own.shape[-1]
    same = own[..., :, None] == own[..., None, :]  # [B, P, S, S]
    earlier = np.tril(np.ones((slots, slots), dtype=bool), -1)  # [S, S] j < s
    return (same & earlier).sum(-1) >= cap


def separate_copies(assign: np.ndarray, load: np.ndarray, owner: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Swap surplus copies of an owner out of a bin, each for the closest-load item it can take.

    A slot over its owner's cap (see :func:`surplus_copies`) swaps with the item, in another bin,
    whose load is nearest its own such that neither owner then exceeds its cap in its new bin.
    One repair per row per pass, until none is left (or no legal swap exists).

    Shapes: ``assign [B, P, S]`` (a repaired copy is returned), ``load``/``owner``/``cap`` ``[B, M]``.
    """
    assign = assign.copy()
    num_rows, num_bins, slots = assign.shape
    rows = np.arange(num_rows)[:, None, None]
    for _ in range(num_bins * slots):
        own, lim = owner[rows, assign], cap[rows, assign]  # [B, P, S]
        bad = surplus_copies(own, lim)  # [B, P, S]
        todo = bad.reshape(num_rows, -1).any(1)
        if not todo.any():
            break
        r = np.nonzero(todo)[0]  # rows with a surplus copy
        flat = bad[r].reshape(len(r), -1).argmax(1)
        pb, sb = flat // slots, flat % slots  # [r] its bin and slot
        x_own = own[r, pb, sb]  # [r]
        x_load = load[r, assign[r, pb, sb]]
        o = own[r]  # [r, P, S]
        # Copies of x's owner per bin, and copies of each candidate's owner in x's bin.
        x_in = (o == x_own[:, None, None]).sum(-1)  # [r, P]
        y_in_xbin = (o[:, :, :, None] == o[np.arange(len(r)), pb][:, None, None, :]).sum(-1)  # [r, P, S]
        ok = (x_in < lim[r, pb, sb][:, None])[:, :, None] & (y_in_xbin < lim[r]) & (o != x_own[:, None, None])
        ok[np.arange(len(r)), pb] = False
        cost = np.where(ok, np.abs(load[r[:, None, None], assign[r]] - x_load[:, None, None]), np.inf)
        best = cost.reshape(len(r), -1).argmin(1)
        fine = np.isfinite(cost.reshape(len(r), -1)[np.arange(len(r)), best])
        if not fine.any():
            break
        r, pb, sb, best = r[fine], pb[fine], sb[fine], best[fine]
        py, sy = best // slots, best % slots
        tmp = assign[r, pb, sb].copy()
        assign[r, pb, sb] = assign[r, py, sy]
        assign[r, py, sy] = tmp
    return assign


def refine_swaps(
    assign: np.ndarray,
    load: np.ndarray,
    owner: np.ndarray,
    cap: np.ndarray,
    pairs: int = 4,
    sweeps: int = 8,
) -> np.ndarray:
    """Lower the heaviest bins by swapping items with the lightest bins, keeping owners apart.

    Each sweep sorts the bins of every row by load and pairs the ``k``-th heaviest with the
    ``k``-th lightest (``k < pairs``); in each pair it makes the one swap that best evens the pair
    (item ``a`` of the heavy bin for ``b`` of the light bin with ``0 < load_a - load_b < gap``,
    which lowers the pair's max) among swaps that put no owner into a bin already holding it (over
    its cap). Stops when a sweep changes nothing, or after ``sweeps`` sweeps.

    Shapes: ``assign [B, P, S]`` (an updated copy is returned), ``load``/``owner``/``cap`` ``[B, M]``
    (owners are ``0 <= owner < E``).
    """
    num_rows, num_bins, slots = assign.shape
    k = min(pairs, num_bins // 2)
    if k < 1 or sweeps < 1:
        return assign
    rows = np.arange(num_rows)[:, None]  # [B, 1]
    assign = assign.reshape(-1).copy()  # [B*P*S] flat: row * P * S + bin * S + slot
    flat = (assign.reshape(num_rows, -1) + rows * load.shape[1]).ravel()
    il, io, ic = load.ravel()[flat], owner.ravel()[flat], cap.ravel()[flat]  # [B*P*S] per slot
    num_owners = int(owner.max()) + 1
    slot_bin = np.arange(num_rows * num_bins).repeat(slots)  # [B*P*S] flat bin of each slot
    # held[bin * E + owner]: replicas of an owner in a bin (so a legality test is one gather).
    held = np.bincount(slot_bin * num_owners + io, minlength=num_rows * num_bins * num_owners)
    bin_load = il.reshape(num_rows, num_bins, slots).sum(-1)  # [B, P]
    first = rows * num_bins  # [B, 1] flat bin id of each row's bin 0
    span = np.arange(slots)  # [S]
    quiet = 0
    for sweep in range(sweeps):
        # Odd sweeps pair the i-th heaviest with the (i+1)-th lightest, so a pair stuck in a local
        # optimum gets another partner next time.
        shift = sweep % 2 if num_bins > 2 else 0
        kk = min(k, (num_bins - shift) // 2)
        by_load = np.argsort(bin_load, axis=1) + first  # [B, P] flat bins, lightest first
        hb, lb = by_load[:, : -kk - 1 : -1], by_load[:, shift : shift + kk]  # [B, kk] paired bins
        heavy, light = (hb * slots)[..., None] + span, (lb * slots)[..., None] + span  # [B, k, S] slots
        la, lb_load = il[heavy], il[light]  # [B, k, S]
        oa, ob = io[heavy], io[light]
        # a may enter the light bin / b the heavy bin only below the owner's cap there.
        ok_a = held[(lb * num_owners)[..., None] + oa] < ic[heavy]  # [B, k, S]
        ok_b = held[(hb * num_owners)[..., None] + ob] < ic[light]
        d = la[..., :, None] - lb_load[..., None, :]  # [B, k, S, S] what the heavy bin sheds
        gap = (bin_load.ravel()[hb] - bin_load.ravel()[lb])[..., None, None]  # [B, k, 1, 1]
        score = np.where(ok_a[..., :, None] & ok_b[..., None, :], np.minimum(d, gap - d), -1.0)
        score = score.reshape(num_rows, kk, -1)
        best = score.argmax(-1)  # [B, k]
        do = score.max(-1) > 1e-12 * gap[..., 0, 0]  # the pair's max falls
        if not do.any():
            quiet += 1
            if quiet == 2 or num_bins <= 2:
                break
            continue
        quiet = 0
        h, l_, best = hb[do], lb[do], best[do]  # flat bins and the chosen pair of slots
        xa, xb = h * slots + best // slots, l_ * slots + best % slots
        shed = il[xa] - il[xb]
        bin_load.ravel()[h] -= shed
        bin_load.ravel()[l_] += shed
        held[h * num_owners + io[xa]] -= 1
        held[l_ * num_owners + io[xa]] += 1
        held[l_ * num_owners + io[xb]] -= 1
        held[h * num_owners + io[xb]] += 1
        for arr in (assign, il, io, ic):
            arr[xa], arr[xb] = arr[xb], arr[xa].copy()
    return assign.reshape(num_rows, num_bins, slots)
