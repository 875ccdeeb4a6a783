"""The runtime under test: 4 workers (2 nodes x 2 ranks, one raylet), the controller (loop not
started: tests drive rounds), a router, and the dense reference. Started once per test run."""
from dataclasses import dataclass
from typing import Any

import pytest

from ray_eplb.topology import Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)


@dataclass
class Runtime:
    topology: Topology
    workers: list
    controller: Any
    router: Any
    dense: Any
    source: Any


@pytest.fixture(scope="session")
def runtime(ray_session):
    from ray_eplb.actors import SyntheticWeightSource
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.actors.router import Router
    from ray_eplb.controller.bench.reference import DenseMoE
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement

    source = SyntheticWeightSource(hidden_size=16, ffn_size=32, seed=5)
    group = launch_workers(TOPO, Placement.identity(TOPO), source, device="cpu")
    cfg = ControllerConfig(interval_s=1.0, collect_timeout_s=0.5, prepare_timeout_s=2.0, commit_timeout_s=2.0,
                           release_timeout_s=2.0, drift_threshold=0.5, min_gain=0.0)
    ctl = start_controller(TOPO, cfg, start_loop=False)
    router = Router(group.handles, controller=ctl)
    yield Runtime(TOPO, group.handles, ctl, router, DenseMoE(source, TOPO.num_layers, TOPO.num_experts), source)
    router.close()
