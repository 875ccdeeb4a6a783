"""Derived placement maps: ``phy2log`` -> ``log2phy`` and ``logcnt``."""
from __future__ import annotations

import numpy as np
import torch

from ray_eplb.solver import compiled


def bin_counts(owner: np.ndarray, num_bins: int, num_experts: int) -> np.ndarray:
    """Replicas of each expert per bin: ``owner [B, M]`` (expert per slot; bins are ``M / num_bins``
    consecutive slots) -> ``[B, num_bins, E]`` int64. ``num_bins=1``: replicas per row (``logcnt``)."""
    num_rows, num_slots = owner.shape
    bins = np.arange(num_rows * num_bins).repeat(num_slots // num_bins)  # [B*M] flat bin of each slot
    return np.bincount(bins * num_experts + owner.ravel(), minlength=num_rows * num_bins * num_experts).reshape(
        num_rows, num_bins, num_experts
    )


def minus_ones(shape: tuple[int, ...]) -> np.ndarray:
    """An int64 array of ``shape`` filled with ``-1``, written as bytes (``-1`` is all ones in two's
    complement, so a byte fill, i.e. ``memset``, writes it). The ``-1`` padded ``log2phy`` is the
    largest array of a solve (213 MB at 58 x 256 experts, 2048 slots): measured on it, 33-34 ms
    against 38-76 ms for ``np.full(shape, -1)`` (median 76), and 14 against 16-35 ms at 91 MB."""
    out = np.empty(shape, dtype=np.int64)
    out.view(np.uint8).fill(255)
    return out


WIDTHS = ("full", "used")
# The compiled maps are written this many bytes of layers at a time: the -1 fill, then each
# expert's slots while those lines are still in the core's L2 (half of a 1 MiB L2, the smallest of
# current server cores), instead of a memset of the whole map and then a scatter into lines that it
# pushed out. Measured (one solve's map at full width, median of 80): Kimi-K2-like 12 MB 0.64 ->
# 0.54 ms, Qwen3-like 0.21 -> 0.16, DeepSeek-V3 prefill 0.27 -> 0.19; 1 MiB blocks were within 4%.
MAP_BLOCK_BYTES = 1 << 19


def check_width(width: object, name: str = "width") -> None:
    """Raise ``ValueError`` unless ``width`` is ``None``, ``"full"``, ``"used"`` or a positive int
    (see :func:`logical_maps`); ``name`` is the argument's name in the message."""
    if width is None or (isinstance(width, str) and width in WIDTHS):
        return
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"{name}={width!r} must be 'full', 'used' or a positive int")


def map_width(logcnt: np.ndarray, num_slots: int, width: int | str | None = None) -> int:
    """The ``log2phy`` width ``M`` for replica counts ``logcnt [L, E]`` of ``num_slots`` slots per
    layer: ``None``/``"full"``: ``R - E + 1``; ``"used"``: the most replicas of any expert in any
    layer (at least 1); an int: itself. Raises ``ValueError`` when an expert has more than
    ``R - E + 1`` replicas (so another has none) or when an int is below the most replicas."""
    check_width(width)
    num_layers, num_experts = logcnt.shape
    full = num_slots - num_experts + 1
    most = int(logcnt.max(initial=0))
    if most > full:
        raise ValueError(f"an expert has {most} replicas, more than R - E + 1 = {full}")
    if isinstance(width, str) or width is None:
        return max(most, 1) if width == "used" else full
    if width < most:
        layer, expert = np.unravel_index(int(np.argmax(logcnt)), logcnt.shape)
        raise ValueError(f"log2phy width={int(width)} is less than {most}, the replicas of expert {expert} "
                         f"in layer {layer}")
    return int(width)


