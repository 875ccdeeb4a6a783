"""ray_eplb.topology: typed value objects for the cluster shape and for placements.

No Ray import here except inside :func:`discover_topology` (imported lazily).
"""
from ray_eplb.topology.shape import Topology
from ray_eplb.topology.placement import Placement, plan

__all__ = ["Topology", "Placement", "plan"]
