"""``ray-eplb demo``: the whole system on an embedded local Ray cluster.

Starts a local cluster (``--nodes`` raylets, each offering ``--workers / --nodes`` rank slots),
discovers the topology from it, launches one expert worker per rank and the controller, and
replays a real expert-load trace through a small MoE (real gate, real SwiGLU experts) via the
router, while the controller rebalances on its own loop. Every MoE output is checked against a
dense single-process reference. Ray's token authentication is on for the cluster it starts (unless
``RAY_AUTH_MODE`` says otherwise): see :mod:`ray_eplb.controller.cli.auth`.

The controller plans incrementally from the current placement by default (``--planning``,
``--max-moves``, ``--budget-scope``, ``--min-layer-gain``, ``--forecast``); ``--compare`` replays
the trace twice, from-scratch planning against incremental planning that rebalances more often
(:mod:`ray_eplb.controller.cli.compare`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

KNOWN_TOP_K = {"dsv2lite": 6, "llama4": 1, "qwen3": 8, "qwen2": 8, "olmoe": 8, "mixtral": 2}


def parse(argv: list[str]) -> argparse.Namespace:
    from ray_eplb.controller.cli.args import Parser, nonneg, nonneg_int, number, positive, positive_int

    ap = Parser(prog="ray-eplb demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=positive_int, default=8, help="expert-parallel ranks (default 8)")
    ap.add_argument("--nodes", type=positive_int, default=2, help="raylets to start; ranks are split evenly (default 2)")
    ap.add_argument("--trace", default=None, help="trace name in ../shared/traces or path to a .npz (default dsv2lite_puffin)")
    ap.add_argument("--windows", type=nonneg_int, default=0, help="trace windows to replay (default: all; static tables: 12)")
    ap.add_argument("--layers", type=nonneg_int, default=0, help="MoE layers to use from the trace (default: all)")
    ap.add_argument("--batches-per-window", type=positive_int, default=2, help="dispatch batches per trace window (default 2)")
    ap.add_argument("--batch-tokens", type=positive_int, default=256, help="tokens per dispatch batch (default 256)")
    ap.add_argument("--top-k", type=nonneg_int, default=0, help="experts per token (default: known for the trace, else 6)")
    ap.add_argument("--hidden", type=positive_int, default=64, help="expert hidden size")
    ap.add_argument("--ffn", type=positive_int, default=128, help="expert FFN width")
    ap.add_argument("--slots-per-gpu", type=nonneg_int, default=0, help="default ceil(experts / workers) + 1")
    ap.add_argument("--interval", type=positive, default=1.0, help="controller loop period, seconds")
    ap.add_argument("--rebalance-period", type=positive, default=6.0, help="periodic trigger, seconds")
    ap.add_argument("--trigger", choices=("periodic", "drift", "both"), default="both",
                    help="what starts a rebalance: the period, load drift, or either (default both)")
    ap.add_argument("--min-gain", type=nonneg, default=0.01,
                    help="skip a rebalance whose predicted balancedness gain is below this (default 0.01)")
    ap.add_argument("--planning", choices=("incremental", "fresh"), default="incremental",
                    help="incremental: change only what pays, from the current placement (default); "
                         "fresh: solve from scratch every rebalance")
    ap.add_argument("--max-moves", type=_budget, default=None,
                    help="move budget per rebalance: slots (int) or a fraction of the slots (e.g. 0.1); default none")
    ap.add_argument("--budget-scope", choices=("layer", "total"), default="layer",
                    help="--max-moves applies per layer or to the whole model (default layer)")
    ap.add_argument("--min-layer-gain", type=nonneg, default=0.0, help="hysteresis: a layer moves only if its peak falls by more")
    ap.add_argument("--prepare-timeout", type=positive, default=120.0,
                    help="seconds a swap may take to stage all its batches before it is aborted (default 120)")
    ap.add_argument("--batch-mib", type=positive, default=16.0,
                    help="transfer batches: no rank sends or receives more than this many MiB per batch (default 16)")
    ap.add_argument("--forecast", default=None, help="forecast spec: ema:ALPHA | window:W | last (default ema:0.5)")
    ap.add_argument("--compare", action="store_true",
                    help="run the trace twice: from-scratch planning, then incremental planning rebalancing "
                         "--compare-ratio times as often with --max-moves (default 0.1); print both")
    ap.add_argument("--compare-ratio", type=number(1.0), default=4.0,
                    help="with --compare: how many times as often the incremental run rebalances (default 4)")
    ap.add_argument("--window-seconds", type=nonneg, default=None,
                    help="replay each window over at least this long (default: the controller interval, so "
                         "the controller sees every window)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where experts compute: cuda when the cluster has GPUs (auto, the default), or forced")
    ap.add_argument("--checkpoint", default=None, help="write (if absent) and serve weights from this .safetensors file")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    ap.add_argument("--model", metavar="DIR", help="generate with a local Hugging Face MoE model instead "
                    "(its own options: ray-eplb demo --model DIR --help)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the gate and the token stream (default 0)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="write PNG plots here at the end: balancedness over time, per-GPU load before/after a rebalance")
    ap.add_argument("--screenshot", default=None, metavar="PNG",
                    help="also open the dashboard's Actors page in headless Chromium, check our actors are "
                         "listed, open the controller's log page (its Log link) and check it shows each epoch's "
                         "line; save screenshots of both here (PNG, and PNG_log.png; needs chromium on PATH)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the cluster, the workers and the controller running after the demo, and print the "
                         "dashboard URL, how to log in, and how to stop them")
    a = ap.parse_args(argv)
    if a.workers % a.nodes:
        ap.error(f"--workers={a.workers} is not divisible by --nodes={a.nodes}")
    if int(a.batch_mib * 2**20) < 1:
        ap.error(f"--batch-mib={a.batch_mib:g} is less than one byte")
    for flag, path in (("--checkpoint", a.checkpoint), ("--screenshot", a.screenshot)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            ap.error(f"{flag}={path!r}: not a file in an existing folder")
    if a.screenshot and not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        ap.error("--screenshot needs chromium (or google-chrome) on PATH")
    if a.keep and (a.compare or a.address):
        ap.error(f"--keep keeps the cluster the demo starts: not with {'--compare' if a.compare else '--address'}")
    if a.device == "cuda" and not a.address and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU on this machine")
    for name in ("min_gain", "min_layer_gain"):
        if getattr(a, name) >= 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be < 1")
    if a.slots_per_gpu and a.top_k and a.slots_per_gpu * a.workers < a.top_k:
        ap.error(f"--slots-per-gpu={a.slots_per_gpu} x --workers={a.workers} slots cannot hold --top-k={a.top_k} experts")
    try:
        controller_config(a)  # bad budget / forecast / planning combinations fail before any cluster starts
    except ValueError as exc:
        ap.error(str(exc))
    return a


def check_shape(a: argparse.Namespace, num_windows: int, num_layers: int, num_experts: int, static: bool) -> str | None:
    """What is wrong with the arguments for a trace of ``[num_windows, num_layers, num_experts]``
    (``static``: one table, sampled into windows), or ``None``."""
    if a.windows > num_windows and not static:
        return f"--windows={a.windows} exceeds the trace's {num_windows} windows"
    if a.layers > num_layers:
        return f"--layers={a.layers} exceeds the trace's {num_layers} layers"
    if a.top_k > num_experts:
        return f"--top-k={a.top_k} exceeds the trace's {num_experts} experts"
    if a.slots_per_gpu and a.slots_per_gpu * a.workers < num_experts:
        return (f"--slots-per-gpu={a.slots_per_gpu} x --workers={a.workers} = {a.slots_per_gpu * a.workers} slots "
                f"cannot hold the trace's {num_experts} experts (need >= {math.ceil(num_experts / a.workers)} per GPU)")
    return None


def _budget(text: str) -> int | float:
    """``--max-moves``: ``8`` is a slot count, ``0.1`` (or ``1.0``) a fraction of the slots."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a slot count nor a fraction") from None


