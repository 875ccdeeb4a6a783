"""The controller's metrics: the catalogue of what it exports, a sink that drops everything (the
plain class outside Ray) and the ``ray.util.metrics`` sink (Prometheus names get Ray's ``ray_``
prefix)."""
from __future__ import annotations

from typing import Any

#: Every metric the controller exports, with its description (shown by Prometheus and Grafana).
DESCRIPTIONS = {
    "eplb_balancedness": "GPU-level balancedness (mean/max) of the current placement on the recent load window",
    "eplb_epoch": "epoch of the placement the workers serve",
    "eplb_solve_seconds": "seconds the last solve took",
    "eplb_swap_seconds": "seconds the last committed swap took (plan, prepare, commit, publish)",
    "eplb_phase_seconds": "seconds the last run of each controller phase took",
    "eplb_rebalances_total": "committed rebalances",
    "eplb_experts_moved_total": "expert slots whose weights were moved",
    "eplb_bytes_moved_total": "expert weight bytes the workers fetched from peers or loaded, over committed swaps",
    "eplb_swap_batches": "transfer batches of the last committed swap (no rank sends or receives more than a cap per batch)",
    "eplb_aborts_total": "rebalances aborted (a worker failed or missed a deadline)",
    "eplb_heals_total": "times ranks found on another map than the one in force were brought back onto it",
    "eplb_telemetry_rejected_total": "telemetry replies left out of a round because they failed validation, by rank",
}


class RayMetrics:
    """``ray.util.metrics`` gauges and counters, created on first use (Prometheus names get ``ray_``).

    Ray (2.60 measured) drops a gauge from the Prometheus endpoint a few seconds after its last
    ``set``, so :meth:`refresh` sets every gauge's last value again; the controller calls it each round.
    """

    def __init__(self) -> None:
        from ray.util import metrics

        self._m = metrics
        self._gauges: dict[str, Any] = {}
        self._counters: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple], tuple[float, dict | None]] = {}  # (name, tags) -> value, tags

    def gauge(self, name: str, value: float, tags: dict | None = None) -> None:
        if name not in self._gauges:
            self._gauges[name] = self._m.Gauge(name, description=DESCRIPTIONS.get(name, name), tag_keys=tuple(tags or ()))
        self._gauges[name].set(float(value), tags=tags)
        self._last[(name, tuple(sorted((tags or {}).items())))] = (float(value), tags)

    def refresh(self) -> None:
        for (name, _), (value, tags) in self._last.items():
            self._gauges[name].set(value, tags=tags)

    def count(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        if name not in self._counters:
            self._counters[name] = self._m.Counter(name, description=DESCRIPTIONS.get(name, name), tag_keys=tuple(tags or ()))
        if value > 0:
            self._counters[name].inc(float(value), tags=tags)


class NullMetrics:
    """Metrics sink that drops everything (the plain class outside Ray)."""

    def gauge(self, name: str, value: float, tags: dict | None = None) -> None:
        pass

    def count(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        pass

    def refresh(self) -> None:
        pass
