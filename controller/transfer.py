"""Diff two placements into a transfer plan: which expert weights move where, and from whom.

The plan is a flat list of :class:`~ray_eplb.actors.worker.Transfer` rows
``(layer, expert, src_rank, dst_rank, dst_slot)``, one per changed slot (:func:`transfer_plan`).
:func:`batch_transfers` groups it into batches in which no rank sends, and none receives, more than
``per_rank`` experts; the controller stages the batches one after the other on the workers, so a
swap never floods one rank's links while the model keeps serving.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ray_eplb.actors.protocol import Transfer
from ray_eplb.topology import Placement


def transfer_plan(old: Placement, new: Placement) -> list[Transfer]:
    """One transfer per slot whose expert changes from ``old`` to ``new``.

    Source choice for a slot of rank ``d`` that must receive expert ``e`` of layer ``l``, among the
    ranks holding ``e`` in layer ``l`` under ``old`` (they keep serving it until the commit):
    ``d`` itself (a local copy) first, then a rank on ``d``'s node, then any rank; ties go to the
    candidate with the fewest sends so far in this plan (spreads the outgoing traffic). ``-1``
    (the weight source) only when no rank holds ``e``, which a valid ``old`` never allows.
    """
    if old.topology != new.topology:
        raise ValueError("old and new placements are for different topologies")
    topo = old.topology
    changed = old.changed_slots(new).nonzero().tolist()  # [(layer, slot)]
    old_map = old.phy2log.tolist()  # [L][R]
    new_map = new.phy2log.tolist()
    holders: dict[tuple[int, int], set[int]] = defaultdict(set)  # (layer, expert) -> ranks
    for layer, row in enumerate(old_map):
        for slot, e in enumerate(row):
            holders[(layer, e)].add(topo.rank_of_slot(slot))
    sends: dict[int, int] = defaultdict(int)
    plan = []
    for layer, slot in changed:
        e = new_map[layer][slot]
        dst = topo.rank_of_slot(slot)
        cands = holders.get((layer, e), set())
        if not cands:
            src = -1
        elif dst in cands:
            src = dst
        else:
            node = topo.node_of_rank(dst)
            src = min(cands, key=lambda r: (topo.node_of_rank(r) != node, sends[r], r))
            sends[src] += 1
        plan.append(Transfer(layer, e, src, dst, slot))
    return plan


def batch_transfers(plan: list[Transfer], per_rank: int = 1) -> list[list[Transfer]]:
    """Group ``plan`` into the fewest batches in which every rank sends at most ``per_rank`` experts
    and receives at most ``per_rank`` (a rank may send and receive in the same batch: links are
    full duplex).

    Local copies (``src_rank == dst_rank``: a slot shares a tensor the rank already holds) cost no
    transfer and ride in the first batch; loads from the weight source (``src_rank == -1``) count
    against the receiver only. Remote rows are the edges of a bipartite multigraph (senders,
    receivers), coloured with exactly ``D`` colours, ``D`` its largest degree (Koenig's theorem; each
    clash is resolved by swapping the two colours along an alternating path), and ``per_rank``
    consecutive colours make a batch: ``ceil(D / per_rank)`` batches, which no batching can beat.

    Returns a list of batches (each a list of rows, in ``plan`` order); ``[]`` for an empty plan.
    Every row of ``plan`` lands in exactly one batch.
    """
    if isinstance(per_rank, bool) or not isinstance(per_rank, int) or per_rank < 1:
        raise ValueError(f"per_rank={per_rank!r} must be an int >= 1")
    local = [i for i, t in enumerate(plan) if t.src_rank == t.dst_rank]
    remote = [i for i, t in enumerate(plan) if t.src_rank != t.dst_rank]
    ends: dict[int, tuple[tuple, tuple]] = {}  # row -> (sender node, receiver node)
    for i in remote:
        t = plan[i]
        ends[i] = (("send", t.src_rank) if t.src_rank >= 0 else ("source", i), ("recv", t.dst_rank))
    at: dict[tuple, dict[int, int]] = defaultdict(dict)  # node -> {colour: row}
    colour: dict[int, int] = {}

    def free(node: tuple) -> int:
        c = 0
        while c in at[node]:
            c += 1
        return c

    for i in remote:
        u, v = ends[i]
        a, b = free(u), free(v)
        if a in at[v]:
            # v uses a (and lacks b): swap a and b along the a/b path from v. It alternates
            # receiver -a-> sender -b-> receiver ..., so it never reaches the sender u (which lacks a).
            path, node, c = [], v, a
            while c in at[node]:
                row = at[node][c]
                path.append(row)
                node = ends[row][0] if node == ends[row][1] else ends[row][1]
                c = b if c == a else a
            for row in path:
                for end in ends[row]:
                    del at[end][colour[row]]
            for row in path:
                colour[row] = b if colour[row] == a else a
                for end in ends[row]:
                    at[end][colour[row]] = row
        colour[i] = a
        at[u][a] = at[v][a] = i
    num_batches = max(1 if local else 0, -(-(max(colour.values(), default=-1) + 1) // per_rank))
    batches: list[list[Transfer]] = [[] for _ in range(num_batches)]
    for i, t in enumerate(plan):
        batches[colour[i] // per_rank if i in colour else 0].append(t)
    return batches


def split_by_rank(plan: list[Transfer], num_ranks: int) -> list[list[Transfer]]:
    """``plan`` grouped by destination rank (index = rank)."""
    out: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    for t in plan:
        if not 0 <= t.dst_rank < num_ranks:
            raise ValueError(f"transfer {t} has dst_rank outside [0, {num_ranks})")
        out[t.dst_rank].append(t)
    return out


def plan_summary(plan: list[Transfer], topology) -> dict:
    """Counts of the plan by kind: local copies, intra-node, inter-node, from the weight source."""
    kinds = {"local": 0, "intra_node": 0, "inter_node": 0, "source": 0}
    for t in plan:
        if t.src_rank < 0:
            kinds["source"] += 1
        elif t.src_rank == t.dst_rank:
            kinds["local"] += 1
        elif topology.node_of_rank(t.src_rank) == topology.node_of_rank(t.dst_rank):
            kinds["intra_node"] += 1
        else:
            kinds["inter_node"] += 1
    return {"moves": len(plan), **kinds}



def align(old: Placement, new: Placement) -> Placement:
    """``new`` relabelled (nodes, GPUs, slots) to keep as many of ``old``'s slots as possible, with
    every GPU's expert set and so every balancedness unchanged: the solver's
    :func:`ray_eplb.solver.migration.align` on typed placements. Returns ``new``'s epoch."""
    from ray_eplb.solver.migration import align as align_maps

    if old.topology != new.topology:
        raise ValueError("old and new placements are for different topologies")
    t = old.topology
    phy2log = align_maps(old.phy2log.cpu().numpy(), new.phy2log.cpu().numpy(), t.num_nodes, t.num_gpus)  # [L, R]
    return Placement.from_phy2log(t, torch.from_numpy(phy2log), new.epoch)
