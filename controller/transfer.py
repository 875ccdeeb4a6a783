"""Diff two placements into a transfer plan: which expert weights move where, and from whom.

The plan is a flat list of :class:`~ray_eplb.actors.worker.Transfer` rows
``(layer, expert, src_rank, dst_rank, dst_slot)``, one per changed slot, so a later stage can batch
rows, order them or cap them by a move budget without touching the worker protocol.
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
