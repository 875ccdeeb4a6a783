"""The Ray side of the worker: one factory that turns :class:`ExpertWorker` into named actors,
placed with one placement group per topology node so the ranks of a node share a Ray node.

Rank resources: ``GPU`` when the cluster has GPUs (the actor then computes on cuda), else the custom
resource ``eplb_rank`` when the nodes declare it (the demo's stand-in for GPUs: ``gpus_per_node`` of
it per node, so two nodes' groups can never pack onto one Ray node), else a sliver of ``CPU``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from ray_eplb.actors.names import CONTROLLER_NAME, NAMESPACE, RANK_RESOURCE, WORKER_NAME
from ray_eplb.actors.protocol import pack_reply, unpack_reply
from ray_eplb.actors.weights import WeightSource
from ray_eplb.actors.worker import ExpertWorker
from ray_eplb.topology import Placement, Topology

__all__ = [  # the names are re-exported for callers that start workers from here
    "CONTROLLER_NAME", "NAMESPACE", "RANK_RESOURCE", "WORKER_NAME", "RayExpertWorker", "RayFetcher", "WorkerGroup",
    "enable_zero_copy", "launch_workers", "quiet_zero_copy_warnings", "rank_resource",
]
ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
#: Name of the placement group of topology node ``node`` of a detached deployment in ``namespace``.
PLACEMENT_GROUP_NAME = "ray_eplb_{namespace}_node{node}"


class RayFetcher:
    """Peer transfers through Ray's object store: one ``export`` call per source rank, all in flight
    together. The source returns the weights as :func:`pack_reply` pieces (Ray writes them into the
    store as the reply; measured ~3x faster here than a ``ray.put`` inside the actor); the receiver
    maps them zero-copy (:func:`unpack_reply`) and, on a cpu worker, serves from them as they are
    (``zero_copy``: each reply is an immutable object nobody else writes; see :meth:`Staging.borrow`)."""

    zero_copy = True

    def __init__(self, namespace: str = NAMESPACE):
        self.namespace = namespace
        self._handles: dict[int, Any] = {}

    def handle(self, rank: int) -> Any:
        if rank not in self._handles:
            self._handles[rank] = ray.get_actor(WORKER_NAME.format(rank=rank), namespace=self.namespace)
        return self._handles[rank]

    def __call__(self, requests: dict[int, list[tuple[int, int]]], timeout_s: float) -> dict[int, list[torch.Tensor]]:
        refs = {r: self.handle(r).export.remote(items) for r, items in requests.items()}
        values = ray.get(list(refs.values()), timeout=timeout_s)
        return {r: unpack_reply(v) for r, v in zip(refs, values)}


class RayExpertWorker(ExpertWorker):
    """:class:`ExpertWorker` inside a Ray actor: peers fetched by name, Ray node in its repr.

    Two concurrency groups: the default one serves ``forward``, telemetry and the quick protocol
    calls; ``swap`` runs ``prepare`` (which waits on peers) and peers' ``export`` calls. A swap can
    therefore never take the threads dispatches need.
    """

    def __init__(self, rank: int, topology: Any, experts: torch.Tensor, source: WeightSource, *,
                 namespace: str = NAMESPACE, epoch: int = 0, digest: str | None = None, **kwargs: Any):
        quiet_zero_copy_warnings()
        self.restored = "launch"
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted us: our weights and epoch died with the old process. Come back on the
            # committed map (loaded from the weight source), read from the balancer's store: no
            # waiting for the controller, which may be restarting too.
            experts, epoch, digest, self.restored = _committed_map(namespace, topology, rank, experts, epoch, digest)
        super().__init__(rank, topology, experts, source, fetcher=RayFetcher(namespace), epoch=epoch, digest=digest,
                         **kwargs)
        self.node_id = ray.get_runtime_context().get_node_id()
        if kwargs.get("stage_borrow_bytes") is None:
            # The ranks of a node share its object store: together they pin at most half of it.
            store = next((n["Resources"].get("object_store_memory", 0) for n in ray.nodes()
                          if n["NodeID"] == self.node_id), 0)
            if store:
                share = int(0.5 * store / topology.gpus_per_node)
                self.staging.borrow_bytes = min(self.staging.borrow_bytes, share)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", ray_node={self.node_id[:8]})"

    def state(self) -> dict:
        return {**super().state(), "restored": self.restored}

    def node(self) -> str:
        return self.node_id

    @ray.method(concurrency_group="swap")
    def prepare(self, *args: Any, **kwargs: Any) -> dict:
        return super().prepare(*args, **kwargs)

    @ray.method(concurrency_group="swap")
    def export(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        """:meth:`ExpertWorker.export` in the wire format (:func:`pack_reply`)."""
        return pack_reply(super().export(*args, **kwargs))


@dataclass
class WorkerGroup:
    """The launched workers: ``handles[rank]``, the placement groups (one per node), the device."""

    topology: Topology
    handles: list[Any]
    placement_groups: list[Any] = field(default_factory=list)
    device: str = "cpu"

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for h in self.handles:
            ray.kill(h)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def rank_resource(device: str = "auto") -> str:
    """Which resource one rank takes: ``GPU``, ``eplb_rank`` or ``CPU`` (see the module docstring)."""

    total = ray.cluster_resources()
    if device == "cuda" or (device == "auto" and total.get("GPU", 0) > 0):
        return "GPU"
    return RANK_RESOURCE if total.get(RANK_RESOURCE, 0) > 0 else "CPU"


def launch_workers(
    topology: Topology,
    placement: Placement,
    source: WeightSource,
    *,
    device: str = "auto",
    namespace: str = NAMESPACE,
    max_concurrency: int = 4,
    gpu_fraction: float = 1.0,
    stage_nice: int | None = None,
    stage_duty: float = 0.25,
    ready_timeout_s: float = 180.0,
    max_restarts: int = -1,
    worker_cls: type | None = None,
    resource: str | None = None,
    lifetime: str | None = None,
) -> WorkerGroup:
    """Start one named worker actor per rank of ``topology`` holding ``placement``'s slots.

    ``device``: ``auto`` (cuda on a GPU cluster, else cpu), ``cuda`` or ``cpu``. Workers are
    threaded actors (``max_concurrency``) so staging a swap never blocks dispatches. Ray restarts a
    dead worker up to ``max_restarts`` times (-1: always); it comes back on the controller's
    placement in force, its slots loaded from ``source`` (see :class:`RayExpertWorker`), and the
    controller aborts a round it could not join. ``gpu_fraction`` < 1 lets several ranks share a GPU
    (a demo of 8 ranks on one GPU). ``stage_nice``, ``stage_duty``: see :class:`ExpertWorker`.
    ``worker_cls``: a subclass of :class:`RayExpertWorker` to run instead (the runtime benchmark adds
    its measuring calls that way); default :class:`RayExpertWorker`.
    ``resource``: what one rank takes, ``GPU``, ``eplb_rank`` or ``CPU`` (default: :func:`rank_resource`;
    ``CPU``, a sliver each, lets a second group run beside one that holds every rank slot).
    ``lifetime="detached"``: the workers and their placement groups (named ``ray_eplb_<namespace>_node<i>``)
    outlive the driver that launched them (a standing balancer, see :mod:`ray_eplb.controller.service`).
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r} must be auto, cuda or cpu")
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction={gpu_fraction} must lie in (0, 1]")
    if resource not in (None, "GPU", RANK_RESOURCE, "CPU"):
        raise ValueError(f"resource={resource!r} must be GPU, {RANK_RESOURCE} or CPU")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime={lifetime!r} must be None or 'detached'")
    res = resource or rank_resource(device)
    amount = {"GPU": gpu_fraction, "CPU": 0.01}.get(res, 1.0)
    bundle = {res: amount}
    _check_capacity(topology, res, amount, device)
    pgs = []
    for node in range(topology.num_nodes):
        named = {} if lifetime is None else {"name": PLACEMENT_GROUP_NAME.format(namespace=namespace, node=node),
                                             "lifetime": lifetime}
        pg = placement_group([dict(bundle) for _ in range(topology.gpus_per_node)], strategy="STRICT_PACK", **named)
        pgs.append(pg)
    try:
        ray.get([pg.ready() for pg in pgs], timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util.placement_group import remove_placement_group

        for pg in pgs:
            remove_placement_group(pg)
        free = ray.available_resources().get(res, 0.0)
        raise RuntimeError(
            f"workers not placed within {ready_timeout_s:g} s: {topology.num_nodes} node(s) x {topology.gpus_per_node} "
            f"ranks need {topology.gpus_per_node * amount:g} {res} together on each node, {topology.num_gpus * amount:g} "
            f"in all; the cluster has {free:g} {res} free now (others hold the rest, or nodes are missing)"
        ) from None
    # On GPU ranks "auto" resolves to cuda inside the actor; Ray's logical GPUs without a CUDA
    # device behind them (tests, fake GPUs) fall back to cpu. An explicit device="cuda" insists.
    worker_device = ("cuda" if device == "cuda" else "auto") if res == "GPU" else "cpu"
    # The swap group needs a thread per peer that may fetch from us at once, plus our own prepare.
    worker_cls = RayExpertWorker if worker_cls is None else worker_cls
    if not (isinstance(worker_cls, type) and issubclass(worker_cls, RayExpertWorker)):
        raise ValueError(f"worker_cls={worker_cls!r} must be a subclass of RayExpertWorker")
    actor_cls = ray.remote(concurrency_groups={"swap": topology.num_gpus + 1})(worker_cls)
    handles = []
    for rank in range(topology.num_gpus):
        node, local = divmod(rank, topology.gpus_per_node)
        opts: dict[str, Any] = dict(
            name=WORKER_NAME.format(rank=rank),
            namespace=namespace,
            max_concurrency=max_concurrency,
            max_restarts=max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pgs[node], placement_group_bundle_index=local),
            runtime_env={"env_vars": dict(ZERO_COPY_ENV)},
            lifetime=lifetime,
        )
        if res == "GPU":
            opts.update(num_gpus=amount, num_cpus=0)
        elif res == "CPU":
            opts.update(num_cpus=amount)
        else:
            opts.update(num_cpus=0, resources={res: 1.0})
        handles.append(
            actor_cls.options(**opts).remote(
                rank, topology, placement.rank_experts(rank).clone(), source,
                device=worker_device, epoch=placement.epoch, digest=placement.digest(), namespace=namespace,
                stage_nice=stage_nice,
                stage_duty=stage_duty,
            )
        )
    devices = {st["device"] for st in ray.get([h.state.remote() for h in handles], timeout=ready_timeout_s)}
    return WorkerGroup(topology, handles, pgs, ",".join(sorted(devices)))


