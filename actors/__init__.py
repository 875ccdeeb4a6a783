"""ray_eplb.actors: the per-GPU expert worker (a plain class, and its Ray actor), the router that
dispatches tokens to the workers, and the weight sources the workers load experts from.

What a user calls, importable from here: :func:`launch_workers`, :class:`Router`,
:class:`ExpertWorker`, the weight sources, and the shared actor names. Every name is imported on
first use, so ``import ray_eplb.actors`` imports neither Ray nor torch until something is used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "launch_workers": "ray_worker",
    "WorkerGroup": "ray_worker",
    "RayExpertWorker": "ray_worker",
    "enable_zero_copy": "ray_worker",
    "quiet_zero_copy_warnings": "ray_worker",
    "Router": "router",
    "LocalRouter": "router",
    "route": "router",
    "ExpertWorker": "worker",
    "StaleEpochError": "worker",
    "Transfer": "worker",
    "local_fetcher": "worker",
    "WeightSource": "weights",
    "SyntheticWeightSource": "weights",
    "SafetensorsWeightSource": "weights",
    "swiglu": "weights",
    "write_checkpoint": "weights",
    "HFCheckpointSource": "hf_checkpoint",
    "MoeSpec": "hf_checkpoint",
    "attach": "hf_attach",
    "NAMESPACE": "names",
    "WORKER_NAME": "names",
    "CONTROLLER_NAME": "names",
    "RANK_RESOURCE": "names",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
