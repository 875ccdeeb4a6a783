"""The Ray side of the controller: one factory that turns :class:`EplbController` into the named,
restartable, zero-CPU async actor ``ray_eplb_controller`` (namespace ``ray_eplb``)."""
from __future__ import annotations

from typing import Any

from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.controller import EplbController
from ray_eplb.topology import Placement, Topology

CONTROLLER_NAME = "ray_eplb_controller"
NAMESPACE = "ray_eplb"

_DESCRIPTIONS = {
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
            self._gauges[name] = self._m.Gauge(name, description=_DESCRIPTIONS.get(name, name), tag_keys=tuple(tags or ()))
        self._gauges[name].set(float(value), tags=tags)
        self._last[(name, tuple(sorted((tags or {}).items())))] = (float(value), tags)

    def refresh(self) -> None:
        for (name, _), (value, tags) in self._last.items():
            self._gauges[name].set(value, tags=tags)

    def count(self, name: str, value: float = 1.0) -> None:
        if name not in self._counters:
            self._counters[name] = self._m.Counter(name, description=_DESCRIPTIONS.get(name, name))
        if value > 0:
            self._counters[name].inc(float(value))


class ControllerActor(EplbController):
    """:class:`EplbController` with Ray metrics; its repr names it on the dashboard's Actors page.
    Workers are looked up by name (``ray_eplb_worker_<rank>``), so the creation task carries no actor
    handles (Ray keeps those in the object store, which would make a restart fragile).
    ``seed``: ``(phy2log as nested lists, epoch)`` or ``None``."""

    def __init__(self, topology: Topology, namespace: str, config: ControllerConfig, seed: Any = None):
        import ray

        from ray_eplb.actors.ray_worker import WORKER_NAME

        from ray_eplb.actors.ray_worker import _quiet_zero_copy_warnings

        _quiet_zero_copy_warnings()
        placement = None
        if seed is not None:
            import torch

            placement = Placement.from_phy2log(topology, torch.tensor(seed[0], dtype=torch.int64), seed[1])
        workers = [ray.get_actor(WORKER_NAME.format(rank=r), namespace=namespace) for r in range(topology.num_gpus)]
        super().__init__(topology, workers, config, placement, metrics=RayMetrics())

    def __repr__(self) -> str:
        t = self.topology
        return (
            f"EplbController(ranks={t.num_gpus}, nodes={t.num_nodes}, slots={t.num_slots}, experts={t.num_experts}, "
            f"layers={t.num_layers}, trigger={self.config.trigger}, interval={self.config.interval_s}s)"
        )


def start_controller(
    topology: Topology,
    config: ControllerConfig | None = None,
    placement: Placement | None = None,
    *,
    start_loop: bool = True,
    namespace: str = NAMESPACE,
) -> Any:
    """Create the controller actor over the named workers of ``namespace`` (see
    :func:`~ray_eplb.actors.ray_worker.launch_workers`) and, with ``start_loop``, start its control
    loop. Returns the handle.

    Ray restarts the actor forever; it then re-reads the placement from the workers (``recover``),
    so ``placement`` only seeds the very first start (passed as a plain list, small enough to stay
    inline in the actor's creation task, which a restart needs)."""
    import ray

    seed = None if placement is None else (placement.phy2log.tolist(), placement.epoch)
    handle = (
        ray.remote(ControllerActor)
        .options(name=CONTROLLER_NAME, namespace=namespace, num_cpus=0, max_restarts=-1, max_concurrency=1000)
        .remote(topology, namespace, config or ControllerConfig(), seed)
    )
    if not ray.get(handle.recover.remote()):
        raise RuntimeError("the controller could not read a consistent placement from the workers")
    if start_loop:
        ray.get(handle.start.remote())
    return handle
