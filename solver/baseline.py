"""The classic greedy EPLB placement: the benchmark's baseline.

Our own implementation, written from the published description of DeepSeek's EPLB algorithm
(github.com/deepseek-ai/EPLB README), of what vLLM and SGLang ship today:

1. **Groups to nodes** (hierarchical policy only): the expert groups of each layer are packed onto
   the nodes, an equal number of groups per node, with *balanced greedy packing*: items in order of
   decreasing load, each to the lightest bin that still has room.
2. **Replication** within each node: start with one replica per expert, then give each remaining
   slot, one at a time, to the expert with the largest load per replica (argmax ``w / c``).
3. **Replicas to GPUs**: the node's physical replicas (each carrying ``w / c``) are packed onto the
   node's GPUs with the same balanced greedy packing, an equal number of slots per GPU.

The global policy is the same algorithm with one group and one node. The hierarchical policy is used
when ``num_groups % num_nodes == 0`` and ``num_experts % num_groups == 0``, else the global one.

This is the baseline and is meant to be faithful, not clever: the packing is a plain Python loop
per row, ties go to the lowest index, and nothing stops two replicas of one expert from landing on
the same GPU (the published algorithm does that; it wastes a slot).
"""
from __future__ import annotations

import torch

from ray_eplb.solver.maps import logical_maps

__all__ = ["balanced_packing", "greedy_rebalance_experts", "replicate_argmax"]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the ``n`` items of each row into ``num_packs`` bins of ``n / num_packs`` items each.

    Items are taken in order of decreasing weight (stable: equal weights keep index order); each goes
    to the bin with the smallest total weight among those not yet full (lowest bin index on ties).

    Args:
        weight: ``[X, n]`` item weights (any real dtype); ``num_packs`` must divide ``n``.
        num_packs: number of bins per row.

    Returns:
        ``pack [X, n]`` int64, the bin of each item, and ``rank [X, n]`` int64, the item's position
        inside its bin (0 for the first item placed there), both on ``weight``'s device.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [rows, items], got shape {tuple(weight.shape)}")
    num_rows, num_items = weight.shape
    if num_packs <= 0 or num_items % num_packs:
        raise ValueError(f"num_packs={num_packs} does not divide the {num_items} items per row")
    capacity = num_items // num_packs
    w64 = weight.detach().to("cpu", torch.float64)  # [X, n]
    order = torch.sort(w64, dim=1, descending=True, stable=True).indices.tolist()  # [X][n]
    values = w64.tolist()  # [X][n]
    pack = [[0] * num_items for _ in range(num_rows)]  # [X][n]
    rank = [[0] * num_items for _ in range(num_rows)]  # [X][n]
    for row in range(num_rows):
        loads = [0.0] * num_packs  # [num_packs] total weight per bin
        counts = [0] * num_packs  # [num_packs] items per bin
        row_w, row_pack, row_rank = values[row], pack[row], rank[row]
        for item in order[row]:
            best = -1
            for b in range(num_packs):
                if counts[b] < capacity and (best < 0 or loads[b] < loads[best]):
                    best = b
            row_pack[item] = best
            row_rank[item] = counts[best]
            counts[best] += 1
            loads[best] += row_w[item]
    device = weight.device
    return (
        torch.tensor(pack, dtype=torch.int64, device=device).view(num_rows, num_items),
        torch.tensor(rank, dtype=torch.int64, device=device).view(num_rows, num_items),
    )


