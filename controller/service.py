"""A standing balancer: the workers and the controller started on an existing Ray cluster as detached
named actors, which outlive the process that started them, and removed again by one call.

    from ray_eplb.controller.service import start
    balancer = start(topology, SyntheticWeightSource(64, 128), config, address="auto")
    ...                                  # the starting process may exit; the balancer keeps running
    balancer.shutdown()                  # or `ray-eplb stop` from any shell

:func:`start` is idempotent: when the balancer's namespace already holds a running controller it
starts nothing and returns a handle to that one (``started_now=False``). :func:`shutdown` kills every
actor of the namespace's deployment, removes its placement groups and clears the balancer's store,
so a later start begins at epoch 0. What was started is recorded in Ray's GCS key-value store
(key ``ray_eplb:deployment`` in the balancer's namespace) for a later ``stop`` or ``status``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_eplb.actors.names import CONTROLLER_NAME, NAMESPACE, WORKER_NAME
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.topology import Placement, Topology

DEPLOYMENT_KEY = b"ray_eplb:deployment"
#: How long :func:`shutdown` waits for the killed actors to be gone.
STOP_WAIT_S = 20.0


class NoBalancer(LookupError):
    """No balancer runs in the namespace (or no Ray cluster answers at the address). ``startable``:
    starting one is the remedy (not when the cluster refused this driver's credentials)."""

    def __init__(self, message: str, startable: bool = True):
        super().__init__(message)
        self.startable = startable


@dataclass
class Balancer:
    """A running balancer: its namespace, the controller's handle and topology, and whether this
    call started it (``started_now``) or found it running."""

    namespace: str
    controller: Any
    topology: Topology
    started_now: bool
    deployment: dict

    def report(self) -> Any:
        """The controller's :class:`~ray_eplb.controller.status.ControllerStatus`."""
        import ray

        return ray.get(self.controller.status.remote())

    def shutdown(self) -> dict:
        """Remove the deployment (see :func:`shutdown`)."""
        return shutdown(self.namespace)


def connect(address: str | None = None, namespace: str = NAMESPACE) -> None:
    """Join the Ray cluster at ``address`` (default ``auto``: the one this machine runs) as a driver
    in ``namespace``; nothing when already connected. Token authentication is Ray's: the driver
    presents the token of ``RAY_AUTH_TOKEN`` or of its token file. ``NoBalancer`` when no cluster answers."""
    import ray

    if ray.is_initialized():
        return
    from ray_eplb.actors.ray_worker import enable_zero_copy

    enable_zero_copy()
    _probe(address)
    try:
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        if _listening(address):  # a cluster answers but did not take this driver: most often its token
            raise NoBalancer(f"the Ray cluster at {address} refused this driver ({exc}); with token authentication "
                             "set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token", startable=False) from None
        raise NoBalancer(f"no Ray cluster at {address or 'auto'}: {exc}") from None


def _host_port(address: str | None) -> tuple[str, int] | None:
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return None  # auto, or a client URL: Ray resolves it
    return host or "127.0.0.1", int(port)


def _probe(address: str | None) -> None:
    """Fail at once when nothing listens at an explicit ``host:port`` (Ray itself retries for a minute)."""
    import socket

    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=3).close()
    except OSError as exc:
        raise NoBalancer(f"no Ray cluster at {address} ({exc.strerror or exc}): start one first (ray start --head)") from None


def _listening(address: str | None) -> bool:
    try:
        _probe(address)
    except NoBalancer:
        return False
    return _host_port(address) is not None


def find(namespace: str = NAMESPACE) -> Any | None:
    """The running controller of ``namespace`` (a handle), or ``None``."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        return None


def deployment_record(namespace: str = NAMESPACE) -> dict | None:
    """What :func:`start` recorded for ``namespace`` (``None`` when nothing is recorded)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(DEPLOYMENT_KEY, namespace=namespace)
    return None if raw is None else json.loads(raw)


def attach(address: str | None = None, namespace: str = NAMESPACE) -> Balancer:
    """The running balancer of ``namespace`` (``NoBalancer`` when none runs)."""
    import ray

    connect(address, namespace)
    handle = find(namespace)
    if handle is None:
        raise NoBalancer(f"no balancer is running in namespace {namespace!r}")
    # A controller started without this module (start_controller from a script) has no record.
    record = deployment_record(namespace) or {"topology": ray.get(handle.status.remote()).topology}
    return Balancer(namespace, handle, Topology.model_validate(record["topology"]), False, record)


