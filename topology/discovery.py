"""Build a :class:`Topology` from a running Ray cluster (the only Ray import under ``topology/``)."""
from __future__ import annotations

import math
import warnings

from ray_eplb.topology.shape import Topology


def default_slots_per_gpu(num_experts: int, num_gpus: int, redundant_per_gpu: int = 1) -> int:
    """Enough slots for every expert plus ``redundant_per_gpu`` replicas' room per GPU."""
    return math.ceil(num_experts / num_gpus) + redundant_per_gpu


def discover_topology(
    num_experts: int,
    num_layers: int,
    *,
    slots_per_gpu: int | None = None,
    num_groups: int = 1,
    resource: str | None = None,
) -> Topology:
    """One rank per unit of ``resource`` on each alive node of the connected Ray cluster.

    ``resource``: ``"GPU"``, or ``"eplb_rank"`` (the CPU stand-in); ``None`` picks GPU when any
    node has one, else ``eplb_rank``. Nodes with fewer units than the largest node are left out
    (expert parallelism needs equal ranks per node), with a warning.
    """
    import ray

    if not ray.is_initialized():
        raise ValueError("Ray is not initialized: call ray.init() first, or pass a Topology explicitly")
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if resource is None:
        resource = "GPU" if any(n["Resources"].get("GPU", 0) > 0 for n in alive) else "eplb_rank"
    per_node = [int(n["Resources"].get(resource, 0)) for n in alive]
    per_node = [c for c in per_node if c > 0]
    if not per_node:
        raise ValueError(f"no alive Ray node offers the resource {resource!r}; pass a Topology explicitly")
    gpus = max(per_node)
    nodes = sum(c == gpus for c in per_node)
    if nodes != len(per_node):
        warnings.warn(f"{len(per_node) - nodes} node(s) with fewer than {gpus} x {resource} are not used", stacklevel=2)
    if slots_per_gpu is None:
        slots_per_gpu = default_slots_per_gpu(num_experts, nodes * gpus)
    return Topology(
        num_nodes=nodes, gpus_per_node=gpus, slots_per_gpu=slots_per_gpu,
        num_experts=num_experts, num_layers=num_layers, num_groups=num_groups,
    )
