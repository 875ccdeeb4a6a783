"""ray_eplb.controller: the control plane. The named controller actor collects per-slot load from
the workers, forecasts it, decides when to rebalance, solves, plans the transfers and pushes the new
placement to the workers in a two-phase, epoch-versioned swap.

What a user calls, importable from here: :func:`start_controller`, :class:`ControllerConfig`,
:class:`ControllerStatus` (what ``report()`` returns),
:class:`EplbController` (the plain class, usable without Ray), :class:`RayEplbController`,
:class:`Forecaster`. Names are imported on first use, so ``import ray_eplb.controller`` does not
import Ray. The tools around the control plane live in :mod:`ray_eplb.controller.cli` (the
``ray-eplb`` command and the live demo) and :mod:`ray_eplb.controller.bench` (the benchmarks).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "start_controller": "ray_controller",
    "RayEplbController": "ray_controller",
    "EplbController": "balancer",
    "ControllerConfig": "config",
    "ControllerStatus": "status",
    "Forecaster": "forecast",
    "CONTROLLER_NAME": None,
    "NAMESPACE": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    path = "ray_eplb.actors.names" if module is None else f"{__name__}.{module}"
    value = getattr(importlib.import_module(path), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
