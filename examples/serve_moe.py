"""ray-eplb beside a Ray Serve deployment: a small MoE served over the balancer's worker actors.

Run: ``python examples/serve_moe.py`` (about 30 s on 2 cores; ``--http-port 8000`` also sends one
request through Serve's HTTP proxy). What it does:

1. starts a local Ray cluster (token authentication on, Ray's default; zero-copy torch tensors),
   4 CPU stand-ins for GPU ranks, the expert worker actors and the named controller, exactly as
   ``examples/local_cluster.py`` does;
2. deploys ``MoEServer`` with Ray Serve. A replica holds the non-expert part of the model (token
   embedding and the gate of every MoE layer, real weights) and a pool of Routers
   (``actors/router.py``) subscribed to the controller's published maps. It finds the controller and the workers by name,
   so it needs nothing but the namespace. Per request (token ids, or ``[N, H]`` hidden states) and
   per layer: RMS-norm, gate (top-k of ``x @ Wg``), dispatch to the workers through ``log2phy``,
   combine with the gate weights, add the residual;
3. sends mixed traffic, then traffic skewed toward a few tokens (hence toward the experts the
   gate sends them to); the controller sees the imbalance in its telemetry and rebalances while
   the deployment keeps serving. Every response is checked against a dense single-process
   reference (``DenseMoE``, the demo's) computed with the same weights;
4. prints what happened and shuts Serve and Ray down.

On a GPU cluster: ``ray.init()`` with no resources, ``discover_topology`` finds the GPUs, and
``SyntheticWeightSource`` becomes ``SafetensorsWeightSource("path/to/checkpoint")``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from ray import serve

from ray_eplb.controller.bench.reference import TraceGate, rms_norm


@dataclass(frozen=True)
class ModelSpec:
    """Shape and seeds of the served model. The expert weights live on the workers (from
    ``SyntheticWeightSource(hidden_size, ffn_size, seed)``); the embedding and the gates are seeded
    by ``seed`` too, so a replica and the reference build the same model."""

    num_layers: int = 2
    num_experts: int = 16
    top_k: int = 2
    hidden_size: int = 32
    ffn_size: int = 64
    vocab_size: int = 256
    seed: int = 0


class GatedStack:
    """The model without its experts: token embedding, and per layer ``x + MoE(rms_norm(x))`` whose
    gate is real (``TraceGate``'s weights ``Wg [L, H, E]``, plain top-k, no trace steering).
    ``forward`` takes the expert part as a callable, so the served model (``Router.dispatch``) and
    the dense reference (``DenseMoE``) run the very same code around it."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.gate_weight = TraceGate(spec.num_layers, spec.hidden_size, spec.num_experts, spec.top_k, seed=spec.seed).weight
        gen = torch.Generator().manual_seed(spec.seed + 104729)
        self.embedding = torch.randn(spec.vocab_size, spec.hidden_size, generator=gen)  # [V, H]

    def embed(self, tokens: Any) -> torch.Tensor:
        """Token ids ``[N]`` -> hidden states ``[N, H]``."""
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size})")
        return self.embedding[ids]

    def gate(self, layer: int, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``xn [N, H]`` -> ``topk_ids [N, K]`` int64, ``topk_w [N, K]`` (softmax over the chosen)."""
        logits = xn @ self.gate_weight[layer]  # [N, E]
        top = torch.topk(logits, self.spec.top_k, dim=-1)
        return top.indices, F.softmax(top.values, dim=-1)

    def forward(self, x: torch.Tensor, moe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, H]`` -> (output ``[N, H]``, chosen experts ``[L, N, K]``)."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != self.spec.hidden_size:
            raise ValueError(f"hidden states must be [N, {self.spec.hidden_size}], got {tuple(x.shape)}")
        chosen = []
        for layer in range(self.spec.num_layers):
            xn = rms_norm(x)
            ids, w = self.gate(layer, xn)
            x = x + moe(layer, xn, ids, w)
            chosen.append(ids)
        return x, torch.stack(chosen)


@serve.deployment(max_ongoing_requests=4)
class MoEServer:
    """A Serve deployment serving ``GatedStack`` with its experts on the ray-eplb workers.

    Args:
        spec: the model.
        namespace: where the named controller and workers live (``ray_eplb`` by default).

    Handle methods: ``forward(hidden [N, H])`` and ``tokens(ids [N])`` return
    ``{"hidden": [N, H], "experts": [L, N, K], "epochs": [L]}`` (``epochs``: the map each layer was
    routed by). HTTP: POST ``{"tokens": [...]}`` gets the same as JSON lists.
    """

    def __init__(self, spec: ModelSpec, namespace: str = "ray_eplb"):
        import ray

        from ray_eplb.actors import quiet_zero_copy_warnings
        from ray_eplb.actors.names import CONTROLLER_NAME, WORKER_NAME

        quiet_zero_copy_warnings()
        self.stack = GatedStack(spec)
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        topo = ray.get(self.controller.wait_map.remote(-1, None, 30.0)).topology  # the current map says the shape
        if (topo.num_layers, topo.num_experts) != (spec.num_layers, spec.num_experts):
            raise ValueError(f"the controller balances {topo.num_layers} layers x {topo.num_experts} experts, "
                             f"the model has {spec.num_layers} x {spec.num_experts}")
        self.workers = [ray.get_actor(WORKER_NAME.format(rank=r), namespace=namespace) for r in range(topo.num_gpus)]
        # Serve runs sync methods on a thread pool. One Router could serve them all (it is
        # thread-safe), but each response reports the epoch its router routed by, which only a
        # Router of its own tells exactly: one per request in flight, reused from this pool.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._routers: list = []
        self.served = 0

    def _run(self, x: torch.Tensor) -> dict:
        from ray_eplb.actors.router import Router

        try:
            router = self._idle.get_nowait()
        except queue.Empty:
            router = Router(self.workers, controller=self.controller)
            self._routers.append(router)
        epochs: list[int] = []

        def moe(layer, xn, ids, w):
            y = router.dispatch(layer, xn, ids, w)
            epochs.append(router.placement.epoch)  # the map of the attempt that finished the layer
            return y

        try:
            y, chosen = self.stack.forward(x, moe)
        finally:
            self._idle.put(router)
        self.served += 1
        return {"hidden": y, "experts": chosen, "epochs": epochs}

    def forward(self, hidden: torch.Tensor) -> dict:
        return self._run(hidden)

    def tokens(self, ids: Any) -> dict:
        return self._run(self.stack.embed(ids))

    def stats(self) -> dict:
        """Requests served by this replica, its routers, their map updates and re-routes."""
        return {"served": self.served, "routers": len(self._routers),
                "map_updates": sum(r.map_updates for r in self._routers),
                "retries": sum(r.retries for r in self._routers)}

    async def __call__(self, request) -> dict:
        body = await request.json()
        out = await asyncio.to_thread(self.tokens, body["tokens"])
        return {"hidden": out["hidden"].tolist(), "experts": out["experts"].tolist(), "epochs": out["epochs"]}

    def __del__(self):  # Serve calls it when the replica shuts down: end the routers' long polls
        for r in getattr(self, "_routers", ()):
            r.close()


def traffic(spec: ModelSpec, n: int, hot: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """``n`` token ids: uniform over the vocabulary, or 85% drawn from the ``hot`` ids."""
    ids = torch.randint(0, spec.vocab_size, (n,), generator=gen)
    if hot is not None:
        take = torch.rand(n, generator=gen) < 0.85
        ids[take] = hot[torch.randint(0, hot.numel(), (int(take.sum()),), generator=gen)]
    return ids


def fmt(balancedness: float | None) -> str:
    return "n/a (no tokens in the window)" if balancedness is None else f"{balancedness:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixed-s", type=float, default=3.0, help="seconds of mixed traffic first")
    ap.add_argument("--skewed-s", type=float, default=20.0, help="at most this long of skewed traffic")
    ap.add_argument("--batch", type=int, default=64, help="tokens per request")
    ap.add_argument("--in-flight", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--replicas", type=int, default=2, help="Serve replicas of the model deployment (default 2)")
    ap.add_argument("--http-port", type=int, default=None, help="also start Serve's HTTP proxy here and send one request")
    a = ap.parse_args()

    import ray

    from ray_eplb.actors import SyntheticWeightSource
    from ray_eplb.actors.ray_worker import NAMESPACE, RANK_RESOURCE, enable_zero_copy, launch_workers
    from ray_eplb.controller.bench.reference import DenseMoE, mismatched
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import discover_topology, plan

    t0 = time.monotonic()
    spec = ModelSpec()
    enable_zero_copy()  # before ray.init: tensors cross the object store without copies
    # address="local": always a cluster of our own, never one another program on this machine started.
    ray.init(address="local", resources={RANK_RESOURCE: 4}, include_dashboard=False, log_to_driver=False)
    try:
        topo = discover_topology(num_experts=spec.num_experts, num_layers=spec.num_layers, slots_per_gpu=5)  # 4 ranks x 5
        source = SyntheticWeightSource(spec.hidden_size, spec.ffn_size, seed=spec.seed)
        stack, dense = GatedStack(spec), DenseMoE(source, spec.num_layers, spec.num_experts)
        # The start placement is planned on a profile: the load of every vocabulary token once (what
        # mixed traffic looks like). Skewed traffic later is what the controller has to react to.
        _, experts = stack.forward(stack.embed(torch.arange(spec.vocab_size)), dense)  # [L, V, K]
        profile = torch.stack([torch.bincount(e.reshape(-1), minlength=spec.num_experts) for e in experts]).double()
        p0 = plan(topo, profile)
        group = launch_workers(topo, p0, source)
        cfg = ControllerConfig(interval_s=0.5, collect_timeout_s=0.25, window=6, min_tokens=4096,
                               trigger="drift", drift_threshold=0.85)
        controller = start_controller(topo, cfg, p0)
        print(f"[serve_moe] cluster, {topo.num_gpus} workers and the controller up ({time.monotonic() - t0:.1f} s)")

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines in this process
        serve.start(proxy_location="HeadOnly" if a.http_port else "Disabled",
                    http_options={"port": a.http_port or 8000}, logging_config={"log_level": "WARNING"})
        app = MoEServer.options(num_replicas=a.replicas, ray_actor_options={"num_cpus": 0}).bind(spec, NAMESPACE)
        handle = serve.run(app, name="moe", route_prefix="/moe" if a.http_port else None)
        print(f"[serve_moe] Serve deployment up with {a.replicas} replicas ({time.monotonic() - t0:.1f} s)")

        gen = torch.Generator().manual_seed(1)
        hot = torch.randperm(spec.vocab_size, generator=gen)[:2]  # the "hot topic": two tokens
        served = bad = 0
        epochs_seen: set[int] = set()

        def phase(name: str, hot_ids, seconds: float, until: Callable[[dict], bool] | None = None) -> None:
            nonlocal served, bad
            start, n = time.monotonic(), 0
            pending: list = []
            while True:
                done = time.monotonic() - start >= seconds
                st = ray.get(controller.status.remote())
                if until is not None and until(st):
                    done = True
                while pending and (done or len(pending) >= a.in_flight):
                    ids, resp = pending.pop(0)
                    out = resp.result(timeout_s=60)
                    ref, ref_experts = stack.forward(stack.embed(ids), dense)
                    bad += int(mismatched(out["hidden"], ref).sum()) + int((out["experts"] != ref_experts).any(0).any(-1).sum())
                    epochs_seen.update(out["epochs"])
                    served += 1
                    n += 1
                if done:
                    break
                ids = traffic(spec, a.batch, hot_ids, gen)
                pending.append((ids, handle.tokens.remote(ids)))
            print(f"[serve_moe] {name}: {n} requests in {time.monotonic() - start:.1f} s, epoch {st.epoch}, "
                  f"rebalances {st.rebalances}, balancedness now {fmt(st.balancedness_now)}")

        phase("mixed traffic", None, a.mixed_s)
        st = ray.get(controller.status.remote())
        rebalances0 = st.rebalances
        # Skewed traffic until the controller has rebalanced for it and served a while on the new map.
        seen_at: list[float] = []

        def rebalanced(st) -> bool:
            if st.rebalances > rebalances0 and not seen_at:
                seen_at.append(time.monotonic())
            return bool(seen_at) and time.monotonic() - seen_at[0] > 3.0

        phase(f"skewed traffic (85% tokens {hot.tolist()})", hot, a.skewed_s, rebalanced)
        st = ray.get(controller.status.remote())  # balancedness now: on the window that just ended
        if not seen_at:
            print(f"[serve_moe] no rebalance within --skewed-s={a.skewed_s:g} s (a busy machine? try a longer one)")

        if a.http_port:
            import json
            import urllib.request

            req = urllib.request.Request(f"http://127.0.0.1:{a.http_port}/moe", data=json.dumps({"tokens": [1, 2, 3]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.loads(r.read())
            ref, _ = stack.forward(stack.embed([1, 2, 3]), dense)
            http_bad = int(mismatched(torch.tensor(body["hidden"]), ref).sum())
            print(f"[serve_moe] HTTP POST /moe: epochs {body['epochs']}, mismatched tokens {http_bad}")
            bad += http_bad

        print(f"[serve_moe] served {served} requests ({served * a.batch} tokens x {spec.num_layers} layers); "
              f"mismatched vs dense reference: {bad}")
        print(f"[serve_moe] controller: epoch {st.epoch}, rebalances {st.rebalances}, experts moved "
              f"{st.experts_moved}, balancedness now {fmt(st.balancedness_now)}; responses routed by epochs "
              f"{sorted(epochs_seen)}")
        routers = st.routers  # router id -> the newest epoch it acked
        print(f"[serve_moe] {len(routers)} routers in the replicas subscribe to the maps; epochs they hold: "
              f"{sorted(set(routers.values()))}")
        for rec in ray.get(controller.history.remote()):
            if rec.get("action") == "committed":
                print(f"[serve_moe]   epoch {rec['epoch']}: {rec['reason']}, moved {rec['moved']} slots, predicted "
                      f"balancedness {rec['predicted_before']:.3f} -> {rec['predicted_after']:.3f}")
        ray.get(controller.stop.remote())
        serve.shutdown()  # replicas first (their routers stop polling), then the workers
        group.shutdown()
        print(f"[serve_moe] done in {time.monotonic() - t0:.1f} s")
        if bad:
            raise SystemExit(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
