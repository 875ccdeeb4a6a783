"""Diff two placements into a transfer plan: which expert weights move where, and from whom.

The plan is a flat list of :class:`~ray_eplb.actors.worker.Transfer` rows
``(layer, expert, src_rank, dst_rank, dst_slot)``, one per changed slot, so a later stage can batch
rows, order them or cap them by a move budget without touching the worker protocol.
"""
from __future__ import annotations

from collections import Counter, defaultdict

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
    """Relabel ``new`` so that as many slots as possible keep their expert from ``old``, without
    changing any GPU's expert set (so every balancedness stays the same).

    Per layer: nodes are matched to nodes, then GPUs to GPUs within each node, by the number of
    experts they already hold (maximum-weight assignment); then within each GPU an expert that
    stays keeps its old slot. Whole nodes and whole GPUs move together, so groups kept on one node
    by the hierarchical policy stay on one node.

    Shapes: ``old.phy2log``, ``new.phy2log`` ``[L, R]``; returns a placement with ``new``'s epoch.
    """
    from scipy.optimize import linear_sum_assignment

    if old.topology != new.topology:
        raise ValueError("old and new placements are for different topologies")
    t = old.topology
    n, g, s = t.num_nodes, t.gpus_per_node, t.slots_per_gpu
    old_gpu = old.phy2log.view(t.num_layers, n, g, s).tolist()  # [L][node][gpu][slot]
    new_gpu = new.phy2log.view(t.num_layers, n, g, s).tolist()
    out = []
    for layer in range(t.num_layers):
        o, w = old_gpu[layer], new_gpu[layer]
        node_of = _match([sum(x, []) for x in o], [sum(x, []) for x in w], linear_sum_assignment)
        row = []
        for node in range(n):
            o_node, w_node = o[node], w[node_of[node]]
            gpu_of = _match(o_node, w_node, linear_sum_assignment)
            for gpu in range(g):
                row += _keep_slots(o_node[gpu], w_node[gpu_of[gpu]])
        out.append(row)
    return Placement.from_phy2log(t, torch.tensor(out, dtype=torch.int64), new.epoch)


def _overlap(a: list[int], b: list[int]) -> int:
    """Size of the multiset intersection of ``a`` and ``b``."""
    ca, cb = Counter(a), Counter(b)
    return sum(min(v, cb[k]) for k, v in ca.items())


def _match(old_sets: list[list[int]], new_sets: list[list[int]], lsa) -> list[int]:
    """``perm[i]``: the new set given to old position ``i`` (maximum total overlap)."""
    if len(old_sets) == 1:
        return [0]
    score = [[_overlap(a, b) for b in new_sets] for a in old_sets]
    rows, cols = lsa(score, maximize=True)
    perm = [0] * len(old_sets)
    for r, c in zip(rows.tolist(), cols.tolist()):
        perm[r] = c
    return perm


def _keep_slots(old_slots: list[int], new_slots: list[int]) -> list[int]:
    """Order ``new_slots`` so experts that also sit in ``old_slots`` keep their slot."""
    remaining = Counter(new_slots)
    out: list[int | None] = []
    for e in old_slots:
        if remaining[e] > 0:
            remaining[e] -= 1
            out.append(e)
        else:
            out.append(None)
    rest = [e for e, c in sorted(remaining.items()) for _ in range(c)]
    return [e if e is not None else rest.pop() for e in out]
