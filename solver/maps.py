"""Derived placement maps: ``phy2log`` -> ``log2phy`` and ``logcnt``."""
from __future__ import annotations

import torch


def logical_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a slot map.

    Args:
        phy2log: ``[L, R]`` int64, the logical expert held by each slot.
        num_experts: ``E``, the number of logical experts.

    Returns:
        ``log2phy [L, E, M]`` int64 with ``M = R - E + 1``: the slots of each logical expert in
        ascending slot order, padded with ``-1``; and ``logcnt [L, E]`` int64, replicas per expert.
    """
    if phy2log.dim() != 2:
        raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {tuple(phy2log.shape)}")
    num_layers, num_slots = phy2log.shape
    if num_slots < num_experts:
        raise ValueError(f"phy2log has {num_slots} slots, fewer than num_experts={num_experts}")
    phy2log = phy2log.to(torch.int64)
    if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
        raise ValueError(
            f"phy2log holds expert ids outside [0, {num_experts}): "
            f"min={int(phy2log.min())}, max={int(phy2log.max())}"
        )
    device = phy2log.device
    width = num_slots - num_experts + 1
    # logcnt: [L, E]
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if int(logcnt.max()) > width:
        raise ValueError(f"an expert has {int(logcnt.max())} replicas, more than R - E + 1 = {width}")
    # Sort slots by expert (stable keeps ascending slot order within an expert).
    order = torch.argsort(phy2log, dim=1, stable=True)  # [L, R] slot ids grouped by expert
    sorted_exp = torch.gather(phy2log, 1, order)  # [L, R]
    first = torch.cumsum(logcnt, dim=1) - logcnt  # [L, E] position of each expert's first slot
    rank = torch.arange(num_slots, device=device).expand(num_layers, -1) - torch.gather(first, 1, sorted_exp)
    log2phy = torch.full((num_layers, num_experts, width), -1, dtype=torch.int64, device=device)
    log2phy.view(num_layers, -1).scatter_(1, sorted_exp * width + rank, order)
    return log2phy, logcnt