def _check_capacity(topology: Topology, res: str, amount: float, device: str) -> None:
    """Fail in seconds, naming what is missing, when the cluster can never hold the ranks: no GPU
    for ``device="cuda"``, or too few nodes with ``gpus_per_node * amount`` of ``res`` each."""
    total = ray.cluster_resources()
    if res == "GPU" and total.get("GPU", 0) <= 0:
        raise RuntimeError(f"device={device!r}: the Ray cluster has no GPU (its resources: "
                           f"{', '.join(f'{k}={v:g}' for k, v in sorted(total.items()) if not k.startswith('node:'))})")
    pack = topology.gpus_per_node * amount
    per_node = [n["Resources"].get(res, 0.0) for n in ray.nodes() if n.get("Alive")]
    packs = sum(int(r / pack + 1e-9) for r in per_node)
    if packs < topology.num_nodes:
        raise RuntimeError(
            f"{topology.num_nodes} node(s) x {topology.gpus_per_node} ranks need {pack:g} {res} on each of "
            f"{topology.num_nodes} node(s); the cluster's nodes offer {', '.join(f'{r:g}' for r in per_node) or 'none'} "
            f"{res} (room for {packs})"
        )


def _committed_map(namespace: str, topology: Topology, rank: int, experts: torch.Tensor, epoch: int,
                   digest: str | None) -> tuple[torch.Tensor, int, str | None, str]:
    """What a restarted worker serves: ``(experts [L, S], epoch, digest, how)``.

    ``how`` is ``store`` (the committed map of the balancer's store), ``launch`` (no balancer has
    stored a map: the launch placement, as launched) or ``nothing`` (the store could not be read
    or holds another topology's map: the worker holds its launch slots under a digest no map has,
    so it serves no dispatch until the controller's next round brings it onto the map in force)."""
    import logging

    from ray_eplb.actors.map_store import MapStore

    log = logging.getLogger(__name__)
    try:
        record = MapStore(namespace).load()
        if record is None:
            return experts, epoch, digest, "launch"
        if Topology.model_validate(record["topology"]) != topology:
            raise ValueError("the stored map is for another topology")
        current = Placement.from_phy2log(topology, torch.tensor(record["phy2log"], dtype=torch.int64), int(record["epoch"]))
        if current.digest() != record["digest"]:
            raise ValueError(f"the stored map's digest {record['digest']} does not match its slots")
        return current.rank_experts(rank).clone(), current.epoch, current.digest(), "store"
    except Exception as exc:  # noqa: BLE001 - any failure: serve nothing rather than a guess
        log.error("restarted worker %d: no committed map (%r); serving nothing until the controller brings it in", rank, exc)
        return experts, epoch, "none", "nothing"


def quiet_zero_copy_warnings() -> None:
    """Our tensors cross the object store read-only by design (weights are never written in place,
    counters are sent as copies), so Ray's and torch's generic warnings about it are noise."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Zero-copy tensor serialization.*")
    warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")


def enable_zero_copy() -> None:
    """Set the zero-copy torch tensor flag for this process (call before ``ray.init``)."""
    os.environ.update({k: v for k, v in ZERO_COPY_ENV.items() if k not in os.environ})
    quiet_zero_copy_warnings()
