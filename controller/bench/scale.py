"""Scale benchmark: the solver on production-sized shapes, side by side with the greedy baseline.

Shapes (layers x experts, slots on GPUs, nodes, expert groups):

* ``dsv3_prefill``: 58 x 256, 288 slots on 32 GPUs, 4 nodes, 8 groups (DeepSeek-V3 prefill);
* ``dsv3_decode``: 58 x 256, 320 slots on 320 GPUs (one each), 40 nodes, 8 groups;
* ``kimi_k2``: 61 x 384, 448 slots on 64 GPUs, 8 nodes, 1 group (Kimi-K2-like);
* ``qwen3_235b``: 94 x 128, 160 slots on 32 GPUs, 4 nodes, 1 group (Qwen3-235B-like);
* ``wide_1024``: 61 x 384, 1024 slots on 1024 GPUs (one each), 128 nodes, 1 group.

Loads. *Synthetic*: the built-in workload of :mod:`ray_eplb.controller.bench.workload`: per layer,
expert popularity follows a Zipf law with exponent 0.9 over a random permutation of the experts;
from window to window the log-popularities take a Gaussian random walk (sigma 0.15), every fifth
window two random experts per layer swap popularity, and each window routes 20,000 tokens x top-8
per layer multinomially. *Tiled trace* (when the traces folder is there): a real trace stretched
to the shape. Experts: ``E / E0`` copies of the trace's ``E0`` experts side by side, copy ``k`` of
layer ``l`` taken from trace layer ``(l + 7k) mod L0``; layers cycle through the trace's layers.
``dsv2lite_puffin`` (26 x 64, 20 windows) tiles every shape with a multiple of 64 experts;
``qwen3_235b_prover`` (94 x 128, one static table sampled into windows of 200,000 tokens) fits the
Qwen3 shape as it is.

Per shape, window ``t`` (from the second on) is planned by:

* ``greedy``: :func:`ray_eplb.solver.baseline.greedy_rebalance_experts` (DeepSeek's algorithm);
* ``fresh``: ``rebalance_experts`` from scratch;
* ``migrate``: ``rebalance_experts(..., old_phy2log=fresh plan of window t-1)``;
* ``migrate_25``: the same with ``max_moves=0.25``;
* ``from_greedy``: ``old_phy2log`` = the greedy's plan of window ``t-1`` (a foreign starting plan);
* ``no_move``: ``old_phy2log`` = the fresh plan of window ``t`` itself (nothing needs to move).

Reported: median solve time (ms) and its ratio to the greedy's in the same run, in-window and
next-window balancedness (mean over windows of ``sum mean GPU load / sum max GPU load``), avoidable
duplicates (duplicate (layer, GPU) pairs beyond the unavoidable ones, summed over windows), and
slots moved (fraction of slots changed against the starting plan, or against the variant's own
previous plan). A growth sweep times the fresh solve, the migration-aware call and the greedy as
slots per GPU (8..32), layers and experts grow; there the fresh solve is also timed with
``log2phy_width="used"`` (``log2phy [L, E, M]`` only as wide as the most replicas of an expert,
instead of ``R - E + 1``), the plan alone (``place_experts``: ``phy2log`` only), and building the
maps alone at either width, and the growth from the fewest to the most slots per GPU is printed as
ratios: the plan, the whole call at full width and at the used width.

Single-threaded by design: torch runs on one thread and every BLAS/OpenMP pool numpy or scipy
loaded is limited to one thread (threadpoolctl) for the whole run, so the times are one core's;
they are the process's CPU time per solve (equal to wall time on an idle machine, and not
inflated when other processes share the cores).

    ray-eplb bench --scale [--shapes kimi_k2 ...] [--windows 4] [--repeats 3] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_eplb.controller.bench.cases import Case
from ray_eplb.controller.bench.solver import unavoidable_duplicates
from ray_eplb.controller.bench.workload import default_traces_dir, load_trace, sample_windows, synthetic_trace
from ray_eplb.solver import balancedness, duplicate_pairs, logical_maps, place_experts, rebalance_experts
from ray_eplb.solver.baseline import greedy_rebalance_experts

VARIANTS = ("greedy", "fresh", "migrate", "migrate_25", "from_greedy", "no_move")


@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def case(self) -> Case:
        return Case(self.name, self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus)

    @property
    def args(self) -> tuple[int, int, int, int]:
        return self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus


SHAPES = [
    Shape("dsv3_prefill", 58, 256, 288, 8, 4, 32),
    Shape("dsv3_decode", 58, 256, 320, 8, 40, 320),
    Shape("kimi_k2", 61, 384, 448, 1, 8, 64),
    Shape("qwen3_235b", 94, 128, 160, 1, 4, 32),
    Shape("wide_1024", 61, 384, 1024, 1, 128, 1024),
]
QUICK_SHAPE = Shape("quick", 6, 64, 96, 4, 2, 16)


def synthetic_load(shape: Shape, windows: int, seed: int) -> torch.Tensor:
    """The synthetic skewed, drifting load of the module docstring, ``[T, L, E]`` float64."""
    return synthetic_trace(windows, shape.num_layers, shape.num_experts, top_k=8, skew=0.9, drift=0.15,
                           shift_every=5, seed=seed).load


def tile_load(src: torch.Tensor, num_layers: int, num_experts: int) -> torch.Tensor:
    """Stretch ``src [T, L0, E0]`` to ``[T, num_layers, num_experts]`` (``E0`` must divide ``num_experts``):
    expert copy ``k`` of layer ``l`` is trace layer ``(l + 7k) mod L0``."""
    _, l0, e0 = src.shape
    if num_experts % e0:
        raise ValueError(f"num_experts={num_experts} is not a multiple of the trace's {e0} experts")
    layers = torch.arange(num_layers)
    tiles = [src[:, (layers + 7 * k) % l0] for k in range(num_experts // e0)]  # each [T, L, E0]
    return torch.cat(tiles, dim=2)


def trace_load(shape: Shape, traces_dir: Path | None, windows: int, seed: int) -> tuple[str, torch.Tensor] | None:
    """A real trace fitted to ``shape`` (see the module docstring), ``(label, [T, L, E])``, or ``None``."""
    if traces_dir is None or not Path(traces_dir).is_dir():
        return None
    try:
        if (shape.num_layers, shape.num_experts) == (94, 128):
            table = load_trace("qwen3_235b_prover", traces_dir).load[0]  # [94, 128]
            return "qwen3_235b_prover", sample_windows(table, windows, 200_000, seed)
        if shape.num_experts % 64 == 0:
            src = load_trace("dsv2lite_puffin", traces_dir).load[:windows]  # [T, 26, 64]
            return "dsv2lite_puffin tiled", tile_load(src, shape.num_layers, shape.num_experts)
    except FileNotFoundError:
        return None
    return None


def _avoidable(phy2log: torch.Tensor, logcnt: torch.Tensor, shape: Shape) -> int:
    return duplicate_pairs(phy2log, shape.num_gpus) - unavoidable_duplicates(phy2log, logcnt, shape.case)


def _timed(fn, repeats: int, times: list[float]):
    """Run ``fn`` ``repeats`` times; append each run's CPU time of this process (one thread: its
    wall time on an idle machine, and not inflated by other processes on a busy one)."""
    out = None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return out


def measure(shape: Shape, load: torch.Tensor, repeats: int, greedy_repeats: int = 1,
            variants: tuple[str, ...] = VARIANTS) -> dict:
    """Plan windows ``1..T-1`` of ``load [T, L, E]`` with every variant (taking turns window by
    window); returns ``{variant: {ms, ratio_to_greedy, in_window, next_window, avoidable_dups,
    moved_frac}}``."""
    args, p = shape.args, shape.num_gpus
    ours = {
        "fresh": lambda w, old: rebalance_experts(w, *args),
        "fresh_used": lambda w, old: rebalance_experts(w, *args, log2phy_width="used"),
        "plan": lambda w, old: place_experts(w, *args),
        "migrate": lambda w, old: rebalance_experts(w, *args, old_phy2log=old),
        "migrate_25": lambda w, old: rebalance_experts(w, *args, old_phy2log=old, max_moves=0.25),
        "from_greedy": lambda w, old: rebalance_experts(w, *args, old_phy2log=old),
        "no_move": lambda w, old: rebalance_experts(w, *args, old_phy2log=old),
    }
    times = {v: [] for v in variants}
    inw, nxt, dups, moved = ({v: [] for v in variants} for _ in range(4))
    rebalance_experts(load[0], *args)  # warm-up (imports, caches)
    prev_fresh = rebalance_experts(load[0], *args)[0]
    prev_greedy = greedy_rebalance_experts(load[0], *args)[0]
    prev = {"fresh": prev_fresh, "greedy": prev_greedy}
    for t in range(1, load.shape[0]):
        w = load[t]
        plan_fresh = greedy_plan = None
        for v in ("fresh", "greedy") + tuple(x for x in variants if x not in ("fresh", "greedy")):
            if v == "greedy":
                ph, _, cnt = _timed(lambda w=w: greedy_rebalance_experts(w, *args), greedy_repeats, times.get(v, []))
                greedy_plan = ph
                start = prev["greedy"]
            elif v == "fresh":
                ph, _, cnt = _timed(lambda w=w: ours["fresh"](w, None), repeats, times.get(v, []))
                plan_fresh = ph
                start = prev["fresh"]
            else:
                start = {"fresh_used": prev_fresh, "plan": prev_fresh, "migrate": prev_fresh,
                         "migrate_25": prev_fresh, "from_greedy": prev_greedy, "no_move": plan_fresh}[v]
                out = _timed(lambda w=w, v=v, start=start: ours[v](w, start), repeats, times[v])
                # place_experts returns the plan alone: its replica counts are taken after the clock.
                ph, cnt = (out, logical_maps(out, shape.num_experts, "used")[1]) if v == "plan" else (out[0], out[2])
            if v not in variants:
                continue
            inw[v].append(balancedness(ph, cnt, w, p))
            if t + 1 < load.shape[0]:
                nxt[v].append(balancedness(ph, cnt, load[t + 1], p))
            dups[v].append(_avoidable(ph, cnt, shape))
            moved[v].append(float((ph != start).double().mean()))
        prev_fresh, prev_greedy = plan_fresh, greedy_plan
        prev = {"fresh": plan_fresh, "greedy": greedy_plan}
    out = {}
    for v in variants:
        ms = statistics.median(times[v]) * 1e3
        out[v] = {"ms": ms, "in_window": statistics.fmean(inw[v]),
                      "next_window": statistics.fmean(nxt[v]) if nxt[v] else None,
                      "avoidable_dups": int(sum(dups[v])), "moved_frac": statistics.fmean(moved[v])}
    g = out["greedy"]["ms"] if "greedy" in out else None
    for res in out.values():
        res["ratio_to_greedy"] = res["ms"] / g if g else None
    return out


def growth_sweep(windows: int, repeats: int, seed: int, quick: bool) -> list[dict]:
    """Fresh (full and used ``log2phy`` width, and the plan alone), migration-aware and greedy times,
    and the maps alone at both widths, as slots per GPU, layers and experts grow."""
    if quick:
        shapes = [("slots_per_gpu", 4, Shape("s4", 4, 48, 64, 4, 2, 16)),
                  ("slots_per_gpu", 8, Shape("s8", 4, 48, 128, 4, 2, 16))]
    else:
        # 64 GPUs so that 8 slots per GPU (512) still replicate the 256 experts.
        shapes = [("slots_per_gpu", s, Shape(f"spg{s}", 58, 256, 64 * s, 8, 8, 64)) for s in (8, 12, 16, 24, 32)]
        shapes += [("layers", n, Shape(f"L{n}", n, 256, 288, 8, 4, 32)) for n in (29, 58, 116)]
        shapes += [("experts", e, Shape(f"E{e}", 58, e, e + 32, 8, 4, 32)) for e in (128, 256, 512)]
    rows = []
    for axis, value, shape in shapes:
        load = synthetic_load(shape, windows, seed)
        res = measure(shape, load, repeats, 1, ("greedy", "fresh", "fresh_used", "plan", "migrate"))
        maps_ms, maps_used_ms, used_width = _maps_ms(shape, load[-1], repeats)
        rows.append({"axis": axis, "value": value, "shape": shape.name, "fresh_ms": res["fresh"]["ms"],
                     "fresh_used_ms": res["fresh_used"]["ms"], "plan_ms": res["plan"]["ms"],
                     "migrate_ms": res["migrate"]["ms"],
                     "greedy_ms": res["greedy"]["ms"], "fresh_in_window": res["fresh"]["in_window"],
                     "greedy_in_window": res["greedy"]["in_window"], "maps_ms": maps_ms,
                     "maps_used_ms": maps_used_ms, "full_width": shape.num_replicas - shape.num_experts + 1,
                     "used_width": used_width})
    return rows


def growth_ratios(rows: list[dict]) -> dict | None:
    """The growth from the fewest to the most slots per GPU of the sweep ``rows``: ``{from, to,
    plan, call_full, call_used, maps_full, maps_used, width_used}`` (each the ratio of the two rows'
    figures; ``plan``: ``place_experts``, the plan alone, timed as a call of its own), or ``None``
    without two such rows."""
    spg = sorted((g for g in rows if g["axis"] == "slots_per_gpu"), key=lambda g: g["value"])
    if len(spg) < 2:
        return None
    lo, hi = spg[0], spg[-1]
    return {"from": lo["value"], "to": hi["value"],
            "plan": hi["plan_ms"] / lo["plan_ms"],
            "call_full": hi["fresh_ms"] / lo["fresh_ms"], "call_used": hi["fresh_used_ms"] / lo["fresh_used_ms"],
            "maps_full": hi["maps_ms"] / lo["maps_ms"], "maps_used": hi["maps_used_ms"] / lo["maps_used_ms"],
            "width_used": hi["used_width"] / lo["used_width"]}


def _maps_ms(shape: Shape, w: torch.Tensor, repeats: int) -> tuple[float, float, int]:
    """Median CPU ms of building the outputs ``log2phy [L, E, M]`` and ``logcnt`` from a fresh plan
    of ``w [L, E]`` at the full width ``M = R - E + 1`` (part of every default fresh solve, and the
    part that grows with ``R - E + 1``) and at the used width; and that used width. The two are
    timed in turns."""
    phy2log = rebalance_experts(w, *shape.args)[0]
    full: list[float] = []
    used: list[float] = []
    for _ in range(repeats):
        _timed(lambda: logical_maps(phy2log, shape.num_experts), 1, full)
        log2phy = _timed(lambda: logical_maps(phy2log, shape.num_experts, "used"), 1, used)[0]
    return statistics.median(full) * 1e3, statistics.median(used) * 1e3, int(log2phy.shape[2])


def run(args: argparse.Namespace) -> dict:
    shapes = [QUICK_SHAPE] if args.quick else [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    if args.sweep_only:
        shapes = []
    elif not shapes:
        raise ValueError(f"--shapes {args.shapes!r} matches none of {[s.name for s in SHAPES]}")
    traces_dir = Path(args.traces_dir) if args.traces_dir else default_traces_dir()
    report = {"threads": 1, "windows": args.windows, "repeats": args.repeats, "results": []}
    for shape in shapes:
        loads = [("synthetic", synthetic_load(shape, args.windows, args.seed))]
        if not args.quick and not args.no_trace:
            tiled = trace_load(shape, traces_dir, args.windows, args.seed)
            if tiled is not None:
                loads.append(tiled)
        for label, load in loads:
            if not args.quiet:
                print(f"... {shape.name} on {label}", file=sys.stderr, flush=True)
            res = measure(shape, load, args.repeats, args.greedy_repeats)
            report["results"].append({"shape": shape.name, "load": label, "layers": shape.num_layers,
                                          "experts": shape.num_experts, "slots": shape.num_replicas,
                                          "gpus": shape.num_gpus, "nodes": shape.num_nodes, "groups": shape.num_groups,
                                          "variants": res})
    if not args.no_sweep:
        report["growth"] = growth_sweep(args.windows if args.quick else 3, args.repeats, args.seed, args.quick)
        report["growth_ratios"] = growth_ratios(report["growth"])
    return report


def print_report(report: dict) -> None:
    head = f"{'shape / load':34} {'variant':12} {'ms':>9} {'/greedy':>8} {'in-win':>7} {'next':>7} {'dups':>6} {'moved':>6}"
    print(head)
    for row in report["results"]:
        fresh_ms = row["variants"]["fresh"]["ms"]
        for v, r in row["variants"].items():
            nxt = f"{r['next_window']:.4f}" if r["next_window"] is not None else "-"
            extra = ""
            if v in ("migrate", "migrate_25", "from_greedy", "no_move"):
                extra = f"  x{r['ms'] / fresh_ms:.2f} fresh, {r['ms'] - fresh_ms:+.2f} ms"
            print(f"{row['shape'] + ' / ' + row['load']:34} {v:12} {r['ms']:9.2f} {r['ratio_to_greedy']:8.3f} "
                  f"{r['in_window']:7.4f} {nxt:>7} {r['avoidable_dups']:6d} {r['moved_frac']:6.3f}{extra}")
    if report.get("growth"):
        print(f"\n{'growth':14} {'value':>6} {'plan ms':>8} {'fresh ms':>9} {'of it maps':>10} {'used-width ms':>13} "
              f"{'of it maps':>10} {'width':>11} {'migrate ms':>11} {'greedy ms':>10} {'fresh/greedy':>12} "
              f"{'in-win ours':>11} {'greedy':>7}")
        for g in report["growth"]:
            width = f"{g['full_width']}/{g['used_width']}"
            print(f"{g['axis']:14} {g['value']:6d} {g['plan_ms']:8.2f} {g['fresh_ms']:9.2f} {g['maps_ms']:10.2f} "
                  f"{g['fresh_used_ms']:13.2f} {g['maps_used_ms']:10.2f} {width:>11} {g['migrate_ms']:11.2f} "
                  f"{g['greedy_ms']:10.2f} {g['fresh_ms'] / g['greedy_ms']:12.3f} {g['fresh_in_window']:11.4f} "
                  f"{g['greedy_in_window']:7.4f}")
        print("'plan ms': place_experts, the plan alone (phy2log); 'of it maps': building log2phy [L, E, M] (-1 "
              "padded) and logcnt from the plan, timed alone; 'width': M = R - E + 1 (the default, 'fresh ms') / the "
              "most replicas of an expert (log2phy_width='used').")
        r = report.get("growth_ratios")
        if r:
            print(f"slots per GPU {r['from']} -> {r['to']} ({r['to'] / r['from']:.0f}x the slots): the plan "
                  f"(place_experts) x{r['plan']:.2f}; rebalance_experts at full width x{r['call_full']:.2f}, at used "
                  f"width x{r['call_used']:.2f}; maps alone x{r['maps_full']:.2f} / x{r['maps_used']:.2f}; used "
                  f"width x{r['width_used']:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ray-eplb bench --scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", help=f"shapes to run (default all): {' '.join(s.name for s in SHAPES)}")
    ap.add_argument("--windows", type=int, default=4, help="load windows per shape (at least 3; default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed solves per window for ours (default 3)")
    ap.add_argument("--greedy-repeats", type=int, default=1, help="timed solves per window for the greedy (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic load and of trace sampling")
    ap.add_argument("--traces-dir", help="folder of trace .npz files (default: $RAY_EPLB_TRACES or ../shared/traces)")
    ap.add_argument("--no-trace", action="store_true", help="synthetic loads only, no tiled real trace")
    ap.add_argument("--no-sweep", action="store_true", help="skip the growth sweep")
    ap.add_argument("--sweep-only", action="store_true", help="run only the growth sweep (no shapes)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one small shape, a small sweep, synthetic load")
    ap.add_argument("--json", help="write the results to this path")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.windows < 3:
        ap.error(f"--windows={args.windows} must be at least 3 (plan on one window, score the next)")
    if args.repeats < 1 or args.greedy_repeats < 1:
        ap.error("--repeats and --greedy-repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
