"""ray_eplb.solver: pure torch expert-placement solver (no Ray, no I/O).

Public API:
    replica_counts(weight [X, n], num_phy, method="hybrid_tail") -> counts [X, n]
    rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus, *, policy, method,
                      old_phy2log, max_moves, budget_scope, min_gain, log2phy_width="full")
        -> (phy2log [L, R], log2phy [L, E, M], logcnt [L, E])
        M = R-E+1 with log2phy_width="full" (DeepSeek's shape, the default), the most replicas any
        expert has with "used" (the same entries without all -1 columns), or a given int
    place_experts(same arguments, without log2phy_width) -> phy2log [L, R]: the plan alone
    balancedness / balancedness_per_layer / gpu_loads / duplicate_pairs (metrics)
    logical_maps(phy2log [L, R], num_experts, width=None) -> (log2phy [L, E, M], logcnt [L, E])
"""
from ray_eplb.solver.maps import logical_maps
from ray_eplb.solver.metrics import balancedness, balancedness_per_layer, duplicate_pairs, gpu_loads

__all__ = [
    "balancedness",
    "balancedness_per_layer",
    "duplicate_pairs",
    "gpu_loads",
    "logical_maps",
]
from ray_eplb.solver.counts import replica_counts
from ray_eplb.solver.rebalance import place_experts, rebalance_experts

__all__ += ["place_experts", "replica_counts", "rebalance_experts"]


def _warm_up_migration() -> None:
    """Compile (or load from numba's cache) the migration-aware planner's kernels now, on tiny plans,
    so the first migration-aware call of a process (a controller's first round) pays no compile.
    The fresh solve's kernels are warmed up by :mod:`ray_eplb.solver.compiled`."""
    import torch

    from ray_eplb.solver import compiled

    if not compiled.ENABLED:
        return
    weight = torch.tensor([[9.0, 5.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]] * 2)  # [L=2, E=8]
    old = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]] * 2)  # [L, R=12]: expert 0 twice on GPU 0
    for max_moves in (None, 0.25):
        rebalance_experts(weight, 12, 2, 2, 4, old_phy2log=old, max_moves=max_moves)


try:
    _warm_up_migration()
except Exception as exc:  # noqa: BLE001 (a numba that cannot compile these must not break the solver)
    import warnings

    warnings.warn(f"ray_eplb.solver: warming up the migration-aware kernels failed ({type(exc).__name__}: {exc}); "
                  "they compile on first use", RuntimeWarning, stacklevel=1)
