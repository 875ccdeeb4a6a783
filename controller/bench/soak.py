"""``ray-eplb bench-runtime --soak MIN``: does anything grow while the runtime serves and rebalances?

Starts the runtime as the demo does: ``--workers`` worker actors with synthetic weights, the
controller on its own loop rebalancing every ``--rebalance-s`` seconds (periodic trigger), and a
router thread dispatching a skewed load whose popularity drifts (the built-in synthetic workload,
a new window every :data:`WINDOW_S` seconds), every output checked against the dense reference.
Each sample also makes a short-lived second router that dispatches one batch and is closed (a
serving replica restarting), so a registry that keeps closed routers shows up.

Every ``--sample-s`` seconds it records the resident memory (RSS) of the controller, of each
worker (pids from Ray's state API, looked up again each time so a restarted actor is followed),
of this driver (the routers) and of Ray's own processes of this cluster (``gcs_server``,
``raylet``, the dashboard and its modules, the dashboard agent, the runtime-env agent, the
monitors), and of each its private memory (USS: RSS also counts the object store's shared pages a
process has mapped, which grow as objects pass through new parts of the store, up to the store's
size); the object-store bytes in use; and
the number of routers the controller tracks. Printed at the end: least-squares slopes over the
samples after ``--warmup`` minutes, in MB per minute (routers: per minute), and the start/end
values. Target (10 minutes, 8 workers): worker and controller slopes under 1 MB/min, the router
registry bounded by the live routers.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Sequence

WINDOW_S = 5.0  # seconds per window of the drifting load
MB = 1e6


def slope_per_min(t_s: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against ``t_s`` (seconds), per minute.

    Raises ``ValueError`` for fewer than 2 points, lengths that differ, non-finite input or all
    ``t_s`` equal."""
    if len(t_s) != len(values):
        raise ValueError(f"{len(t_s)} times but {len(values)} values")
    if len(t_s) < 2:
        raise ValueError(f"a slope needs at least 2 samples, got {len(t_s)}")
    if not all(math.isfinite(float(v)) for v in list(t_s) + list(values)):
        raise ValueError("times and values must be finite")
    n = len(t_s)
    mt, mv = sum(t_s) / n, sum(values) / n
    var = sum((t - mt) ** 2 for t in t_s)
    if var == 0:
        raise ValueError("all samples were taken at the same time")
    return 60.0 * sum((t - mt) * (v - mv) for t, v in zip(t_s, values)) / var


def ray_label(name: str, cmdline: str) -> str | None:
    """Which of Ray's own processes this is (``None``: not one of them, e.g. an actor's worker)."""
    exact = {"gcs_server": "gcs_server", "raylet": "raylet", "ray::DashboardAgent": "dashboard_agent",
             "ray::RuntimeEnvAgent": "runtime_env_agent"}
    if name in exact:
        return exact[name]
    if name.startswith("ray-dashboard-"):
        return "dashboard_modules"  # the dashboard's head modules, one process each (summed)
    for fragment, label in (("dashboard/dashboard.py", "dashboard"), ("autoscaler/_private/monitor.py", "monitor"),
                            ("_private/log_monitor.py", "log_monitor")):
        if name.startswith("python") and fragment in cmdline:
            return label
    return None


def ray_processes() -> dict[str, list[int]]:
    """``{label: [pids]}`` of Ray's own processes among this driver's descendants (the cluster it
    started: other clusters on the machine are never counted)."""
    import psutil

    found: dict[str, list[int]] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            label = ray_label(proc.name(), " ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if label:
            found.setdefault(label, []).append(proc.pid)
    return found


def actor_pids(prefix: str = "ray_eplb_") -> dict[str, int]:
    """``{actor name: pid}`` of the live named actors whose name starts with ``prefix``."""
    import ray
    from ray.util.state import list_actors

    # Our cluster's address: other clusters on the machine must not be asked (nor make the call ambiguous).
    rows = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                       limit=10_000, raise_on_missing_output=False)
    return {a.name: int(a.pid) for a in rows if (a.name or "").startswith(prefix) and a.pid}


def memory(pids: list[int], private: bool = False) -> float | None:
    """Resident memory of ``pids`` together, in bytes (``private``: USS, the pages no other process
    maps, i.e. without the object store's shared pages a process has touched); ``None``: all gone."""
    import psutil

    total, seen = 0.0, False
    for pid in pids:
        try:
            p = psutil.Process(pid)
            total += p.memory_full_info().uss if private else p.memory_info().rss
            seen = True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total if seen else None


