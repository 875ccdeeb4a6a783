"""ray_eplb.solver: pure torch expert-placement solver (no Ray, no I/O).

Public API:
    replica_counts(weight [X, n], num_phy, method="hybrid_tail") -> counts [X, n]
    rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus, *, policy, method)
        -> (phy2log [L, R], log2phy [L, E, R-E+1], logcnt [L, E])
    balancedness / balancedness_per_layer / gpu_loads / duplicate_pairs (metrics)
    logical_maps(phy2log, num_experts) -> (log2phy, logcnt)
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
from ray_eplb.solver.rebalance import rebalance_experts

__all__ += ["replica_counts", "rebalance_experts"]
