"""The drop-in EPLB entry point: ``rebalance_experts`` (same contract as DeepSeek EPLB / vLLM).

Pipeline per layer: (hierarchical only) expert groups -> nodes by balanced rounds; replica counts
per node (or globally) by the hybrid-tail waterfill; replicas -> GPUs by balanced rounds that keep
each expert's replicas on distinct GPUs; then swap refinement between the heaviest and lightest
GPUs. The global policy is the hierarchical one with a single node and a single group.

Policies:
    ``hierarchical``: every expert group stays whole on one node (locality for node-limited
        routing); needs ``num_groups % num_nodes == 0`` and ``num_experts % num_groups == 0``.
    ``global``: all slots of all GPUs are one pool; lower peak, but a group may span nodes.
    ``auto`` (default): per layer, hierarchical where its max GPU load on ``weight`` is no higher
        than global's (a tie keeps the locality), else global; global alone where hierarchical is
        impossible. (On nodes with fewer GPUs than a hot expert's replicas, a hierarchical layer
        may double that expert up on a GPU where global would not: auto judges by peak load.)

Threads: a solve runs on one thread by design. It is numpy code with no BLAS call (GPU overlaps
are sparse pair lists, not matrix products), single-threaded numba kernels for its sequential
loops where numba is installed (:mod:`ray_eplb.solver.compiled`; same plans without it), plus
scipy's assignment solver; torch only converts the input and the outputs. So it starts no thread
pool whatever torch's or the BLAS's settings, and its time is one core's (the benchmarks also pin
every pool to one thread around it).
"""
from __future__ import annotations

import numpy as np
import torch

from ray_eplb.solver.budgets import budget_per_layer
from ray_eplb.solver.counts import METHODS, check_weight
from ray_eplb.solver.maps import avoidable_duplicates_np, check_width, logical_maps_np
from ray_eplb.solver.migration import align, check_old, migrate, peak_load
from ray_eplb.solver.packing import counts_and_place, pack_rounds

