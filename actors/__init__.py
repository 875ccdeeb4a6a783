"""ray_eplb.actors: the per-GPU expert worker (plain class + Ray factory), the router, weight sources.

Importing this package does not import Ray; :mod:`ray_eplb.actors.ray_worker` and the Router do,
when used.
"""
from ray_eplb.actors.hf_checkpoint import HFCheckpointSource, MoeSpec
from ray_eplb.actors.weights import SafetensorsWeightSource, SyntheticWeightSource, WeightSource, swiglu, write_checkpoint
from ray_eplb.actors.worker import ExpertWorker, StaleEpochError, Transfer, local_fetcher

__all__ = [
    "ExpertWorker",
    "HFCheckpointSource",
    "MoeSpec",
    "SafetensorsWeightSource",
    "StaleEpochError",
    "SyntheticWeightSource",
    "Transfer",
    "WeightSource",
    "local_fetcher",
    "swiglu",
    "write_checkpoint",
]
