"""The runtime's API in one page: workers, controller, router, a skewed load, a rebalance.

Run: ``python examples/local_cluster.py`` (about 20 s on a laptop). Copy from here when wiring
ray-eplb into your own serving code: replace the random tokens by your model's hidden states and
gate, and ``SyntheticWeightSource`` by ``SafetensorsWeightSource("path/to/checkpoint")``.
"""
import time

import ray
import torch

from ray_eplb.actors import RANK_RESOURCE, Router, SyntheticWeightSource, enable_zero_copy, launch_workers
from ray_eplb.controller import ControllerConfig, start_controller
from ray_eplb.controller.bench.reference import DenseMoE, mismatched  # the dense reference, to check outputs
from ray_eplb.topology import Placement, discover_topology


def main() -> None:
    enable_zero_copy()  # before ray.init: tensors cross the object store without copies
    # One machine standing in for a node with 4 GPUs: 4 units of the rank resource. On a GPU
    # cluster, call ray.init() and discover_topology() finds the GPUs instead.
    # address="local": always a fresh local instance, even when another Ray runs on this machine.
    ray.init(address="local", resources={RANK_RESOURCE: 4}, include_dashboard=False)
    topo = discover_topology(num_experts=16, num_layers=2, slots_per_gpu=5)  # 4 ranks x 5 slots
    source = SyntheticWeightSource(hidden_size=32, ffn_size=64)
    workers = launch_workers(topo, Placement.identity(topo), source)  # named ray_eplb_worker_<rank>
    cfg = ControllerConfig(interval_s=1.0, collect_timeout_s=0.5, trigger="drift", drift_threshold=0.9)
    controller = start_controller(topo, cfg)  # named ray_eplb_controller; its loop runs now
    router = Router(workers.handles, controller=controller)  # subscribes to published maps
    reference = DenseMoE(source, topo.num_layers, topo.num_experts)

    gen = torch.Generator().manual_seed(0)
    bad = 0
    for _ in range(40):
        x = torch.randn(128, 32, generator=gen)  # [N, H]
        hot = torch.tensor([0, 1, 2])  # experts 0-2 are popular
        ids = torch.where(torch.rand(128, 2, generator=gen) < 0.6, hot[torch.randint(0, 3, (128, 2), generator=gen)],
                          torch.randint(3, 16, (128, 2), generator=gen))
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 5) % 16, ids[:, 1])  # two distinct experts
        w = torch.full((128, 2), 0.5)
        for layer in range(topo.num_layers):
            bad += int(mismatched(router.dispatch(layer, x, ids, w), reference(layer, x, ids, w)).sum())
        time.sleep(0.05)
    status = ray.get(controller.status.remote())
    print(f"epoch {status.epoch}, rebalances {status.rebalances}, experts moved {status.experts_moved}, "
          f"balancedness now {status.balancedness_now:.3f}, mismatched tokens {bad}")
    for rec in ray.get(controller.history.remote()):
        print({k: rec[k] for k in ("epoch", "action", "transfers") if k in rec})
    ray.get(controller.stop.remote())
    ray.shutdown()


if __name__ == "__main__":
    main()