def logical_maps(
    phy2log: torch.Tensor, num_experts: int, width: int | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a slot map.

    Args:
        phy2log: ``[L, R]`` int64, the logical expert held by each slot.
        num_experts: ``E``, the number of logical experts.
        width: ``M``, the width of ``log2phy``. ``None`` or ``"full"``: ``R - E + 1`` (DeepSeek's
            contract: room for the most replicas one expert can have); ``"used"``: the most
            replicas any expert has in any layer of this map (at least 1), counted before the
            output is allocated; an int: that width (at least the most replicas, else
            ``ValueError`` naming both).

    Returns:
        ``log2phy [L, E, M]`` int64: the slots of each logical expert in ascending slot order,
        padded with ``-1``; and ``logcnt [L, E]`` int64, replicas per expert.
    """
    if phy2log.dim() != 2:
        raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {tuple(phy2log.shape)}")
    num_layers, num_slots = phy2log.shape
    if num_slots < num_experts:
        raise ValueError(f"phy2log has {num_slots} slots, fewer than num_experts={num_experts}")
    check_width(width)
    phy2log = phy2log.to(torch.int64)
    if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
        raise ValueError(
            f"phy2log holds expert ids outside [0, {num_experts}): "
            f"min={int(phy2log.min())}, max={int(phy2log.max())}"
        )
    log2phy, logcnt = logical_maps_np(phy2log.detach().cpu().numpy(), num_experts, width)
    return torch.from_numpy(log2phy).to(phy2log.device), torch.from_numpy(logcnt).to(phy2log.device)


def checked_slot_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray | None:
    """``logcnt [L, E]`` int64, the slots of each expert per row of ``phy2log [L, R]`` (any integer
    dtype, ids not checked yet), or ``None`` if an id is outside ``[0, E)``. Compiled where numba is
    installed: the check is the counting pass itself (one pass instead of a min, a max and a
    bincount)."""
    if compiled.ENABLED:
        cnt, ok = compiled.slot_counts_kernel(np.ascontiguousarray(phy2log, dtype=np.int64), num_experts)
        return cnt if ok else None
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
        return None
    return bin_counts(phy2log, 1, num_experts)[:, 0]


def logical_maps_np(
    phy2log: np.ndarray, num_experts: int, width: int | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`logical_maps` on a ``phy2log [L, R]`` int64 array (numpy in, numpy out): ``log2phy
    [L, E, M]`` and ``logcnt [L, E]``, ``M`` chosen by ``width`` as there.

    Counts first, then allocates ``log2phy`` at its final width and writes each expert's slots
    once. Raises ``ValueError`` when an id is outside ``[0, E)`` (counted and checked by
    :func:`checked_slot_counts`, compiled or not), or when an expert has more than ``R - E + 1``
    replicas (so another has none), whatever the width. Single-threaded numpy on purpose: torch's parallel fill of the large
    ``-1`` padded array measured 3x faster on an idle machine but milliseconds slower on a busy one.
    """
    num_layers, num_slots = phy2log.shape
    logcnt = checked_slot_counts(phy2log, num_experts)  # [L, E]
    if logcnt is None:  # (neither fill below checks its indices)
        raise ValueError(f"phy2log holds an expert id outside [0, {num_experts})")
    m = map_width(logcnt, num_slots, width)
    if compiled.ENABLED:  # the same maps, compiled, a block of layers at a time (see MAP_BLOCK_BYTES)
        log2phy = np.empty((num_layers, num_experts, m), dtype=np.int64)
        plan = np.ascontiguousarray(phy2log, dtype=np.int64)
        step = max(1, MAP_BLOCK_BYTES // max(1, 8 * num_experts * m))  # layers per block (no experts: one)
        for first in range(0, num_layers, step):
            block = log2phy[first:first + step]
            block.view(np.uint8).fill(255)  # -1 (a memset), then the slots while the block is in cache
            compiled.fill_maps_kernel(plan[first:first + step], block)
        return log2phy, logcnt
    flat = phy2log + (np.arange(num_layers) * num_experts)[:, None]  # [L, R] row-unique expert ids
    keys = phy2log.astype(np.int16) if num_experts < 2**15 else phy2log  # int16: numpy radix-sorts it
    order = np.argsort(keys, axis=1, kind="stable")  # [L, R] slots grouped by expert, ascending
    sorted_flat = flat.ravel()[order + (np.arange(num_layers) * num_slots)[:, None]]  # [L, R]
    first = (np.cumsum(logcnt, 1) - logcnt).ravel()  # [L*E] start of each expert's run
    rank = np.arange(num_slots) - first[sorted_flat]  # [L, R] replica index within its expert
    log2phy = minus_ones((num_layers * num_experts * m,))
    log2phy[(sorted_flat * m + rank).ravel()] = order.ravel()
    return log2phy.reshape(num_layers, num_experts, m), logcnt.astype(np.int64)


def avoidable_duplicates_np(
    phy2log: np.ndarray, num_gpus: int, num_experts: int, avail: int | None = None
) -> np.ndarray:
    """``[L]`` duplicate (GPU, expert) pairs of ``phy2log [L, R]`` that a placement with the same
    replica counts could avoid: replicas beyond the first of an expert on a GPU, less
    ``max(0, count - avail)`` per expert (those no placement avoids). ``avail``: GPUs an expert
    may use (default all; a hierarchical plan keeps each group on one node's GPUs)."""
    num_layers, num_slots = phy2log.shape
    srt = np.sort(phy2log.reshape(num_layers, num_gpus, num_slots // num_gpus), axis=-1)  # [L, P, S]
    pairs = (srt[..., 1:] == srt[..., :-1]).sum((1, 2))  # [L]
    cnt = bin_counts(phy2log, 1, num_experts)[:, 0]  # [L, E]
    return pairs - np.maximum(cnt - (num_gpus if avail is None else avail), 0).sum(1)


def replica_shares(load: np.ndarray, cnt: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``(per [B, n], cap [B, n])`` for owners with ``load``/``cnt`` ``[B, n]`` (load, replicas) on
    ``num_bins`` bins: the load one replica carries (``load / cnt``; an owner without a replica,
    which no slot holds, gets its whole load) and the copies one bin may hold (``ceil(cnt / P)``:
    one unless the owner has more replicas than bins). The numpy stages' form of the compiled
    :func:`~ray_eplb.solver.plan_stats._row_shares`."""
    return load / np.maximum(cnt, 1), -(-cnt // num_bins)


def per_slot(table: np.ndarray, slot_owner: np.ndarray) -> np.ndarray:
    """``table [B, n]`` looked up at every slot of ``slot_owner [B, P, S]`` -> ``[B, P, S]``."""
    num_rows, n = table.shape
    return table.ravel()[slot_owner + (np.arange(num_rows) * n)[:, None, None]]