def replicate_argmax(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate experts greedily: every extra slot goes to the expert with the largest ``w / c``.

    Vectorised over rows; one step per extra slot (ties go to the lowest expert index).

    Args:
        weight: ``[X, n]`` float load per logical expert.
        num_phy: slots per row, ``>= n``.

    Returns:
        ``phy2log [X, num_phy]`` int64 (slot ``i < n`` holds expert ``i``; slot ``i >= n`` the expert
        picked at step ``i - n``) and ``count [X, n]`` int64 replicas per expert (each ``>= 1``).
    """
    num_rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"num_phy={num_phy} is smaller than the {num_log} experts per row")
    device = weight.device
    rows = torch.arange(num_rows, device=device)  # [X]
    phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(num_rows, 1)  # [X, num_phy]
    count = torch.ones(num_rows, num_log, dtype=torch.int64, device=device)  # [X, n]
    for slot in range(num_log, num_phy):
        pick = torch.argmax(weight / count, dim=1)  # [X]
        phy2log[:, slot] = pick
        count[rows, pick] += 1
    return phy2log, count


def _validate(weight: torch.Tensor, num_replicas: int, num_gpus: int, num_nodes: int, num_groups: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [layers, experts], got shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must hold real loads, got dtype {weight.dtype}")
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or inf loads")
    if (w < 0).any():
        raise ValueError(f"weight holds negative loads (min {float(w.min())})")
    num_experts = weight.shape[1]
    if num_experts == 0:
        raise ValueError("weight has no experts (shape [L, 0])")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas={num_replicas} is smaller than num_experts={num_experts}")
    if num_gpus <= 0 or num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
    if num_nodes <= 0 or num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if num_groups <= 0:
        raise ValueError(f"num_groups={num_groups} must be positive")


def _hierarchical(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """The three greedy stages. ``weight [L, E]`` float64 -> ``phy2log [L, R]`` int64.

    Needs ``num_groups % num_nodes == 0`` and ``E % num_groups == 0``. Node ``n`` owns slots
    ``[n*R/N, (n+1)*R/N)``; GPU ``g`` owns slots ``[g*R/P, (g+1)*R/P)``.
    """
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    device = weight.device

    # Stage 1: groups to nodes.
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, num_groups]
    group_node, group_rank = balanced_packing(group_load, num_nodes)  # [L, num_groups] each
    # Expert e of group g becomes node-local expert (rank of g on its node) * group_size + e % group_size
    # of node group_node[g]; flat position node * experts_per_node + local.
    offset = torch.arange(group_size, device=device)  # [group_size]
    local_pos = (group_node * experts_per_node + group_rank * group_size).unsqueeze(-1) + offset  # [L, G, gs]
    local2log = torch.empty(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, N*E/N]
    local2log.scatter_(1, local_pos.view(num_layers, -1), torch.arange(num_experts, device=device).expand(num_layers, -1))
    local2log = local2log.view(num_layers * num_nodes, experts_per_node)  # [L*N, E/N]
    node_weight = weight.gather(1, local2log.view(num_layers, -1)).view(num_layers * num_nodes, -1)  # [L*N, E/N]

    # Stage 2: replicate within each node.
    phy_local, count_local = replicate_argmax(node_weight, slots_per_node)  # [L*N, R/N], [L*N, E/N]

    # Stage 3: pack each node's replicas onto its GPUs.
    replica_load = (node_weight / count_local).gather(1, phy_local)  # [L*N, R/N]
    gpu, rank = balanced_packing(replica_load, gpus_per_node)  # [L*N, R/N] each
    node_slot = gpu * slots_per_gpu + rank  # [L*N, R/N] destination slot of each replica in its node
    slot_local = torch.empty_like(phy_local)  # [L*N, R/N] node-local expert in each node slot
    slot_local.scatter_(1, node_slot, phy_local)
    return local2log.gather(1, slot_local).view(num_layers, num_replicas)  # [L, R]


def greedy_rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classic greedy EPLB placement (DeepSeek's published algorithm), as a drop-in function.

    Args:
        weight: ``[L, E]`` load per (layer, logical expert); any real dtype, finite, non-negative.
        num_replicas: ``R``, physical slots per layer (``>= E``, divisible by ``num_gpus``).
        num_groups: expert groups (``E / num_groups`` consecutive experts each).
        num_nodes: ``N``, nodes (must divide ``num_gpus``).
        num_gpus: ``P``, GPUs in total; each holds ``R / P`` consecutive slots.

    Returns:
        ``phy2log [L, R]`` int64 logical expert per slot; ``log2phy [L, E, R - E + 1]`` int64 slots of
        each expert in ascending order padded with ``-1``; ``logcnt [L, E]`` int64 replicas per expert.
        All on ``weight``'s device.

    Raises:
        ValueError: naming the bad value (weight not 2-D, NaN/inf/negative loads, indivisible shapes).
    """
    _validate(weight, num_replicas, num_gpus, num_nodes, num_groups)
    num_experts = weight.shape[1]
    w64 = weight.detach().to("cpu", torch.float64)  # [L, E]
    if num_groups % num_nodes == 0 and num_experts % num_groups == 0:
        phy2log = _hierarchical(w64, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log = _hierarchical(w64, num_replicas, 1, 1, num_gpus)
    log2phy, logcnt = logical_maps(phy2log, num_experts)  # [L, E, R-E+1], [L, E]
    device = weight.device
    return phy2log.to(device), log2phy.to(device), logcnt.to(device)
