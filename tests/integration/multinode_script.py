"""Run by test_multinode.py in a fresh process: a 2-raylet ``ray.cluster_utils.Cluster`` (each node
offers 2 rank slots), topology discovery, placement groups, one swap with intra- and inter-node
moves. Prints one JSON line with what the test checks."""
import json
import os

import ray
from ray.cluster_utils import Cluster

from ray_eplb.actors import SyntheticWeightSource
from ray_eplb.actors.ray_worker import RANK_RESOURCE, enable_zero_copy, launch_workers
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.ray_controller import start_controller
from ray_eplb.topology import Placement, discover_topology

os.environ["RAY_AUTH_MODE"] = "disabled"  # a test
enable_zero_copy()
node = dict(num_cpus=1, resources={RANK_RESOURCE: 2}, object_store_memory=200 * 1024**2)
cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
cluster.add_node(**node)
try:
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    topo = discover_topology(num_experts=8, num_layers=2, slots_per_gpu=3)
    group = launch_workers(topo, Placement.identity(topo), SyntheticWeightSource(16, 32), device="cpu")
    nodes = ray.get([h.node.remote() for h in group.handles])
    ctl = start_controller(topo, ControllerConfig(interval_s=1.0, collect_timeout_s=0.5), start_loop=False)
    # Layer 0 by rank under identity: r0 [0 1 2] r1 [3 4 5] r2 [6 7 0] r3 [1 2 3].
    phy = Placement.identity(topo).phy2log.clone()
    phy[0, 3] = 0  # rank 1 gets expert 0: held by rank 0 (same node) and rank 2 (other node)
    phy[0, 6] = 4  # rank 2 gets expert 4: held only by rank 1 (other node)
    phy[0, 4] = 6  # rank 1 gets expert 6: held only by rank 2 (other node) -- every expert keeps a slot
    rec = ray.get(ctl.apply_placement.remote(phy))
    bad = ray.get([h.verify.remote() for h in group.handles])
    print(json.dumps({
        "topology": [topo.num_nodes, topo.gpus_per_node], "nodes": nodes, "record": rec["action"],
        "transfers": rec["transfers"], "wrong_slots": sum(map(len, bad)),
        "epochs": [s["epoch"] for s in ray.get([h.state.remote() for h in group.handles])],
    }))
finally:
    ray.shutdown()
    cluster.shutdown()
