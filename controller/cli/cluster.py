"""The embedded local Ray cluster the demos start (or the one they join with ``--address``).

Shared by ``ray-eplb demo`` and ``ray-eplb demo --model``. Token authentication is on for the cluster
it starts (unless ``RAY_AUTH_MODE`` says otherwise; see :mod:`ray_eplb.controller.cli.auth`), and
Ray's dashboard binds 8265 or, when that is taken, the next free port itself.
"""
from __future__ import annotations

import argparse
import os

import torch


def start_cluster(a: argparse.Namespace):
    """Embedded cluster (or join ``--address``). Returns (``Cluster`` or None, gpu_fraction)."""
    import ray

    from ray_eplb.actors.ray_worker import RANK_RESOURCE, enable_zero_copy
    from ray_eplb.controller.cli.dashboard import dashboard_args

    enable_zero_copy()
    # Metrics reach the Prometheus endpoint every 2 s instead of Ray's default 10 s, so the
    # dashboard check at the end of a short run sees them.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    if a.address:
        ray.init(address=a.address, log_to_driver=False)
        return None, 1.0
    per_node = a.workers // a.nodes
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus == 0:
        raise SystemExit("ray-eplb demo: --device cuda but torch sees no GPU")
    # Each raylet declares its share of the GPUs (at least one: raylets on one machine may declare the
    # same device); ranks share a GPU when there are fewer GPUs than ranks (a demo, not a benchmark).
    node_gpus = [max(1, gpus // a.nodes) if cuda else 0] * a.nodes
    frac = min(1.0, node_gpus[0] / per_node) if cuda else 1.0
    node_args = [
        dict(num_cpus=2, num_gpus=node_gpus[i], resources={RANK_RESOURCE: per_node}, object_store_memory=400 * 1024**2)
        for i in range(a.nodes)
    ]
    dash = dashboard_args()  # 8265, or the next free port when another Ray's dashboard holds it
    from ray_eplb.controller.cli.auth import enable_token_auth

    where = a.token_where = enable_token_auth()  # ray.init() would on its own; ray.cluster_utils.Cluster does not
    print(f"[demo] token authentication {f'on (token: {where})' if where else 'OFF (RAY_AUTH_MODE says so)'}")
    from ray.cluster_utils import Cluster

    # --keep: raylets not tied to this process, so they outlive it (see ray_eplb.controller.cli.keep).
    # The head's dashboard agent on a port of its own choosing: Ray's default (52365) is held by any other
    # Ray on this machine, and an agent that cannot bind it never registers, so the dashboard could not
    # show the logs of actors on that node (added raylets already pick a free port).
    head = dict(**dash, **node_args[0], dashboard_agent_listen_port=None)
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=not a.keep)
    for args in node_args[1:]:
        cluster.add_node(**args)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster, frac
