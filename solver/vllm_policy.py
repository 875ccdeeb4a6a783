"""ray-eplb's solver as a vLLM EPLB policy (no vLLM import: vLLM looks the class up by name).

vLLM's contract: a class whose classmethod
``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None)``
returns ``physical_to_logical_map [L, R]``, an integer tensor on the CPU (vLLM checks the device),
registered under a name in ``vllm.distributed.eplb.policy.EPLB_POLICIES`` and in the ``Literal``
``EPLBPolicyOption`` of ``vllm/config/parallel.py`` (the two must list the same names).

Given the current map (``old_global_expert_indices``, vLLM's ``physical_to_logical_map`` ``[L, R]``),
the plan is migration-aware: it keeps every slot it can and moves only what pays
(:mod:`ray_eplb.solver.migration`), optionally under a per-layer move budget.
"""
from __future__ import annotations

import torch

from ray_eplb.solver.rebalance import POLICIES, place_experts


class RayEplbPolicy:
    """vLLM EPLB policy backed by :func:`ray_eplb.solver.place_experts` (``rebalance_experts``' plan).

    Settings are class attributes (vLLM calls the class, never an instance); make a variant with
    :meth:`configured`, e.g. ``RayEplbPolicy.configured(max_moves=0.25)``.

    Attributes:
        policy: ``"auto"`` | ``"global"`` | ``"hierarchical"`` (see :mod:`ray_eplb.solver.rebalance`).
        method: replica-count rule, ``"hybrid_tail"`` or ``"dhondt"``.
        max_moves: with an old map, at most this many slots change per layer (int) or this
            fraction of them (float in (0, 1]); ``None``: no limit.
        min_gain: a layer whose max GPU load would fall by less than this fraction keeps its map.
    """

    policy: str = "auto"
    method: str = "hybrid_tail"
    max_moves: int | float | None = None
    min_gain: float = 0.0

    @classmethod
    def configured(cls, **settings: object) -> type[RayEplbPolicy]:
        """A subclass with other settings (``policy``, ``method``, ``max_moves``, ``min_gain``)."""
        unknown = set(settings) - {"policy", "method", "max_moves", "min_gain"}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: policy, method, max_moves, min_gain")
        if "policy" in settings and settings["policy"] not in POLICIES:
            raise ValueError(f"policy={settings['policy']!r} is not one of {POLICIES}")
        return type(cls.__name__, (cls,), dict(settings))

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Place ``num_replicas`` slots per layer on ``num_ranks`` ranks.

        Args:
            weight: ``[L, E]`` load per logical expert (a ``[W, L, E]`` window is summed over ``W``).
            num_replicas: ``R``, slots per layer; ``R >= E``, a multiple of ``num_ranks``.
            num_groups: expert groups; ``0`` or ``None`` (a model without groups) means one.
            num_nodes: nodes; ``num_ranks`` is a multiple of it.
            num_ranks: EP ranks (GPUs); rank ``g`` holds slots ``[g*R/num_ranks, (g+1)*R/num_ranks)``.
            old_global_expert_indices: ``[L, R]`` the current ``physical_to_logical_map``, or
                ``None``. Used (migration-aware plan) when it has this shape and gives every
                expert a slot; otherwise (e.g. the slot count changed with the EP size) the plan
                is solved afresh.

        Returns:
            ``physical_to_logical_map [L, R]`` int64 on the CPU: the logical expert of each slot;
            every expert has at least one slot.
        """
        weight = torch.as_tensor(weight).detach().cpu()
        if weight.dim() == 3:
            weight = weight.sum(0)
        if weight.dim() != 2:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [L, E] (or [W, L, E])")
        groups = 1 if not num_groups or num_groups < 0 else int(num_groups)
        old = cls._usable_old(old_global_expert_indices, weight.shape, num_replicas)
        phy2log = place_experts(  # vLLM takes phy2log only: no log2phy is built
            weight.to(torch.float64), num_replicas, groups, num_nodes, num_ranks,
            policy=cls.policy, method=cls.method, old_phy2log=old,
            max_moves=cls.max_moves if old is not None else None,
            min_gain=cls.min_gain if old is not None else 0.0,
        )
        return phy2log.to(device="cpu", dtype=torch.int64).contiguous()

    @staticmethod
    def _usable_old(old: torch.Tensor | None, shape: torch.Size, num_replicas: int) -> torch.Tensor | None:
        """``old`` as int64 ``[L, R]`` when it is a valid map for this layer count and slot count, else ``None``."""
        if old is None:
            return None
        old = torch.as_tensor(old).detach().cpu()
        num_layers, num_experts = shape
        if tuple(old.shape) != (num_layers, num_replicas) or old.dtype.is_floating_point or old.dtype == torch.bool:
            return None
        old = old.to(torch.int64)
        if old.numel() and (int(old.min()) < 0 or int(old.max()) >= num_experts):
            return None
        counts = torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(1, old, torch.ones_like(old))
        return old if bool((counts > 0).all()) else None