def store_bytes() -> float | None:
    """Object-store bytes in use across the cluster (``None`` where Ray's internal API moved)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    try:
        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return float(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - private API: a missing figure, not a failed benchmark
        return None


def sample(ctl: Any, t: float) -> dict:
    """One sample: ``{"t": seconds, "rss": {process: bytes}, "store": bytes, "routers": n}``; every
    process also as ``"NAME (uss)"``: its private memory."""
    import ray

    procs = {**{k: [p] for k, p in actor_pids().items()}, "driver": [os.getpid()], **ray_processes()}
    rss = {k: memory(p) for k, p in procs.items()}
    rss.update({f"{k} (uss)": memory(p, private=True) for k, p in procs.items()})
    out = {"t": t, "rss": rss, "store": store_bytes()}
    out["routers"] = len(ray.get(ctl.status.remote(), timeout=60).routers)
    return out


def slopes(samples: list[dict], warmup_s: float) -> dict:
    """Per series, ``{"slope": per minute, "first": ..., "last": ...}`` over the samples at or after
    ``warmup_s`` (memory in MB; a series missing from a sample is left out of that sample)."""
    kept = [s for s in samples if s["t"] >= warmup_s]
    series: dict[str, list[tuple[float, float]]] = {}
    for s in kept:
        for name, v in s["rss"].items():
            if v is not None:
                series.setdefault(name, []).append((s["t"], v / MB))
        if s["store"] is not None:
            series.setdefault("object_store", []).append((s["t"], s["store"] / MB))
        series.setdefault("routers", []).append((s["t"], float(s["routers"])))
    out = {}
    for name, pts in sorted(series.items()):
        if len(pts) >= 2 and pts[0][0] != pts[-1][0]:
            ts, vs = zip(*pts)
            out[name] = {"slope": slope_per_min(ts, vs), "first": vs[0], "last": vs[-1], "samples": len(pts)}
    return out


def soak(a: argparse.Namespace) -> dict:
    """Run the soak on the connected cluster (``a``: the bench-runtime arguments); the report."""
    import ray
    import torch

    from ray_eplb.actors import SyntheticWeightSource
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.actors.router import Router
    from ray_eplb.controller.bench.reference import DenseMoE, TraceGate
    from ray_eplb.controller.bench.runtime import TOP_K, DispatchLoad
    from ray_eplb.controller.bench.workload import synthetic_trace
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement, Topology

    topo = Topology(num_nodes=a.nodes, gpus_per_node=a.workers // a.nodes, num_layers=a.layers,
                    num_experts=a.experts, slots_per_gpu=math.ceil(a.experts / a.workers) + 1)
    source = SyntheticWeightSource(a.hidden, a.ffn)
    t_start = time.monotonic()
    group = launch_workers(topo, Placement.identity(topo), source, device="cpu")
    cfg = ControllerConfig(interval_s=1.0, collect_timeout_s=0.5, window=3, trigger="periodic",
                           rebalance_period_s=a.rebalance_s, min_gain=0.0, prepare_timeout_s=60)
    ctl = start_controller(topo, cfg)
    router = Router(group.handles, controller=ctl)
    dense = DenseMoE(source, topo.num_layers, topo.num_experts)
    windows = synthetic_trace(int(60 * a.soak / WINDOW_S) + 2, topo.num_layers, topo.num_experts, top_k=TOP_K).load
    gate_net = TraceGate(topo.num_layers, a.hidden, topo.num_experts, TOP_K)
    t0 = time.monotonic()

    def gate(layer, x, gen):  # the drifting, skewed popularity of the current window
        w = min(int((time.monotonic() - t0) / WINDOW_S), windows.shape[0] - 1)
        return gate_net(layer, x, windows[w, layer], gen)

    print(f"[soak] {topo.num_gpus} workers, {topo.num_layers} layers x {topo.num_slots} slots, expert {a.hidden}x{a.ffn}; "
          f"started in {t0 - t_start:.1f} s; {a.soak:g} min, slopes after {a.warmup:g} min, a sample every {a.sample_s:g} s")
    load = DispatchLoad(router, dense, topo.num_layers, topo.num_experts, a.hidden, a.batch_tokens, gate=gate).start()
    samples: list[dict] = []
    churned = 0
    try:
        while True:
            t = time.monotonic() - t0
            samples.append(sample(ctl, t))
            s = samples[-1]
            workers = [v for k, v in s["rss"].items() if k.startswith("ray_eplb_worker") and k[-1] != ")" and v is not None]
            private = [v for k, v in s["rss"].items() if k.startswith("ray_eplb_worker") and k[-1] == ")" and v is not None]
            print(f"[soak] t={t:6.0f} s  controller {(s['rss'].get('ray_eplb_controller') or 0) / MB:6.0f} MB  "
                  f"workers mean {sum(workers) / max(1, len(workers)) / MB:6.0f} MB (private {sum(private) / max(1, len(private)) / MB:4.0f})  "
                  f"gcs {(s['rss'].get('gcs_server') or 0) / MB:5.0f} MB  "
                  f"store {(s['store'] or 0) / MB:6.1f} MB  routers {s['routers']}", flush=True)
            if t >= 60 * a.soak:
                break
            gen = torch.Generator().manual_seed(churned)
            x = torch.randn(8, a.hidden, generator=gen)  # [N, H]
            extra = Router(group.handles, controller=ctl)  # a serving replica coming and going
            try:
                extra.dispatch(0, x, *gate(0, x, gen))
            finally:
                extra.close()
            churned += 1
            time.sleep(max(0.0, a.sample_s - (time.monotonic() - t0 - t)))
    finally:
        load.stop()
        st = ray.get(ctl.status.remote())
        router.close()
        ray.kill(ctl)
        group.shutdown()
    return report(a, samples, st, load, churned)


def report(a: argparse.Namespace, samples: list[dict], status: Any, load: Any, churned: int) -> dict:
    """Print the slopes and return the JSON report."""
    fit = slopes(samples, 60 * a.warmup)
    workers = {k: v for k, v in fit.items() if k.startswith("ray_eplb_worker") and not k.endswith("(uss)")}
    workers_uss = {k: v for k, v in fit.items() if k.startswith("ray_eplb_worker") and k.endswith("(uss)")}
    out = {
        "minutes": a.soak, "warmup_minutes": a.warmup, "workers": a.workers, "samples": len(samples),
        "slopes_mb_per_min": {k: round(v["slope"], 3) for k, v in fit.items() if k != "routers"},
        "worker_slope_max_mb_per_min": round(max((v["slope"] for v in workers.values()), default=float("nan")), 3),
        "worker_slope_mean_mb_per_min": round(sum(v["slope"] for v in workers.values()) / max(1, len(workers)), 3),
        "worker_uss_slope_max_mb_per_min": round(max((v["slope"] for v in workers_uss.values()), default=float("nan")), 3),
        "first_mb": {k: round(v["first"], 1) for k, v in fit.items() if k != "routers"},
        "last_mb": {k: round(v["last"], 1) for k, v in fit.items() if k != "routers"},
        "routers_per_min": round(fit["routers"]["slope"], 3) if "routers" in fit else None,
        "routers_tracked_end": samples[-1]["routers"] if samples else None,
        "routers_made": 1 + churned, "routers_live_end": 1,
        "rebalances": status.rebalances, "aborts": status.aborts, "epoch": status.epoch,
        "dispatches": len(load.log), "mismatched_tokens": load.mismatched, "errors": list(status.errors)[-3:],
    }
    print(f"[soak] {out['samples']} samples over {a.soak:g} min; {out['rebalances']} rebalances, {out['aborts']} aborted, "
          f"{out['dispatches']} dispatches, {out['mismatched_tokens']} mismatched tokens")
    print(f"[soak] slopes after {a.warmup:g} min warm-up, MB/min (first -> last MB):")
    for name in sorted(out["slopes_mb_per_min"], key=lambda k: (not k.startswith("ray_eplb"), k)):
        print(f"[soak]   {name:28s} {out['slopes_mb_per_min'][name]:+8.2f}   ({out['first_mb'][name]:.0f} -> {out['last_mb'][name]:.0f})")
    print(f"[soak] workers: max RSS slope {out['worker_slope_max_mb_per_min']:+.2f}, mean {out['worker_slope_mean_mb_per_min']:+.2f} "
          f"MB/min, max private (USS) slope {out['worker_uss_slope_max_mb_per_min']:+.2f} MB/min "
          f"(target < 1); routers tracked at the end {out['routers_tracked_end']} of {out['routers_made']} made, "
          f"{out['routers_live_end']} live ({out['routers_per_min'] if out['routers_per_min'] is not None else 'n/a'} per min)")
    return out