def start(
    topology: Topology,
    source: Any,
    config: ControllerConfig | None = None,
    placement: Placement | None = None,
    *,
    address: str | None = None,
    namespace: str = NAMESPACE,
    device: str = "auto",
    resource: str | None = None,
    start_loop: bool = True,
    weights: str | None = None,
) -> Balancer:
    """Start a standing balancer: one detached worker per rank of ``topology`` holding
    ``placement``'s slots (default identity) loaded from ``source``, and the detached controller over
    them, its loop running (``start_loop``). Joins the cluster at ``address`` unless connected.

    A running controller in ``namespace`` is returned as it is (``started_now=False``: ``topology``,
    ``source`` and ``config`` are not applied to it). Leftovers of a start that died midway (workers
    without a controller) are removed first. On any failure everything this call started is removed
    again. ``weights``: how to describe ``source`` in the record (default its repr)."""
    connect(address, namespace)
    if find(namespace) is not None:
        return attach(address, namespace)
    shutdown(namespace, connected=True)  # leftovers of an interrupted start, and a stale store
    from ray_eplb.actors.ray_worker import PLACEMENT_GROUP_NAME, launch_workers
    from ray_eplb.controller.ray_controller import start_controller

    config = config or ControllerConfig()
    placement = placement or Placement.identity(topology)
    record = {
        "topology": topology.model_dump(), "weights": weights or repr(source), "device": device,
        "started": time.time(), "config": config.model_dump(),
        "placement_groups": [PLACEMENT_GROUP_NAME.format(namespace=namespace, node=n) for n in range(topology.num_nodes)],
    }
    _save_record(namespace, record)
    quiet = _DropDetachedPlacementWarning()
    logging.getLogger("ray.actor").addFilter(quiet)
    try:
        launch_workers(topology, placement, source, device=device, namespace=namespace, resource=resource,
                       lifetime="detached")
        handle = start_controller(topology, config, placement, start_loop=start_loop, namespace=namespace,
                                  lifetime="detached")
    except BaseException:
        shutdown(namespace, connected=True)
        raise
    finally:
        logging.getLogger("ray.actor").removeFilter(quiet)
    return Balancer(namespace, handle, topology, True, record)


class _DropDetachedPlacementWarning(logging.Filter):
    """Ray warns, once per worker, that a restartable detached actor in a placement group dies when
    the group is removed. Here that is the design: the groups are removed only by :func:`shutdown`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


def shutdown(namespace: str = NAMESPACE, *, address: str | None = None, connected: bool = False) -> dict:
    """Remove the balancer of ``namespace``: kill its controller and workers (no restart), remove its
    placement groups, clear its store and deployment record; wait until the actors are gone.
    Returns ``{"actors": [names killed], "placement_groups": [names removed]}``."""
    import ray
    from ray.experimental import internal_kv
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from ray_eplb.actors.map_store import MapStore

    if not connected:
        connect(address, namespace)
    record = deployment_record(namespace) or {}
    ranks = Topology.model_validate(record["topology"]).num_gpus if "topology" in record else None
    killed = []
    names = [CONTROLLER_NAME] + [WORKER_NAME.format(rank=r) for r in range(ranks if ranks is not None else 1 << 16)]
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            if ranks is None and name != CONTROLLER_NAME:
                break  # no record: workers are numbered from 0, the first missing one ends them
            continue
        ray.kill(handle, no_restart=True)
        killed.append(name)
    groups = set(record.get("placement_groups", []))
    prefix = f"ray_eplb_{namespace}_node"
    removed = []
    for pg_id, info in placement_group_table().items():
        name = info.get("name") or ""
        if info.get("state") != "REMOVED" and (name in groups or name.startswith(prefix)):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(name)
    MapStore(namespace).clear()
    internal_kv._internal_kv_del(DEPLOYMENT_KEY, namespace=namespace)
    deadline = time.monotonic() + STOP_WAIT_S
    while killed and time.monotonic() < deadline and any(_alive(n, namespace) for n in killed):
        time.sleep(0.2)
    return {"actors": killed, "placement_groups": sorted(removed)}


def _alive(name: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def _save_record(namespace: str, record: dict) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(DEPLOYMENT_KEY, json.dumps(record).encode(), overwrite=True, namespace=namespace)


def weight_source(spec: str) -> tuple[Any, int | None, int | None]:
    """``(source, num_layers, num_experts)`` from a weights spec (the counts ``None`` when the spec
    does not tell them): ``synthetic:H:I[:SEED]`` (random experts of hidden size H and FFN width I),
    ``hf:FOLDER`` (a Hugging Face model folder) or the path of a ``.safetensors`` file or folder
    (HF expert naming). ``ValueError`` names a bad spec."""
    from ray_eplb.actors import HFCheckpointSource, SafetensorsWeightSource, SyntheticWeightSource

    if spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"weights {spec!r}: synthetic:HIDDEN:FFN[:SEED] takes integers") from None
        if len(nums) not in (2, 3) or min(nums[:2]) <= 0:
            raise ValueError(f"weights {spec!r}: expected synthetic:HIDDEN:FFN[:SEED] with positive sizes")
        return SyntheticWeightSource(nums[0], nums[1], seed=nums[2] if len(nums) == 3 else 0), None, None
    if spec.startswith("hf:"):
        folder = spec[3:]
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"weights {spec!r}: {folder!r} is not a model folder with a config.json")
        src = HFCheckpointSource(folder)
        return src, src.num_layers, src.num_experts
    if Path(spec).exists():
        return SafetensorsWeightSource(spec), None, None
    raise ValueError(f"weights {spec!r}: expected synthetic:HIDDEN:FFN, hf:FOLDER or a .safetensors path")
