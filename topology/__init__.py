"""ray_eplb.topology: typed value objects for the cluster shape and for placements.

No Ray import here except inside :func:`discover_topology` (imported lazily).
"""
from ray_eplb.topology.placement import MapId, Placement, plan
from ray_eplb.topology.shape import Topology

__all__ = ["MapId", "Topology", "Placement", "plan"]


def __getattr__(name: str):
    # Lazy: importing ray_eplb.topology must not import Ray; discover_topology imports it when called.
    if name == "discover_topology":
        from ray_eplb.topology.discovery import discover_topology

        return discover_topology
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
