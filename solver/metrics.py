"""Balance metrics. Balancedness = mean(GPU load) / max(GPU load); 1.0 is perfect."""
from __future__ import annotations

import torch


def gpu_loads(phy2log: torch.Tensor, logcnt: torch.Tensor, load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load each GPU carries when every expert's load is split evenly among its replicas.

    Args:
        phy2log: ``[L, R]`` int64 slot map; slots ``[g*R/G, (g+1)*R/G)`` belong to GPU ``g``.
        logcnt: ``[L, E]`` replicas per logical expert (as returned with ``phy2log``).
        load: ``[L, E]`` load per logical expert (any real dtype).
        num_gpus: ``G``; must divide ``R``.

    Returns:
        ``[L, G]`` float64 load per GPU.
    """
    if phy2log.dim() != 2 or load.dim() != 2 or logcnt.shape != load.shape:
        raise ValueError(
            f"shapes do not fit: phy2log {tuple(phy2log.shape)}, logcnt {tuple(logcnt.shape)}, "
            f"load {tuple(load.shape)}"
        )
    num_layers, num_slots = phy2log.shape
    if num_gpus <= 0 or num_slots % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} does not divide the {num_slots} slots")
    bad = ~torch.isfinite(load.to(torch.float64)) | (load.to(torch.float64) < 0)
    if bool(bad.any()):
        layer, expert = bad.nonzero()[0].tolist()
        raise ValueError(f"load must be finite and non-negative: load[{layer}, {expert}] = {float(load[layer, expert])}"
                         f" ({int(bad.sum())} such entries)")
    per_replica = load.to(torch.float64) / logcnt.clamp(min=1).to(torch.float64)  # [L, E]
    slot_load = torch.gather(per_replica, 1, phy2log.to(torch.int64))  # [L, R]
    return slot_load.view(num_layers, num_gpus, -1).sum(-1)


def balancedness(phy2log: torch.Tensor, logcnt: torch.Tensor, load: torch.Tensor, num_gpus: int) -> float:
    """GPU-level balancedness over all layers: ``sum_l mean_g load / sum_l max_g load``.

    Shapes as in :func:`gpu_loads`. Returns 1.0 when there is no load at all; a NaN, infinite or
    negative load raises ``ValueError`` naming it (it has no balancedness).
    """
    per_gpu = gpu_loads(phy2log, logcnt, load, num_gpus)  # [L, G]
    peak = float(per_gpu.max(dim=1).values.sum())
    return float(per_gpu.mean(dim=1).sum()) / peak if peak > 0 else 1.0


def balancedness_per_layer(
    phy2log: torch.Tensor, logcnt: torch.Tensor, load: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    """Per-layer balancedness ``mean_g / max_g``, ``[L]`` float64 (1.0 for a layer without load)."""
    per_gpu = gpu_loads(phy2log, logcnt, load, num_gpus)  # [L, G]
    peak = per_gpu.max(dim=1).values
    return torch.where(peak > 0, per_gpu.mean(dim=1) / peak.clamp(min=1e-300), torch.ones_like(peak))


def duplicate_pairs(phy2log: torch.Tensor, num_gpus: int) -> int:
    """Number of surplus replicas sharing a GPU with another replica of the same expert.

    ``phy2log``: ``[L, R]``. Counts, over (layer, GPU), replicas beyond the first of each expert.
    """
    num_layers, num_slots = phy2log.shape
    per_gpu = phy2log.view(num_layers, num_gpus, num_slots // num_gpus)  # [L, G, S]
    srt = torch.sort(per_gpu, dim=-1).values
    return int((srt[..., 1:] == srt[..., :-1]).sum())


def unavoidable_duplicates(
    phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, num_nodes: int = 1, num_groups: int = 1
) -> int:
    """Duplicates no placement with these replica counts can avoid: ``sum max(0, count - GPUs available)``.

    ``phy2log [L, R]``, ``logcnt [L, E]``. An expert may use every GPU, or only its node's
    ``num_gpus / num_nodes`` GPUs in a layer whose placement keeps every expert group whole on one
    node (the hierarchical policy).
    """
    num_layers, num_slots = phy2log.shape
    num_experts = logcnt.shape[1]
    avail = torch.full((num_layers,), num_gpus, dtype=torch.int64)  # [L]
    if num_nodes > 1 and num_groups % num_nodes == 0 and num_experts % num_groups == 0:
        node = (torch.arange(num_slots) // (num_slots // num_nodes)).expand(num_layers, -1)  # [L, R]
        group = phy2log.cpu() // (num_experts // num_groups)  # [L, R]
        lo = torch.full((num_layers, num_groups), num_nodes, dtype=torch.int64)  # [L, G]
        hi = torch.full((num_layers, num_groups), -1, dtype=torch.int64)  # [L, G]
        lo.scatter_reduce_(1, group, node, "amin")
        hi.scatter_reduce_(1, group, node, "amax")
        whole = (lo == hi).all(dim=1)  # [L] every group on one node
        avail = torch.where(whole, num_gpus // num_nodes, avail)
    return int((logcnt.cpu() - avail.unsqueeze(1)).clamp(min=0).sum())


def avoidable_duplicates(
    phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, num_nodes: int = 1, num_groups: int = 1
) -> int:
    """Surplus replicas sharing a GPU with another replica of the same expert, beyond the
    :func:`unavoidable_duplicates` (shapes as there)."""
    return duplicate_pairs(phy2log, num_gpus) - unavoidable_duplicates(phy2log, logcnt, num_gpus, num_nodes, num_groups)
