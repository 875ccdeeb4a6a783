"""The controller's metrics: the catalogue of what it exports (name, kind, description, tags), a sink
that drops everything (the plain class outside Ray) and the ``ray.util.metrics`` sink (Prometheus
names get Ray's ``ray_`` prefix; a histogram adds ``_bucket``, ``_sum`` and ``_count``).

Every metric carries the tag ``balancer`` (the balancer's Ray namespace), so two balancers on one
cluster tell apart on one Grafana panel."""
from __future__ import annotations

from typing import Any

#: Every metric the controller exports, with its description (shown by Prometheus and Grafana).
DESCRIPTIONS = {
    "eplb_balancedness": "GPU-level balancedness (mean/max) of the current placement on the recent load window",
    "eplb_layer_balancedness": "balancedness (mean/max GPU load) of each MoE layer on the recent load window",
    "eplb_rank_load": "tokens routed to each rank over the recent load window, summed over layers",
    "eplb_epoch": "epoch of the placement the workers serve",
    "eplb_solve_seconds": "seconds each solve took",
    "eplb_swap_seconds": "seconds each committed swap took (plan, prepare, commit, publish)",
    "eplb_phase_seconds": "seconds each run of a controller phase took",
    "eplb_swap_progress": "fraction of the transfer batches of the current (or last) swap staged so far",
    "eplb_swap_batch": "transfer batches of the current (or last) swap staged so far",
    "eplb_rebalances_total": "committed rebalances",
    "eplb_experts_moved_total": "expert slots whose weights were moved",
    "eplb_bytes_moved_total": "expert weight bytes the workers fetched from peers or loaded, over committed swaps",
    "eplb_swap_batches": "transfer batches of the current (or last) swap (no rank sends or receives more than a cap per batch)",
    "eplb_aborts_total": "rebalances aborted (a worker failed or missed a deadline)",
    "eplb_heals_total": "times ranks found on another map than the one in force were brought back onto it",
    "eplb_telemetry_rejected_total": "telemetry replies left out of a round because they failed validation, by rank",
}

#: How each metric is exported: gauge (last value), counter (monotone total) or histogram.
KINDS = {name: "counter" if name.endswith("_total") else "gauge" for name in DESCRIPTIONS}
KINDS.update({"eplb_solve_seconds": "histogram", "eplb_swap_seconds": "histogram", "eplb_phase_seconds": "histogram"})

#: Tags of each metric beside ``balancer``.
TAGS: dict[str, tuple[str, ...]] = {
    "eplb_layer_balancedness": ("layer",),
    "eplb_rank_load": ("rank",),
    "eplb_phase_seconds": ("phase",),
    "eplb_telemetry_rejected_total": ("rank",),
}
INSTANCE_TAG = "balancer"

#: Histogram bucket upper bounds, seconds: from a millisecond solve to a multi-minute swap.
BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

#: Phases the controller times (``eplb_phase_seconds``' ``phase`` tag).
PHASES = ("collect", "aggregate", "forecast", "decide", "solve", "prepare", "publish")


class RayMetrics:
    """``ray.util.metrics`` gauges, counters and histograms, one per catalogue entry, each tagged
    with ``balancer=<namespace>``.

    Ray (2.60 measured) drops a gauge from the Prometheus endpoint a few seconds after its last
    ``set``, so :meth:`refresh` sets every gauge's last value again; the controller calls it each round.
    """

    def __init__(self, instance: str = "ray_eplb") -> None:
        from ray.util import metrics

        self.instance = instance
        self._metrics: dict[str, Any] = {}
        for name, kind in KINDS.items():
            keys = (INSTANCE_TAG, *TAGS.get(name, ()))
            desc = DESCRIPTIONS[name]
            if kind == "gauge":
                m = metrics.Gauge(name, description=desc, tag_keys=keys)
            elif kind == "counter":
                m = metrics.Counter(name, description=desc, tag_keys=keys)
            else:
                m = metrics.Histogram(name, description=desc, boundaries=BOUNDARIES, tag_keys=keys)
            m.set_default_tags({INSTANCE_TAG: instance})
            self._metrics[name] = m
        self._last: dict[tuple[str, tuple], tuple[float, dict | None]] = {}  # (name, tags) -> value, tags

    def register(self, num_layers: int, num_ranks: int) -> None:
        """Export every gauge and counter at zero (every layer and rank), so each series exists from
        the start: a dashboard shows 0 aborts, not "no data", until the first one. Histograms appear
        with their first observation (a zero observation would count as a solve that never ran)."""
        for name, kind in KINDS.items():
            keys = TAGS.get(name, ())
            values = {"layer": range(num_layers), "rank": range(num_ranks), "phase": PHASES}
            tag_sets = [{k: str(v)} for k in keys for v in values[k]] or [None]
            for tags in tag_sets:
                if kind == "gauge":
                    self.gauge(name, 0.0, tags)
                elif kind == "counter":
                    self.count(name, 0.0, tags)

    def gauge(self, name: str, value: float, tags: dict | None = None) -> None:
        """Record ``value``: a gauge keeps it as the last value, a histogram adds an observation."""
        if KINDS.get(name) == "histogram":
            self.observe(name, value, tags)
            return
        self._metrics[name].set(float(value), tags=tags)
        self._last[(name, tuple(sorted((tags or {}).items())))] = (float(value), tags)

    def observe(self, name: str, value: float, tags: dict | None = None) -> None:
        self._metrics[name].observe(float(value), tags=tags)

    def refresh(self) -> None:
        for (name, _), (value, tags) in self._last.items():
            self._metrics[name].set(value, tags=tags)

    def count(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        if value > 0:
            self._metrics[name].inc(float(value), tags=tags)
        elif value == 0:
            # Counter.inc refuses 0; recording a 0 point (what inc does underneath) exports the series at 0.
            self._metrics[name]._record(0.0, tags=tags)


class NullMetrics:
    """Metrics sink that drops everything (the plain class outside Ray)."""

    def gauge(self, name: str, value: float, tags: dict | None = None) -> None:
        pass

    def observe(self, name: str, value: float, tags: dict | None = None) -> None:
        pass

    def count(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        pass

    def refresh(self) -> None:
        pass
