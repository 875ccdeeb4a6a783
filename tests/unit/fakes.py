"""Handle-like fakes over in-process workers, for the controller's tests without Ray: a
``FakeHandle``'s ``h.method.remote(*args)`` is awaitable, runs the plain worker's method in a
thread, and can be delayed or made to fail per method."""
import asyncio

import torch

from ray_eplb.actors import ExpertWorker, SyntheticWeightSource, local_fetcher
from ray_eplb.controller.balancer import EplbController
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
SRC = SyntheticWeightSource(hidden_size=8, ffn_size=8, seed=1)


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        self.handle.calls.append((self.name, args))

        async def call():
            delay = self.handle.delays.get(self.name, 0.0)
            if delay:
                await asyncio.sleep(delay)
            out = await asyncio.to_thread(getattr(self.handle.worker, self.name), *args)
            lie = self.handle.lies.get(self.name)  # a worker that lies: its reply rewritten
            return out if lie is None else lie(out)

        return call()


class FakeHandle:
    """Looks like a Ray actor handle: ``h.method.remote(*args)`` is awaitable. ``delays[method]``
    delays a method's calls; ``lies[method]`` rewrites its replies."""

    def __init__(self, worker):
        self.worker, self.delays, self.calls, self.lies = worker, {}, [], {}

    def __getattr__(self, name):
        return _Method(self, name)


def make(config=None):
    placement = Placement.identity(TOPO)
    workers = {}
    fetch = local_fetcher(lambda r: workers[r])
    for r in range(TOPO.num_gpus):
        workers[r] = ExpertWorker(r, TOPO, placement.rank_experts(r), SRC, fetcher=fetch, device="cpu",
                                  digest=placement.digest())
    handles = [FakeHandle(workers[r]) for r in range(TOPO.num_gpus)]
    cfg = config or ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, prepare_timeout_s=0.5, commit_timeout_s=0.5, release_timeout_s=0.5)
    return EplbController(TOPO, handles, cfg), workers, handles


def serve(workers, placement, layer, expert, n):
    """Route ``n`` tokens of ``expert`` to its first slot under ``placement``."""
    slot = int(placement.log2phy[layer, expert, 0])
    rank, local = divmod(slot, TOPO.slots_per_gpu)
    workers[rank].forward(placement.map_id(), layer, torch.full((n,), local), torch.randn(n, 8))