def controller_config(a: argparse.Namespace):
    """The demo's :class:`ControllerConfig` from its arguments (``ValueError`` names bad values)."""
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.forecast import DEFAULT_SPEC

    return ControllerConfig(
        interval_s=a.interval, collect_timeout_s=min(0.5, a.interval / 2), window=3, trigger=a.trigger,
        rebalance_period_s=max(a.rebalance_period, a.interval), drift_threshold=0.9, min_gain=a.min_gain,
        planning=a.planning, max_moves=a.max_moves, budget_scope=a.budget_scope,
        min_layer_gain=a.min_layer_gain, forecast=a.forecast or DEFAULT_SPEC,
        transfer_batch_bytes=int(a.batch_mib * 2**20), prepare_timeout_s=a.prepare_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse(list(sys.argv[1:] if argv is None else argv))
    t_start = time.monotonic()
    from ray_eplb.controller.bench.workload import load_workload

    try:
        trace = load_workload(a.trace)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ray-eplb demo: error: {exc}", file=sys.stderr)
        return 2
    problem = check_shape(a, *trace.load.shape, static=trace.static)
    if problem:
        print(f"ray-eplb demo: error: {problem}", file=sys.stderr)
        return 2
    load = trace.load  # [T, L, E]
    if trace.static:
        from ray_eplb.controller.bench.workload import sample_windows

        load = sample_windows(load[0], a.windows or 12, 200_000, seed=a.seed)
    if a.windows:
        load = load[: a.windows]
    if a.layers:
        load = load[:, : a.layers]
    num_windows, num_layers, num_experts = load.shape
    top_k = a.top_k or trace.top_k or next((k for p, k in KNOWN_TOP_K.items() if trace.name.startswith(p)), 6)
    top_k = min(top_k, num_experts)
    print(f"[demo] trace {trace.name}{' (synthetic)' if trace.synthetic else ''}: {num_windows} windows x "
          f"{num_layers} layers x {num_experts} experts, top-{top_k}")
    from ray_eplb.controller.cli.cluster import start_cluster

    cluster, gpu_fraction = start_cluster(a)
    keep = False
    try:
        if a.compare:
            from ray_eplb.controller.cli.compare import compare

            return compare(a, lambda args: run(args, load, top_k, gpu_fraction, t_start))
        summary = run(a, load, top_k, gpu_fraction, t_start)
        if a.keep:
            from ray_eplb.controller.cli.keep import announce

            keep = announce(summary, cluster.address, a.token_where)
        if a.json:
            print(json.dumps(summary))
        return 0 if summary["ok"] else 1
    finally:
        import ray

        ray.shutdown()
        if cluster is not None and not keep:
            cluster.shutdown()


def run(a: argparse.Namespace, load: torch.Tensor, top_k: int, gpu_fraction: float, t_start: float) -> dict:
    """Launch workers and the controller, replay ``load [T, L, E]``, tear them down; the summary."""
    import ray

    from ray_eplb.actors import SafetensorsWeightSource, SyntheticWeightSource, write_checkpoint
    from ray_eplb.actors.ray_worker import RANK_RESOURCE, launch_workers, rank_resource
    from ray_eplb.actors.router import Router
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement, discover_topology

    num_windows, num_layers, num_experts = load.shape
    res = rank_resource(a.device)
    slots = a.slots_per_gpu or math.ceil(num_experts / a.workers) + 1
    # On the cluster the demo started, every node offers one RANK_RESOURCE unit per rank: count
    # those (ranks may share a GPU when there are fewer GPUs than ranks); else GPUs / ranks.
    own = None if a.address else RANK_RESOURCE
    topo = discover_topology(
        num_experts, num_layers, slots_per_gpu=slots, resource=own or (res if res != "CPU" else None)
    )
    if topo.num_gpus != a.workers and not a.address:
        topo = topo.model_copy(update={"num_nodes": a.nodes, "gpus_per_node": a.workers // a.nodes})
    source = SyntheticWeightSource(a.hidden, a.ffn, seed=a.seed)
    if a.checkpoint:
        from pathlib import Path

        if not Path(a.checkpoint).exists():
            write_checkpoint(a.checkpoint, source, num_layers, num_experts)
            print(f"[demo] wrote checkpoint {a.checkpoint}")
        source = SafetensorsWeightSource(a.checkpoint)
    p0 = Placement.identity(topo)
    print(f"[demo] cluster up ({time.monotonic() - t_start:.1f} s): {topo.num_nodes} nodes x {topo.gpus_per_node} ranks "
          f"({res}), {topo.slots_per_gpu} slots per rank; starting workers")
    from ray_eplb.controller.cli.keep import lifetime_for

    lifetime = lifetime_for(a.keep)  # --keep: detached, they outlive this driver
    group = launch_workers(topo, p0, source, device=a.device, gpu_fraction=gpu_fraction, lifetime=lifetime)
    cfg = controller_config(a)
    ctl = start_controller(topo, cfg, p0, lifetime=lifetime)
    router = Router(group.handles, controller=ctl)
    done = False
    try:
        summary = _replay(a, load, top_k, topo, source, p0, group, ctl, router, t_start)
        done = True
        return summary
    finally:
        router.close()
        if not (a.keep and done):
            ray.kill(ctl)
            group.shutdown()


def _replay(a, load, top_k, topo, source, p0, group, ctl, router, t_start) -> dict:
    """Replay every window of ``load [T, L, E]`` through the router; check, measure, summarise."""
    import ray

    from ray_eplb.controller.bench.reference import DenseMoE, TraceGate, mismatched, rms_norm
    from ray_eplb.solver import balancedness

    num_windows, num_layers, num_experts = load.shape
    tag = f"[demo {a.planning}]"
    gate = TraceGate(num_layers, source.hidden_size, num_experts, top_k, seed=a.seed)
    dense = DenseMoE(source, num_layers, num_experts)
    print(f"[demo] {topo.num_gpus} workers ({group.device}) and the controller ready ({time.monotonic() - t_start:.1f} s); replaying")
    gen = torch.Generator().manual_seed(a.seed + 1)
    tokens = bad_tokens = 0
    rows = []
    t_replay = time.monotonic()
    from ray_eplb.controller.cli.progress import SwapBar, controller_poll, wanted

    # A bar while a swap stages its batches, on a terminal (not with --json).
    with SwapBar(controller_poll(ctl), wanted(sys.stdout, a.json), stream=sys.stdout):
        for t in range(num_windows):
            epoch0 = router.placement.epoch
            logical = torch.zeros(num_layers, num_experts, dtype=torch.float64)  # [L, E] routed this window
            rank_before = router.rank_tokens.clone()  # [L, G]
            tw = time.monotonic()
            for _ in range(a.batches_per_window):
                x = torch.randn(a.batch_tokens, source.hidden_size, generator=gen)  # [N, H]
                bad = torch.zeros(a.batch_tokens, dtype=torch.bool)
                for layer in range(num_layers):
                    xn = rms_norm(x)
                    ids, w = gate(layer, xn, load[t, layer], gen)  # [N, K], [N, K]
                    y = router.dispatch(layer, xn, ids, w)
                    bad |= mismatched(y, dense(layer, xn, ids, w))
                    logical[layer] += torch.bincount(ids.reshape(-1), minlength=num_experts).double()
                    x = x + y
                tokens += a.batch_tokens
                bad_tokens += int(bad.sum())
            busy = time.monotonic() - tw
            rest = (a.interval if a.window_seconds is None else a.window_seconds) - (time.monotonic() - tw)
            if rest > 0:
                time.sleep(rest)
            per_rank = (router.rank_tokens - rank_before).double()  # [L, G] actual load per rank
            actual = float(per_rank.mean(1).sum() / per_rank.max(1).values.sum())
            static = balancedness(p0.phy2log, p0.logcnt, logical, topo.num_gpus)
            st = ray.get(ctl.status.remote())
            rows.append({"window": t, "epoch": epoch0, "epoch_end": router.placement.epoch, "actual": actual, "static": static})
            print(f"{tag} window {t:2d}  epoch {epoch0:2d}->{router.placement.epoch:2d}  balancedness {actual:.3f} "
                  f"(static placement {static:.3f})  {a.batches_per_window * a.batch_tokens / busy:6.0f} tok/s  "
                  f"rebalances {st.rebalances}  moved {st.experts_moved} ({st.bytes_moved / 2**20:.1f} MiB)  "
                  f"mismatched {bad_tokens}")
    replay_s = time.monotonic() - t_replay
    from ray_eplb.controller.cli.dashboard import check_live, dashboard_summary, report_lines

    dash = check_live(ctl, a.screenshot)  # stops the controller's loop
    st = ray.get(ctl.status.remote())
    hist = ray.get(ctl.history.remote())
    plots = []
    if a.out:
        from ray_eplb.controller.cli.plots import write_plots

        plots = write_plots(a.out, ray.get(ctl.timeline.remote()), hist, ray.get(ctl.rebalance_loads.remote()))
    states = ray.get([h.state.remote() for h in group.handles])
    identity_bad = sum(len(v) for v in ray.get([h.verify.remote() for h in group.handles]))
    after, which = [r for r in rows if r["epoch"] > 0], "the {n} windows served after the first rebalance"
    if not after:
        after, which = [r for r in rows if r["epoch_end"] > 0], "the {n} window(s) in which the first rebalance took effect"
    if not after:
        after, which = rows, "all {n} windows (no rebalance took effect)"
    which = which.format(n=len(after))
    swaps = [h["swap_s"] for h in hist if h.get("action") == "committed"]
    summary = {
        "balancedness_before": round(sum(r["static"] for r in after) / len(after), 4),
        "balancedness_after": round(sum(r["actual"] for r in after) / len(after), 4),
        "balancedness_run": round(sum(r["actual"] for r in rows) / len(rows), 4),
        "planning": a.planning,
        "max_moves": a.max_moves,
        "rebalance_period_s": float(st.config["rebalance_period_s"]),
        "rebalances": st.rebalances,
        "experts_moved": st.experts_moved,
        "bytes_moved": st.bytes_moved,
        "transfer_batches": st.transfer_batches,
        "aborted": sum(h.get("action") == "aborted" for h in hist),
        "swap_s_mean": round(sum(swaps) / len(swaps), 2) if swaps else None,
        "tokens": tokens,
        "mismatched_tokens": bad_tokens,
        "max_stall_ms": round(max([1e3 * router.max_stall_s] + [s["max_lock_wait_ms"] for s in states]), 3),
        "wrong_weight_slots": identity_bad,
        "dashboard": dashboard_summary(dash, hist),
        "ok": bad_tokens == 0 and identity_bad == 0,
    }
    aborted = sum(h.get("action") == "aborted" for h in hist)
    for err in st.errors[-5:]:
        print(f"[demo] controller error: {err}")
    print(f"[demo] done in {time.monotonic() - t_start:.1f} s (replay {replay_s:.1f} s, {tokens / replay_s:.0f} tokens/s "
          f"through {num_layers} layers); final epoch {st.epoch}, {aborted} aborted rounds, "
          f"{router.retries} router re-routes, {identity_bad} slots with wrong weights")
    print(f"[demo] balancedness over {which}: "
          f"{summary['balancedness_before']:.3f} with the start placement -> {summary['balancedness_after']:.3f} measured")
    print(f"{tag} rebalances {st.rebalances}, moved {st.experts_moved} slots ({st.bytes_moved / 2**20:.1f} MiB) "
          f"in {st.transfer_batches} transfer batches; mean balancedness over the run {summary['balancedness_run']:.3f}")
    print(f"[demo] tokens {tokens}, mismatched vs dense reference {bad_tokens}, max stall {summary['max_stall_ms']:.2f} ms")
    print("\n".join(report_lines(dash, summary["dashboard"]["epochs"])))
    if plots:
        print(f"[demo] plots: {', '.join(plots)}")
    summary["plots"] = plots
    return summary

