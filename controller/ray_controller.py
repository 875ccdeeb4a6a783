"""The Ray side of the controller: one factory that turns :class:`EplbController` into the named,
restartable, zero-CPU async actor ``ray_eplb_controller`` (namespace ``ray_eplb``), whose epochs
go through the balancer's store in Ray's GCS (:class:`~ray_eplb.actors.map_store.MapStore`)."""
from __future__ import annotations

import logging
import sys
from typing import Any

from ray_eplb.actors.names import CONTROLLER_NAME, NAMESPACE, WORKER_NAME
from ray_eplb.controller.balancer import EplbController
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.metrics import RayMetrics
from ray_eplb.topology import Placement, Topology


class RayEplbController(EplbController):
    """:class:`EplbController` with Ray metrics; its repr names it on the dashboard's Actors page.
    Workers are looked up by name (``ray_eplb_worker_<rank>``), so the creation task carries no actor
    handles (Ray keeps those in the object store, which would make a restart fragile).
    ``seed``: ``(phy2log as nested lists, epoch)`` or ``None``: the placement of a fresh start. After
    a restart by Ray it takes the committed map from the store instead, and runs its control loop
    again if it was running (:meth:`resume`, called by itself once it is up)."""

    def __init__(self, topology: Topology, namespace: str, config: ControllerConfig, seed: Any = None):
        import threading
        import time

        import ray

        from ray_eplb.actors.map_store import MapStore
        from ray_eplb.actors.ray_worker import quiet_zero_copy_warnings

        quiet_zero_copy_warnings()
        _log_to_stderr()
        placement = None
        if seed is not None:
            import torch

            placement = Placement.from_phy2log(topology, torch.tensor(seed[0], dtype=torch.int64), seed[1])
        workers = [ray.get_actor(WORKER_NAME.format(rank=r), namespace=namespace) for r in range(topology.num_gpus)]
        restart = ray.get_runtime_context().was_current_actor_reconstructed
        self.namespace = namespace
        metrics = RayMetrics(namespace)
        metrics.register(topology.num_layers, topology.num_gpus)
        _log_to_stderr()
        super().__init__(topology, workers, config, placement, metrics=metrics, store=MapStore(namespace),
                         restart=restart)
        if restart:  # nobody else will call us: resume once the actor is up (a call from __init__ is lost)
            me = ray.get_runtime_context().current_actor

            def resume_later() -> None:
                time.sleep(0.2)
                me.resume.remote()

            threading.Thread(target=resume_later, name="eplb-resume", daemon=True).start()

    async def step(self, force: bool = False, fresh: bool = False) -> dict:
        """:meth:`EplbController.step`, then the round goes on the timeline and the per-layer and
        per-rank views are exported (:meth:`~ray_eplb.controller.operations.Operations.observe_round`)."""
        rec = await super().step(force=force, fresh=fresh)
        self.observe_round(rec)
        return rec

    def __repr__(self) -> str:
        t = self.topology
        return (
            f"{type(self).__name__}(ranks={t.num_gpus}, nodes={t.num_nodes}, slots={t.num_slots}, experts={t.num_experts}, "
            f"layers={t.num_layers}, trigger={self.config.trigger}, interval={self.config.interval_s}s)"
        )


def _log_to_stderr() -> None:
    """INFO lines of ``ray_eplb.*`` (one per committed, aborted and healed epoch) to the actor's
    stderr, which the dashboard shows behind the Actors page's Log link."""
    import logging

    logger = logging.getLogger("ray_eplb")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def start_controller(
    topology: Topology,
    config: ControllerConfig | None = None,
    placement: Placement | None = None,
    *,
    start_loop: bool = True,
    namespace: str = NAMESPACE,
    lifetime: str | None = None,
) -> Any:
    """Create the controller actor over the named workers of ``namespace`` (see
    :func:`~ray_eplb.actors.ray_worker.launch_workers`) and, with ``start_loop``, start its control
    loop. Returns the handle.

    Ray restarts the actor forever; it then takes the committed map from the balancer's store and
    resumes its loop, so ``placement`` only seeds the very first start (passed as a plain list, small
    enough to stay inline in the actor's creation task, which a restart needs).

    ``lifetime="detached"``: the actor outlives the driver that created it (a standing balancer,
    :mod:`ray_eplb.controller.service`); ``None``: it dies with its driver."""
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime={lifetime!r} must be None or 'detached'")
    import ray

    seed = None if placement is None else (placement.phy2log.tolist(), placement.epoch)
    handle = (
        ray.remote(RayEplbController)
        .options(name=CONTROLLER_NAME, namespace=namespace, num_cpus=0, max_restarts=-1, max_concurrency=1000,
                 lifetime=lifetime)
        .remote(topology, namespace, config or ControllerConfig(), seed)
    )
    if not ray.get(handle.recover.remote()):
        raise RuntimeError(f"the controller could not record its placement: {ray.get(handle.status.remote()).recovery}")
    if start_loop:
        ray.get(handle.start.remote())
    return handle


def _log_to_stderr() -> None:
    """Send the balancer's INFO lines (one per committed and aborted epoch) to the actor's stderr,
    which Ray keeps as the actor's log (the Log link on the dashboard's Actors page)."""
    log = logging.getLogger("ray_eplb")
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_eplb", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._eplb = True  # type: ignore[attr-defined]
        log.addHandler(handler)
