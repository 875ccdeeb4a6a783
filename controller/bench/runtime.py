"""``ray-eplb bench-runtime``: the runtime's costs, each against its baseline in the same run.

1. Telemetry round (collect + aggregate + forecast, timed inside the controller) vs a no-op fan-out
   (``ping``) to the same workers, interleaved. Target: ratio <= 1.5.
2. A worker stalled for ``--stall`` seconds: the round ends at the collect deadline, not later.
3. A swap moving 25% of the slots while a router thread keeps dispatching: mismatched tokens vs a
   dense reference (target 0), throughput during the swap vs steady state (target >= 80%), the
   longest stall a dispatch saw.
4. Weight transfer between two workers (the swap's path: one export reply, kept zero-copy in the
   object store) vs a plain ``ray.get`` of the same bytes. Target: >= 50% of its bandwidth. The
   copying path (past the borrow cap, or a GPU's host-to-device copy) is reported beside it.

``--soak MIN`` runs the soak benchmark instead (:mod:`ray_eplb.controller.bench.soak`): memory
growth of every process of the runtime over MIN minutes of live, rebalanced traffic.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import torch

TOP_K = 4  # experts per token of the live load (DispatchLoad)


def parse(argv: list[str]) -> argparse.Namespace:
    from ray_eplb.controller.cli.args import Parser, int_at_least, nonneg, positive, positive_int

    ap = Parser(prog="ray-eplb bench-runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=positive_int, default=8, help="worker actors (ranks) to start (default 8)")
    ap.add_argument("--nodes", type=positive_int, default=2, help="topology nodes (the ranks share one raylet here)")
    ap.add_argument("--layers", type=positive_int, default=4, help="MoE layers (default 4)")
    ap.add_argument("--experts", type=int_at_least(TOP_K), default=64,
                    help=f"logical experts per layer (default 64, at least the live load's top-{TOP_K})")
    ap.add_argument("--hidden", type=positive_int, default=256, help="expert hidden size (default 256)")
    ap.add_argument("--ffn", type=positive_int, default=512, help="expert FFN width (default 512)")
    ap.add_argument("--rounds", type=positive_int, default=30, help="telemetry rounds to time")
    ap.add_argument("--stall", type=nonneg, default=10.0, help="seconds the stalled worker sleeps")
    ap.add_argument("--deadline", type=positive, default=0.5, help="collect deadline, seconds")
    ap.add_argument("--swaps", type=positive_int, default=3, help="25%% swaps to run under live dispatch (default 3)")
    ap.add_argument("--batch-tokens", type=positive_int, default=256, help="tokens per dispatch of the live load (default 256)")
    ap.add_argument("--soak", type=positive, default=None, metavar="MIN",
                    help="instead: the soak benchmark, the demo's loop for MIN minutes, printing memory growth slopes")
    ap.add_argument("--warmup", type=nonneg, default=2.0, metavar="MIN",
                    help="with --soak: minutes left out of the slopes (default 2)")
    ap.add_argument("--sample-s", type=positive, default=10.0, help="with --soak: seconds between samples (default 10)")
    ap.add_argument("--rebalance-s", type=positive, default=6.0, help="with --soak: rebalance period, seconds (default 6)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON")
    a = ap.parse_args(argv)
    if a.workers % a.nodes:
        ap.error(f"--workers={a.workers} is not divisible by --nodes={a.nodes}")
    if a.soak is not None and a.warmup >= a.soak:
        ap.error(f"--warmup={a.warmup:g} must be shorter than --soak={a.soak:g} minutes")
    if a.soak is not None and 60 * (a.soak - a.warmup) < 2 * a.sample_s:
        ap.error(f"--soak={a.soak:g} - --warmup={a.warmup:g} minutes leaves fewer than 2 samples {a.sample_s:g} s apart")
    return a


def swap_target(phy2log: torch.Tensor, slots_per_gpu: int, fraction: float, seed: int) -> torch.Tensor:
    """``phy2log [L, R]`` with ``fraction`` of each layer's slots changed, by swapping the experts of
    slot pairs on different ranks (every expert keeps its replica count)."""
    gen = torch.Generator().manual_seed(seed)
    out = phy2log.clone()
    num_layers, num_slots = out.shape
    want_pairs = int(round(fraction * num_slots / 2))
    for layer in range(num_layers):
        order = torch.randperm(num_slots, generator=gen).tolist()
        used: set[int] = set()
        pairs = 0
        for i, a in enumerate(order):
            if pairs == want_pairs:
                break
            if a in used:
                continue
            for b in order[i + 1 :]:
                if b not in used and a // slots_per_gpu != b // slots_per_gpu and out[layer, a] != out[layer, b]:
                    out[layer, [a, b]] = out[layer, [b, a]]
                    used |= {a, b}
                    pairs += 1
                    break
    return out


class DispatchLoad:
    """A router thread dispatching random top-k batches, checking every output against the dense
    reference and logging ``(t_start, t_end, tokens)`` per dispatch.

    ``gate(layer, x [N, H], gen) -> (ids [N, K], w [N, K])`` chooses the experts; default: ``top_k``
    uniformly at random."""

    def __init__(self, router, dense, num_layers: int, num_experts: int, hidden: int, batch: int, top_k: int = TOP_K,
                 seed: int = 11, gate=None):
        self.router, self.dense, self.seed, self.gate = router, dense, seed, gate
        self.shape = (num_layers, num_experts, hidden, batch, top_k)
        self.log: list[tuple[float, float, int]] = []
        self.mismatched = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from ray_eplb.controller.bench.reference import mismatched

        num_layers, num_experts, hidden, batch, top_k = self.shape
        gen = torch.Generator().manual_seed(self.seed)
        layer = 0
        try:
            while not self._stop.is_set():
                x = torch.randn(batch, hidden, generator=gen)
                if self.gate is not None:
                    ids, w = self.gate(layer, x, gen)
                else:
                    ids = torch.rand(batch, num_experts, generator=gen).topk(top_k, dim=1).indices  # [N, K]
                    w = torch.softmax(torch.randn(batch, top_k, generator=gen), dim=1)
                t0 = time.perf_counter()
                y = self.router.dispatch(layer, x, ids, w)
                t1 = time.perf_counter()
                self.mismatched += int(mismatched(y, self.dense(layer, x, ids, w)).sum())
                self.log.append((t0, t1, batch))
                layer = (layer + 1) % num_layers
        except BaseException as exc:  # noqa: BLE001 - surfaced by the caller
            self.error = exc

    def start(self) -> "DispatchLoad":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"dispatch thread failed: {self.error!r}") from self.error

    def rate(self, t0: float, t1: float) -> float:
        """Tokens per second over ``[t0, t1]``, counting each dispatch by its overlap with it."""
        tok = sum(n * max(0.0, min(e, t1) - max(s, t0)) / (e - s) for s, e, n in self.log if e > s)
        return tok / (t1 - t0)

    def latencies(self, t0: float, t1: float) -> list[float]:
        return [e - s for s, e, _ in self.log if s < t1 and e > t0]


def main(argv: list[str] | None = None) -> int:
    a = parse(list(sys.argv[1:] if argv is None else argv))
    import ray

    from ray_eplb.actors.ray_worker import RANK_RESOURCE, enable_zero_copy

    enable_zero_copy()
    # The soak samples actors' processes through the state API, which the dashboard serves.
    dash: dict = {"include_dashboard": False}
    if a.soak is not None:
        from ray_eplb.controller.cli.dashboard import dashboard_args

        dash = dashboard_args()  # 8265, or the next free port when another Ray's dashboard holds it
    ray.init(address="local", num_cpus=2, resources={RANK_RESOURCE: a.workers}, log_to_driver=False,
             object_store_memory=1024**3, **dash)
    try:
        if a.soak is not None:
            from ray_eplb.controller.bench.soak import soak

            out = soak(a)
        else:
            out = run(a)
    finally:
        ray.shutdown()
    if a.json:
        print(json.dumps(out))
    return 0


def run(a: argparse.Namespace) -> dict:
    import math

    import ray

    from ray_eplb.actors import SyntheticWeightSource
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.actors.router import Router
    from ray_eplb.controller.bench.probe import ProbeWorker
    from ray_eplb.controller.bench.reference import DenseMoE
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement, Topology

    topo = Topology(num_nodes=a.nodes, gpus_per_node=a.workers // a.nodes, num_layers=a.layers,
                    num_experts=a.experts, slots_per_gpu=math.ceil(a.experts / a.workers) + 1)
    source = SyntheticWeightSource(a.hidden, a.ffn)
    mb_per_expert = 3 * a.hidden * a.ffn * 4 / 2**20
    print(f"[bench] {topo.num_gpus} workers ({topo.num_nodes} x {topo.gpus_per_node}), {topo.num_layers} layers x "
          f"{topo.num_slots} slots, expert {a.hidden}x{a.ffn} ({mb_per_expert:.2f} MB)")
    t0 = time.monotonic()
    group = launch_workers(topo, Placement.identity(topo), source, device="cpu", worker_cls=ProbeWorker)
    cfg = ControllerConfig(interval_s=max(1.0, 2 * a.deadline), collect_timeout_s=a.deadline, prepare_timeout_s=120,
                           commit_timeout_s=30, release_timeout_s=30)
    ctl = start_controller(topo, cfg, start_loop=False)
    router = Router(group.handles, controller=ctl)
    dense = DenseMoE(source, topo.num_layers, topo.num_experts)
    print(f"[bench] started in {time.monotonic() - t0:.1f} s")
    results: dict = {}

    # 1. telemetry round vs no-op fan-out
    warm = DispatchLoad(router, dense, topo.num_layers, topo.num_experts, a.hidden, a.batch_tokens).start()
    time.sleep(1.0)  # some counts for the telemetry to carry
    warm.stop()
    tele = ray.get(ctl.measure_telemetry.remote(a.rounds))
    results["telemetry"] = tele
    print(f"[bench] telemetry round {tele['telemetry_ms']:.2f} ms vs no-op fan-out {tele['noop_ms']:.2f} ms: "
          f"ratio {tele['ratio']:.2f} (target <= 1.5)")

    # 2. a stalled worker
    ray.get(group.handles[topo.num_gpus - 1].inject_delay.remote("collect", a.stall))
    t1 = time.perf_counter()
    ray.get(ctl.telemetry.remote())
    stalled_s = time.perf_counter() - t1
    missing = ray.get(ctl.status.remote()).missing
    ray.get(group.handles[topo.num_gpus - 1].inject_delay.remote("collect", 0.0))
    results["stall"] = {"round_ms": 1e3 * stalled_s, "deadline_ms": 1e3 * a.deadline, "stall_s": a.stall, "missing": missing}
    print(f"[bench] worker {topo.num_gpus - 1} stalled {a.stall:g} s: round took {1e3 * stalled_s:.0f} ms "
          f"(deadline {1e3 * a.deadline:.0f} ms), missing {missing}")

    # 3. swap 25% of slots under live dispatch
    load = DispatchLoad(router, dense, topo.num_layers, topo.num_experts, a.hidden, a.batch_tokens).start()
    swaps = []
    try:
        time.sleep(3.0)
        for i in range(a.swaps):
            steady0 = time.perf_counter() - 2.0
            steady = load.rate(steady0, time.perf_counter())
            lat_steady = sorted(load.latencies(steady0, time.perf_counter()))
            target = swap_target(router.placement.phy2log, topo.slots_per_gpu, 0.25, seed=i)
            s0 = time.perf_counter()
            rec = ray.get(ctl.apply_placement.remote(target))
            s1 = time.perf_counter()
            time.sleep(0.2)
            during = load.rate(s0, s1)
            lat_swap = load.latencies(s0, s1)
            swaps.append({
                "moved": rec.get("moved", 0), "slots": topo.num_layers * topo.num_slots, "action": rec["action"],
                "swap_ms": 1e3 * (s1 - s0), "steady_tok_s": steady, "swap_tok_s": during, "ratio": during / steady,
                "dispatch_p50_ms_steady": 1e3 * lat_steady[len(lat_steady) // 2],
                "dispatch_max_ms_swap": 1e3 * max(lat_swap, default=0.0),
            })
            s = swaps[-1]
            print(f"[bench] swap {i}: moved {s['moved']}/{s['slots']} slots in {s['swap_ms']:.0f} ms; throughput "
                  f"{s['swap_tok_s']:.0f} tok/s during vs {s['steady_tok_s']:.0f} steady = {s['ratio']:.2f} (target >= 0.8); "
                  f"dispatch max {s['dispatch_max_ms_swap']:.1f} ms during vs p50 {s['dispatch_p50_ms_steady']:.1f} ms steady")
            time.sleep(2.0)
    finally:
        load.stop()
    states = ray.get([h.state.remote() for h in group.handles])
    max_stall_ms = max([1e3 * router.max_stall_s] + [st["max_lock_wait_ms"] for st in states])
    identity_bad = sum(len(v) for v in ray.get([h.verify.remote() for h in group.handles]))
    results["swap"] = {"swaps": swaps, "mismatched_tokens": load.mismatched, "dispatches": len(load.log),
                       "max_stall_ms": max_stall_ms, "router_reroutes": router.retries, "wrong_slots": identity_bad,
                       "min_ratio": min(s["ratio"] for s in swaps)}
    print(f"[bench] {len(load.log)} dispatches, mismatched tokens {load.mismatched}, slots with wrong weights "
          f"{identity_bad}, max stall {max_stall_ms:.2f} ms, router re-routes {router.retries}")

    # 4. transfer bandwidth worker 0 -> worker 1
    held = ray.get(group.handles[0].state.remote())["experts"]  # [L, S] what worker 0 holds now
    items = sorted({(layer, int(e)) for layer in range(topo.num_layers) for e in held[layer]})
    nbytes = len(items) * int(mb_per_expert * 2**20)
    ray.get(group.handles[0].make_blob.remote(nbytes))
    times: dict[str, list[float]] = {"experts": [], "experts_copy": [], "get": [], "get_numpy": [], "get_copy": []}
    for _ in range(9):
        for mode in times:
            times[mode].append(ray.get(group.handles[1].time_fetch.remote(0, items, mode)))
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    best = {m: min(v) for m, v in times.items()}
    gbps = {m: nbytes / t / 1e9 for m, t in med.items()}
    gbps_best = {m: nbytes / t / 1e9 for m, t in best.items()}
    # The baseline is the faster plain get: of the blob as a torch tensor or as a numpy array.
    base = max(("get", "get_numpy"), key=lambda m: gbps[m])
    borrowed = sum(st["borrowed_total"] for st in states)
    fetched = sum(st["fetched_bytes"] for st in states)
    results["transfer"] = {
        "bytes": nbytes, "experts": len(items), "baseline": base, "GBps_median": gbps, "GBps_best": gbps_best,
        "ratio_vs_get": gbps["experts"] / gbps[base], "ratio_vs_get_best": gbps_best["experts"] / gbps_best[base],
        "copy_ratio_vs_get": gbps["experts_copy"] / gbps[base],
        "copy_ratio_vs_get_copy": gbps["experts_copy"] / gbps["get_copy"],
        "swap_bytes_fetched": fetched, "swap_bytes_borrowed": borrowed,
    }
    r = results["transfer"]
    print(f"[bench] transfer of {len(items)} experts ({nbytes / 2**20:.0f} MB), median of 9 (best): {gbps['experts']:.2f} "
          f"({gbps_best['experts']:.2f}) GB/s vs plain ray.get ({base}) {gbps[base]:.2f} ({gbps_best[base]:.2f}) GB/s = "
          f"{r['ratio_vs_get']:.2f} ({r['ratio_vs_get_best']:.2f}) (target >= 0.5)")
    print(f"[bench]   copied into staging buffers instead (a worker past its borrow cap, or a GPU): "
          f"{gbps['experts_copy']:.2f} GB/s = {r['copy_ratio_vs_get']:.2f} of ray.get, {r['copy_ratio_vs_get_copy']:.2f} "
          f"of ray.get + a copy into fresh memory ({gbps['get_copy']:.2f} GB/s)")
    print(f"[bench]   the swaps above kept {borrowed / 2**20:.0f} of {fetched / 2**20:.0f} MB fetched in the object store")
    router.close()
    return results