POLICIES = ("auto", "global", "hierarchical")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    method: str = "hybrid_tail",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | float | None = None,
    budget_scope: str = "layer",
    min_gain: float = 0.0,
    log2phy_width: int | str = "full",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical experts (slots) per layer onto ``num_gpus`` GPUs.

    Args:
        weight: ``[L, E]`` load per logical expert (any real dtype, any device).
        num_replicas: ``R``, slots per layer; ``R >= E`` and ``R % num_gpus == 0``.
        num_groups: expert groups (DeepSeek's node-limited routing); used by ``hierarchical``.
        num_nodes: ``N``; ``num_gpus % N == 0``. GPUs are numbered node-major.
        num_gpus: ``P``; GPU ``g`` holds slots ``[g*R/P, (g+1)*R/P)``.
        policy: ``"auto"`` | ``"global"`` | ``"hierarchical"`` (see the module docstring).
        method: replica-count rule, ``"hybrid_tail"`` (default) or ``"dhondt"``.
        old_phy2log: ``[L, R]`` the current placement. Given, the result changes as few slots as
            it can (:mod:`ray_eplb.solver.migration`): under ``global``/``auto`` it is improved
            incrementally from ``old_phy2log`` (per layer, the fresh plan relabelled to keep what
            it can replaces that where it dominates: no higher peak, no more moved slots, better
            in one); under ``hierarchical`` it is solved afresh and
            relabelled to keep what it can (whole nodes and GPUs, so the balance is unchanged).
            Under every policy a layer with fewer avoidable duplicates than ``old`` (a foreign
            plan's) is taken whatever its peak or ``min_gain``.
        max_moves: at most this many slots change per layer (an int), or this fraction of a
            layer's slots (a float in (0, 1]); ``None``: no limit. Needs ``old_phy2log``; not
            with ``hierarchical`` (its moves would have to keep groups on nodes).
        budget_scope: ``"layer"`` (the budget holds for each layer) or ``"total"`` (summed over
            layers: spent on the layers with the highest peak reduction per moved slot).
        min_gain: hysteresis; a layer whose max GPU load would fall by less than this fraction
            keeps ``old_phy2log``.
        log2phy_width: ``M``, the width of the returned ``log2phy``. ``"full"`` (default):
            ``R - E + 1``, DeepSeek's shape, for callers that copy it into a buffer of exactly that
            shape. ``"used"``: the most replicas any expert has in the returned plan (over all
            layers, at least 1): the same entries without the all ``-1`` columns, for callers that
            pad it to their own buffer (vLLM) or use only ``phy2log``; at many slots per GPU the
            full width is most of the call's time and memory (58 x 256 experts on 2048 slots:
            ``M = 1793``, 213 MB). An int: that width (at least the most replicas of the plan,
            else ``ValueError``). The plan does not depend on it.

    Returns:
        ``phy2log [L, R]``: logical expert of each slot; ``log2phy [L, E, M]``: slots of each
        expert in ascending order, ``-1`` padded (``log2phy[..., :k]`` is the same for every
        ``M >= k``); ``logcnt [L, E]``: replicas per expert. All int64, on ``weight``'s device.
        Replicas of one expert share a GPU only when it has more replicas than its GPUs.
    """
    if log2phy_width is None:
        raise ValueError("log2phy_width=None must be 'full', 'used' or a positive int")
    phy2log = _plan(weight, num_replicas, num_groups, num_nodes, num_gpus, policy, method, old_phy2log, max_moves,
                    budget_scope, min_gain, log2phy_width)
    log2phy, logcnt = logical_maps_np(phy2log, weight.shape[1], log2phy_width)
    device = weight.device
    return (
        torch.from_numpy(phy2log).to(device),
        torch.from_numpy(log2phy).to(device),
        torch.from_numpy(logcnt).to(device),
    )


def place_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    method: str = "hybrid_tail",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | float | None = None,
    budget_scope: str = "layer",
    min_gain: float = 0.0,
) -> torch.Tensor:
    """The plan alone: :func:`rebalance_experts`' ``phy2log [L, R]`` int64 on ``weight``'s device,
    the same for the same arguments, without the derived ``log2phy`` and ``logcnt``.

    For callers that take only the slot map (vLLM's policy interface, SGLang, our controller):
    its time grows with the slots, while a ``-1`` padded ``log2phy [L, E, M]`` grows with
    ``E x M``, and ``M`` (``R - E + 1``, or the most replicas of an expert) grows faster than the
    slots (58 x 256 experts on 64 GPUs, 8 -> 32 slots per GPU: ``R - E + 1`` 257 -> 1793, the most
    replicas 74 -> 367). Arguments as :func:`rebalance_experts`; the same ``ValueError``s.
    """
    phy2log = _plan(weight, num_replicas, num_groups, num_nodes, num_gpus, policy, method, old_phy2log, max_moves,
                    budget_scope, min_gain, None)
    return torch.from_numpy(phy2log).to(weight.device)


def _plan(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str,
    method: str, old_phy2log: torch.Tensor | None, max_moves: int | float | None, budget_scope: str,
    min_gain: float, log2phy_width: int | str | None,
) -> np.ndarray:
    """Validate the arguments and solve: ``phy2log [L, R]`` int64 numpy. ``log2phy_width``: the
    width of the ``log2phy`` the caller will build (``None``: none), for the working-memory check."""
    w = check_weight(weight)  # [L, E] float64 numpy
    num_replicas = _check_positive_int("num_replicas", num_replicas)
    num_groups = _check_positive_int("num_groups", num_groups)
    num_nodes = _check_positive_int("num_nodes", num_nodes)
    num_gpus = _check_positive_int("num_gpus", num_gpus)
    num_layers, num_experts = weight.shape
    if num_experts == 0:
        raise ValueError("weight has no experts (shape [L, 0])")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas={num_replicas} is smaller than the number of experts {num_experts}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if log2phy_width is None:
        width = 0
    else:
        check_width(log2phy_width, "log2phy_width")
        # The width's floor: "used" is not known before the plan, and is at least 1.
        width = int({"full": num_replicas - num_experts + 1, "used": 1}.get(log2phy_width, log2phy_width))
    need = working_memory_bytes(num_layers, num_experts, num_replicas, width)
    free = free_memory_bytes() if need > 2**28 else None  # asked only for large shapes: it reads /proc
    if free is not None and need > free:
        what = (f"log2phy [L, E, {width}] alone is {8 * num_layers * num_experts * width / 2**30:.1f} GiB" if width
                else "the plan alone, without log2phy")
        raise ValueError(
            f"num_replicas={num_replicas} for {num_layers} layers x {num_experts} experts needs about "
            f"{need / 2**30:.1f} GiB of working memory ({what}); {free / 2**30:.1f} GiB are free"
        )
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    hier_ok = num_experts % num_groups == 0 and num_groups % num_nodes == 0
    if policy == "hierarchical" and not hier_ok:
        raise ValueError(
            f"policy='hierarchical' needs num_groups={num_groups} to divide num_experts={num_experts} "
            f"and num_nodes={num_nodes} to divide num_groups"
        )
    if old_phy2log is None and (max_moves is not None or min_gain):
        raise ValueError(f"max_moves={max_moves!r} / min_gain={min_gain!r} need old_phy2log")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain={min_gain!r} must be in [0, 1)")
    if old_phy2log is not None:
        old, cnt_old = check_old(old_phy2log, num_layers, num_replicas, num_experts, counts=True)
        budget, total = budget_per_layer(max_moves, num_layers, num_replicas, budget_scope)
    if num_layers == 0:
        phy2log = np.zeros((0, num_replicas), dtype=np.int64)
    elif old_phy2log is not None and policy == "hierarchical":
        if max_moves is not None:
            raise ValueError("max_moves needs policy 'global' or 'auto': hierarchical plans move whole groups")
        fresh = _fresh(w, num_replicas, num_groups, num_nodes, num_gpus, policy, method, hier_ok)[0]
        phy2log = align(old, fresh, num_nodes, num_gpus)
        worse = peak_load(phy2log, w, num_gpus) >= (1 - min_gain) * peak_load(old, w, num_gpus)
        # A layer that sheds duplicates of ``old`` (a foreign plan's) takes the new plan anyway.
        # (Counted as a hierarchical plan must: an expert has only its node's GPUs.)
        per_node = num_gpus // num_nodes
        worse &= avoidable_duplicates_np(phy2log, num_gpus, num_experts, per_node) >= avoidable_duplicates_np(
            old, num_gpus, num_experts, per_node)
        phy2log[worse] = old[worse]
    else:
        fresh, peak, spread = _fresh(w, num_replicas, num_groups, num_nodes, num_gpus, policy, method, hier_ok)
        # With an old placement: incremental, or the fresh plan relabelled where it dominates.
        phy2log = fresh if old_phy2log is None else migrate(w, old, num_gpus, budget, total, min_gain, method, fresh,
                                                            (peak, spread), cnt_old)
    return phy2log


def _fresh(
    w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str, method: str,
    hier_ok: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The from-scratch plan ``phy2log [L, R]`` of ``policy`` for ``w [L, E]`` (see the module docstring),
    its max GPU load per layer ``[L]`` float64, and ``[L]`` bool: the layers solved globally (their
    replicas of an expert are on distinct GPUs unless it has more replicas than GPUs; a hierarchical
    layer keeps an expert on its node's GPUs, so it may stack more).

    Refinement pairs (:func:`~ray_eplb.solver.packing.place_replicas`): 4 per sweep where the
    shape has a hierarchical alternative (groups and nodes fit, several nodes), half the GPUs
    (``max(4, P / 4)``) where it has none. Measured: one-group shapes need the wider pairing to
    reach the greedy's in-window balance (Kimi-K2-like, 64 GPUs: 0.983 with 4 pairs, 0.996 with
    16; the greedy 0.994), while on the trace cases with 32 GPUs and a hierarchical alternative
    it cost 10-20% more time for +0.1-0.4% in-window and -0.3% to +0.1% next-window balance.
    The rule depends on the shape only, so ``auto`` keeps, per layer, exactly the plan of
    ``global`` or of ``hierarchical``.
    """
    pairs = 4 if hier_ok and num_nodes > 1 else None
    num_layers = w.shape[0]
    if policy == "global" or not hier_ok or num_nodes == 1:
        return *_solve(w, num_replicas, 1, 1, num_gpus, method, pairs), np.ones(num_layers, dtype=bool)
    if policy == "hierarchical":
        return *_solve(w, num_replicas, num_groups, num_nodes, num_gpus, method, pairs), np.zeros(num_layers, dtype=bool)
    phy2log, peak = _solve(w, num_replicas, 1, 1, num_gpus, method, pairs)
    spread = np.ones(num_layers, dtype=bool)
    # Hierarchical can only match or beat a layer where its bound (a node's load spread over
    # that node's GPUs, with groups packed as _solve packs them: max node load / GPUs per node)
    # reaches the global max GPU load.
    groups, node_load = _pack_groups(w, num_groups, num_nodes)  # [L, N, G/N], [L, N]
    bound = node_load.max(1) / (num_gpus // num_nodes)  # [L]
    maybe = np.nonzero(bound <= peak)[0]
    if maybe.size:  # (groups are packed row by row: those of the maybe rows are theirs alone)
        hier, hier_peak = _solve(w[maybe], num_replicas, num_groups, num_nodes, num_gpus, method, pairs,
                                 groups[maybe])
        take = hier_peak <= peak[maybe]  # no higher: a tie keeps the locality for free
        phy2log[maybe[take]] = hier[take]
        peak[maybe[take]] = hier_peak[take]
        spread[maybe[take]] = False
    return phy2log, peak, spread


def _pack_groups(w: np.ndarray, num_groups: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups to nodes by balanced rounds: ``[L, N, G/N]`` group ids and ``[L, N]`` node loads."""
    num_layers, num_experts = w.shape
    group_load = w.reshape(num_layers, num_groups, num_experts // num_groups).sum(-1)  # [L, G]
    groups = pack_rounds(group_load, num_nodes)  # [L, N, G/N]
    node_load = np.take_along_axis(group_load, groups.reshape(num_layers, -1), 1).reshape(groups.shape).sum(-1)
    return groups, node_load


def _solve(
    w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, method: str,
    pairs: int | None = None, groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical placement (global = one node, one group).

    ``w``: ``[L, E]`` float64; ``groups``: ``[L, N, G/N]`` from :func:`_pack_groups` if already
    packed. Returns ``phy2log [L, R]`` int64 and the max GPU load per layer
    ``[L]`` float64 (loads split evenly among replicas).
    """
    num_layers, num_experts = w.shape
    n_node = num_experts // num_nodes  # experts per node
    slots_node = num_replicas // num_nodes  # slots per node
    gpus_node = num_gpus // num_nodes  # GPUs per node
    if num_nodes == 1:
        node_experts = None  # every node (the one) holds experts 0..E-1 in order
        node_w = w
    else:
        groups = _pack_groups(w, num_groups, num_nodes)[0] if groups is None else groups  # [L, N, G/N]
        size = num_experts // num_groups
        node_experts = (groups[..., None] * size + np.arange(size)).reshape(num_layers, num_nodes, n_node)
        node_w = w[np.arange(num_layers)[:, None, None], node_experts].reshape(num_layers * num_nodes, n_node)
    slot_owner, gpu_load = counts_and_place(node_w, slots_node, gpus_node, method, pairs)  # [L*N, P/N, S], [L*N, P/N]
    phy2log = slot_owner  # node-local expert ids; map them to logical ids per node
    if node_experts is not None:
        rows = np.arange(num_layers * num_nodes)[:, None, None]
        phy2log = node_experts.reshape(num_layers * num_nodes, n_node)[rows, slot_owner]
    gpu_load = gpu_load.reshape(num_layers, num_gpus)  # [L, P]
    return phy2log.reshape(num_layers, num_replicas), gpu_load.max(1)


def working_memory_bytes(num_layers: int, num_experts: int, num_replicas: int, width: int | None = None) -> int:
    """A floor on the bytes one solve holds at once: the ``log2phy [L, E, width]`` int64 output
    (``width`` default ``R - E + 1``) plus about sixteen ``[L, R]`` int64/float64 working arrays.
    ``rebalance_experts(..., log2phy_width="used")`` passes ``width=1``, the floor of a width not
    known before the plan (``R - E + 1`` would be a bound, but the one the option is there to avoid);
    :func:`place_experts` ``width=0`` (no ``log2phy``)."""
    width = num_replicas - num_experts + 1 if width is None else width
    return 8 * num_layers * (num_experts * width + 16 * num_replicas)


def free_memory_bytes() -> int | None:
    """Physical memory available now (``None`` where the platform does not say)."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
