"""``ray-eplb bench --migration``: migration-aware rebalancing on real MoE traces.

For each case of the solver benchmark (same traces, shapes and sampled windows), a *chain* of
rebalances: window 0 gets a from-scratch plan; then at every window ``i >= 1`` the plan is made
from the forecast of windows ``0..i`` (``last``: window ``i`` alone) starting from the previous plan
(``rebalance_experts(..., old_phy2log=prev, max_moves=budget)``), and scored on window ``i + 1``.
Chains: the from-scratch solver (no old placement: our unconstrained solver, the reference), the
same plans relabelled to keep what they can (``scratch+align``: ``solver.migration.align``, equal
balance), and the incremental solver with budgets {unlimited, 50%, 25%, 10%, 5%} of each layer's slots
(``--total-scope`` adds the same fractions summed over all layers), each planned on the last
window and on the forecast. Reported per chain: mean next-window balancedness, slots moved per
rebalance (fraction of all slots), expert weights that must cross GPUs per rebalance (a slot whose
new expert the GPU did not hold before) in GB for ``--expert-mb`` MB per expert, and duplicates.

A forecast sweep (on unless ``--no-sweep``) runs the chain for several forecasts (last, EMA,
mean of the last W windows) under the from-scratch solver and under the 25% budget, and picks the
best per case and overall (mean over the cases with a time axis). On static tables the windows are
i.i.d. samples of one distribution, so a forecast there only averages sampling noise.

    python -m ray_eplb.controller.bench.migration [--cases dsv2lite] [--forecast ema:0.5] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ray_eplb.controller.bench.cases import Case, case_windows, select_cases
from ray_eplb.controller.bench.solver import run_cli, unavoidable_duplicates
from ray_eplb.controller.bench.workload import load_trace
from ray_eplb.controller.forecast import DEFAULT_SPEC, Forecaster, forecast_series
from ray_eplb.solver import balancedness, duplicate_pairs, rebalance_experts
from ray_eplb.solver.migration import align

BUDGETS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.1, 0.05)  # fraction of slots; None = unlimited
SWEEP = ("last", "ema:0.2", "ema:0.3", "ema:0.5", "ema:0.7", "window:2", "window:4", "window:8")
# One DeepSeek-V2-Lite expert: gate, up and down projections of 2048 x 1408, bf16.
EXPERT_BYTES = 3 * 2048 * 1408 * 2  # 17,301,504 bytes = 17.3 MB
LONG_TRACE = 10  # windows a time-axis trace needs to count as more than a few draws of luck
TARGET_BUDGET = 0.25
WITHIN_SCRATCH = 0.005  # 25% budget: next-window within 0.5% of the from-scratch solver
EQUAL_BAL = 0.002  # unlimited budget: at equal balancedness (+-0.2%) ...
MOVE_RATIO = 0.5  # ... slots moved <= half of the from-scratch solver's
# Best published solver's next-window balancedness (plan on window i, score on i + 1): the best of the
# published EPLB solvers (see ray_eplb.controller.bench.solver) on these cases and windows.
PUBLISHED_NEXT = {
    "dsv2lite_puffin 288,8,4,32": 0.857, "dsv2lite_puffin 72,8,2,8": 0.903,
    "llama4_maverick_mmlu 144,8,2,16": 0.613, "llama4_maverick_mmlu 160,8,4,32": 0.496,
    "qwen3_235b_prover 144,8,2,16": 0.981, "qwen3_235b_prover 136,8,1,8": 0.989,
    "qwen3_30b_prover 144,8,2,16": 0.981, "qwen2_57b_sharegpt 72,8,2,8": 0.986,
    "qwen2_57b_multidomain 80,8,2,16": 0.975,
}


def chain_key(budget: float | None | str, scope: str, forecast: str) -> str:
    """Name of a chain: ``scratch|F``, ``aligned|F``, ``inc:unl|F``, ``inc:0.25|F``, ``inc:0.25:total|F``."""
    if budget in ("scratch", "aligned"):
        return f"{budget}|{forecast}"
    b = "unl" if budget is None else f"{budget:g}"
    return f"inc:{b}{':total' if scope == 'total' and budget is not None else ''}|{forecast}"


def gpu_transfers(old: np.ndarray, new: np.ndarray, num_gpus: int, num_experts: int) -> int:
    """Expert weights that must reach a GPU from elsewhere: ``sum over (layer, GPU) of the replicas of
    each expert in ``new`` beyond those the GPU held in ``old``. ``old``, ``new``: ``[L, R]``."""
    num_layers, num_slots = new.shape
    bins = np.arange(num_layers * num_gpus).repeat(num_slots // num_gpus)  # [L*R] (layer, GPU) bin
    size = num_layers * num_gpus * num_experts
    h_old = np.bincount(bins * num_experts + old.ravel(), minlength=size)
    h_new = np.bincount(bins * num_experts + new.ravel(), minlength=size)
    return int(np.clip(h_new - h_old, 0, None).sum())


def run_chain(case: Case, windows: torch.Tensor, plan_on: torch.Tensor, budget: float | None | str,
              scope: str = "layer") -> dict:
    """One chain of rebalances; ``windows``/``plan_on`` ``[T, L, E]`` (``plan_on[i]``: the input
    planned on after window ``i``). ``budget``: ``"scratch"`` (no old placement), ``"aligned"``
    (the from-scratch plan relabelled by ``solver.migration.align`` to keep what it can: same balance),
    ``None`` (incremental, unlimited) or a fraction of slots. Returns the chain's scores."""
    shape = (case.num_replicas, case.num_groups, case.num_nodes, case.num_gpus)
    num_windows, num_layers, num_experts = windows.shape
    total_slots = num_layers * case.num_replicas
    prev, nxt, moved, transfers, times, dups, unavoid = None, [], [], [], [], 0, 0
    for i in range(num_windows - 1):
        t0 = time.perf_counter()
        if prev is None or budget in ("scratch", "aligned"):
            phy2log, _, logcnt = rebalance_experts(plan_on[i], *shape)
            if prev is not None and budget == "aligned":
                phy2log = torch.from_numpy(align(prev.numpy(), phy2log.numpy(), case.num_nodes, case.num_gpus))
        else:
            phy2log, _, logcnt = rebalance_experts(plan_on[i], *shape, old_phy2log=prev, max_moves=budget,
                                                   budget_scope=scope)
        if prev is not None:
            times.append(time.perf_counter() - t0)
            old, new = prev.numpy(), phy2log.numpy()
            moved.append(int((old != new).sum()) / total_slots)
            transfers.append(gpu_transfers(old, new, case.num_gpus, num_experts))
        nxt.append(balancedness(phy2log, logcnt, windows[i + 1], case.num_gpus))
        dups += duplicate_pairs(phy2log, case.num_gpus)
        unavoid += unavoidable_duplicates(phy2log, logcnt, case)
        prev = phy2log
    return dict(
        next_window_balancedness=statistics.fmean(nxt), per_window_next=nxt,
        moved_frac=statistics.fmean(moved) if moved else 0.0, moved_frac_max=max(moved, default=0.0),
        transfers_per_rebalance=statistics.fmean(transfers) if transfers else 0.0,
        median_solve_ms=statistics.median(times) * 1e3 if times else 0.0,
        rebalances=len(moved), duplicate_pairs=dups, avoidable_duplicate_pairs=dups - unavoid,
    )


def run_case(case: Case, windows: torch.Tensor, forecast: str, sweep: tuple[str, ...], total_scope: bool) -> dict:
    """Every chain of one case: ``{chain_key: result}`` (each chain run once, however often it is asked for)."""
    plan_on = {spec: forecast_series(windows, spec) for spec in dict.fromkeys(("last", forecast, *sweep))}
    wanted = [(b, "layer", f) for f in dict.fromkeys(("last", forecast)) for b in ("scratch", "aligned", *BUDGETS)]
    if total_scope:
        wanted += [(b, "total", f) for f in dict.fromkeys(("last", forecast)) for b in BUDGETS if b is not None]
    wanted += [(b, "layer", f) for f in sweep for b in ("scratch", TARGET_BUDGET)]
    out = {}
    for b, scope, f in wanted:
        key = chain_key(b, scope, f)
        if key not in out:
            out[key] = run_chain(case, windows, plan_on[f], b, scope)
    return out


def _rel(a: float, b: float) -> float:
    return a / b - 1.0


def evaluate_targets(rows: list[dict], forecast: str) -> list[dict]:
    """Checks of the migration-aware chains against from-scratch solving and the best published solver,
    per case, on chains planned on ``forecast``."""
    out = []
    for r in rows:
        c, ch, pub = r["case"], r["chains"], PUBLISHED_NEXT.get(r["case"])
        ref = ch[chain_key("scratch", "layer", forecast)]
        b25 = ch[chain_key(TARGET_BUDGET, "layer", forecast)]
        unl = ch[chain_key(None, "layer", forecast)]
        d = _rel(b25["next_window_balancedness"], ref["next_window_balancedness"])
        out.append(dict(case=c, target="25% budget: next-window within 0.5% of from-scratch",
                        measured=f"{b25['next_window_balancedness']:.4f} vs {ref['next_window_balancedness']:.4f} "
                                 f"({d:+.2%})", passed=d >= -WITHIN_SCRATCH))
        if pub is not None:
            out.append(dict(case=c, target=f"25% budget: next-window >= best published solver {pub}",
                            measured=f"{b25['next_window_balancedness']:.4f}",
                            passed=b25["next_window_balancedness"] >= pub))
        d = _rel(unl["next_window_balancedness"], ref["next_window_balancedness"])
        out.append(dict(case=c, target="no budget: moves <= 1/2 from-scratch at equal bal (+-0.2%)",
                        measured=f"{unl['moved_frac']:.1%} vs {ref['moved_frac']:.1%} slots, bal {d:+.2%}",
                        passed=unl["moved_frac"] <= MOVE_RATIO * ref["moved_frac"] and d >= -EQUAL_BAL))
        if pub is not None:
            out.append(dict(case=c, target=f"forecast {forecast} (from scratch): next-window >= best published solver {pub}",
                            measured=f"{ref['next_window_balancedness']:.4f}",
                            passed=ref["next_window_balancedness"] >= pub))
    inc = sum(res["avoidable_duplicate_pairs"] for r in rows for k, res in r["chains"].items() if k.startswith("inc"))
    fresh = sum(res["avoidable_duplicate_pairs"] for r in rows for k, res in r["chains"].items() if not k.startswith("inc"))
    out.append(dict(case="all", target="zero avoidable duplicate pairs in the incremental chains",
                    measured=f"{inc} (from-scratch chains: {fresh})", passed=inc == 0))
    return out


def sweep_summary(rows: list[dict], sweep: tuple[str, ...]) -> dict:
    """Best forecast per case and overall, for the from-scratch chain and the 25%-budget chain.

    Overall: mean next-window balancedness over the cases with a time axis (static tables' windows
    are samples of one distribution: forecasting them measures noise averaging), over those with at
    least ``LONG_TRACE`` windows (olmoe and mixtral have 5-6, one domain each: mostly luck), and over
    all cases.
    """
    out = {}
    for solver, budget in (("scratch", "scratch"), ("25%", TARGET_BUDGET)):
        per_case = {r["case"]: {f: r["chains"][chain_key(budget, "layer", f)]["next_window_balancedness"]
                                for f in sweep} for r in rows}
        timed = [r["case"] for r in rows if not r["static"]]
        long = [r["case"] for r in rows if not r["static"] and r["windows"] >= LONG_TRACE]
        groups = (("time-axis cases", timed), (f"time axis, >= {LONG_TRACE} windows", long), ("all cases", list(per_case)))
        means = {name: {f: statistics.fmean(per_case[c][f] for c in cases) for f in sweep}
                 for name, cases in groups if cases}
        out[solver] = dict(per_case=per_case, best={c: max(v, key=v.get) for c, v in per_case.items()}, mean=means,
                           best_overall={name: max(v, key=v.get) for name, v in means.items()})
    return out


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the selected cases; the report (also written by ``--json``)."""
    Forecaster.from_spec(args.forecast)  # a bad spec fails before any work
    if args.expert_mb is not None and not args.expert_mb > 0:
        raise ValueError(f"--expert-mb={args.expert_mb} must be > 0")
    sweep = tuple(dict.fromkeys(args.sweep_specs)) if args.sweep else ()
    for spec in sweep:
        Forecaster.from_spec(spec)
    notes: list[str] = []
    cases, workload, traces_dir = select_cases(args, notes)
    rows = []
    for case in cases:
        try:
            windows = case_windows(case, traces_dir, args.windows, args.seed)  # [T, L, E]
            static = traces_dir is not None and load_trace(case.trace, traces_dir).static
        except (FileNotFoundError, ValueError) as exc:
            notes.append(f"{case.name}: skipped ({exc})")
            continue
        t0 = time.perf_counter()
        chains = run_case(case, windows, args.forecast, sweep, args.total_scope)
        if not args.quiet:
            print(f"[bench-migration] {case.name:<32} {time.perf_counter() - t0:6.1f} s", file=sys.stderr)
        rows.append(dict(case=case.name, windows=int(windows.shape[0]), layers=int(windows.shape[1]),
                         experts=int(windows.shape[2]), static=bool(static), published_next=PUBLISHED_NEXT.get(case.name),
                         chains=chains))
    expert_bytes = int(args.expert_mb * 1e6) if args.expert_mb else EXPERT_BYTES
    notes.append("GB/rebal: expert weights that must reach a GPU from elsewhere per rebalance x "
                 f"{expert_bytes / 1e6:.1f} MB per expert (default: a DeepSeek-V2-Lite expert, 3 x 2048 x 1408 "
                 "bf16; --expert-mb), summed over the trace's MoE layers")
    notes.append("chains: window 0 planned from scratch; window i>=1 planned on the forecast of windows <= i from the "
                 "previous plan; every plan scored on window i+1. moved = slots whose expert changed / all slots")
    if any(r["static"] for r in rows):
        notes.append("static tables (qwen*) are 12 i.i.d. samples of one distribution: a forecast there only averages "
                     "sampling noise, and moves chase noise")
    return dict(workload=workload, synthetic=traces_dir is None, forecast=args.forecast, budgets=list(BUDGETS),
                total_scope=args.total_scope, expert_bytes=expert_bytes, seed=args.seed,
                torch_threads=torch.get_num_threads(),
                cases=rows, sweep=sweep_summary(rows, sweep) if sweep and rows else {},
                targets=evaluate_targets(rows, args.forecast) if rows else [], notes=notes)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    fc, gb = report["forecast"], report["expert_bytes"] / 1e9
    table = Table(title=f"Migration benchmark ({report['workload']}): next-window balancedness vs slots moved per "
                        f"rebalance; planned on the last window | on forecast {fc}")
    for col in ("case", "plan", "last: next bal", "moved", "GB/rebal", "fc: next bal", "vs scratch", "moved",
                "max moved", "GB/rebal", "ms"):
        table.add_column(col, justify="left" if col in ("case", "plan") else "right", no_wrap=col in ("case", "plan"))
    plans = [("scratch", "layer", "from scratch"), ("aligned", "layer", "scratch+align")]
    plans += [(b, "layer", "inc " + ("unlimited" if b is None else f"{b:.0%}")) for b in BUDGETS]
    if report["total_scope"]:
        plans += [(b, "total", f"inc {b:.0%} total") for b in BUDGETS if b is not None]
    for r in report["cases"]:
        ref = r["chains"][chain_key("scratch", "layer", fc)]["next_window_balancedness"]
        for i, (b, scope, label) in enumerate(plans):
            last, f = r["chains"][chain_key(b, scope, "last")], r["chains"][chain_key(b, scope, fc)]
            table.add_row(r["case"] + (" (static)" if r["static"] else "") if i == 0 else "", label,
                          f"{last['next_window_balancedness']:.4f}", f"{last['moved_frac']:.1%}",
                          f"{last['transfers_per_rebalance'] * gb:.2f}", f"{f['next_window_balancedness']:.4f}",
                          "" if b == "scratch" else f"{_rel(f['next_window_balancedness'], ref):+.2%}",
                          f"{f['moved_frac']:.1%}", f"{f['moved_frac_max']:.1%}",
                          f"{f['transfers_per_rebalance'] * gb:.2f}", f"{f['median_solve_ms']:.1f}")
        table.add_section()
    console.print(table)
    if report["sweep"]:
        specs = list(next(iter(report["sweep"]["scratch"]["per_case"].values())))
        st = Table(title="Forecast sweep: mean next-window balancedness (* best of the row)")
        for col in ("case", "plan", *specs):
            st.add_column(col, justify="left" if col in ("case", "plan") else "right")
        names = [r["case"] + (" (static)" if r["static"] else "") for r in report["cases"]]
        for solver, s in report["sweep"].items():
            items = list(zip(names, s["per_case"].values())) + [(k, v) for k, v in s["mean"].items()]
            for name, vals in items:
                best = max(vals, key=vals.get)
                st.add_row(name, solver, *[f"{vals[f]:.4f}{'*' if f == best else ''}" for f in specs])
            st.add_section()
        console.print(st)
        for solver, s in report["sweep"].items():
            console.print(f"best forecast ({solver}): " + ", ".join(f"{k}: {v}" for k, v in s["best_overall"].items()))
    if report["targets"]:
        tt = Table(title=f"Migration checks (planned on forecast {fc})")
        for col in ("case", "target", "measured", "pass"):
            tt.add_column(col)
        for t in report["targets"]:
            tt.add_row(t["case"], t["target"], t["measured"], "✓ pass" if t["passed"] else "✗ FAIL")
        console.print(tt)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def add_arguments(ap: argparse.ArgumentParser, standalone: bool = False) -> None:
    """The migration benchmark's options (``standalone``: also the case selection the solver bench has)."""
    from ray_eplb.controller.cli.args import int_at_least, nonneg_int, positive

    if standalone:
        ap.add_argument("--traces-dir", help="folder of trace .npz files (default: $RAY_EPLB_TRACES or ../shared/traces)")
        ap.add_argument("--synthetic", action="store_true", help="run the synthetic cases even if traces exist")
        ap.add_argument("--cases", action="extend", nargs="+", help="keep cases whose name contains any of these")
        ap.add_argument("--windows", type=int_at_least(2), help="use only the first N windows (at least 2)")
        ap.add_argument("--seed", type=nonneg_int, default=0, help="seed for sampling static tables into windows")
        ap.add_argument("--json", help="write all results to this path")
        ap.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    else:
        ap.add_argument("--migration", action="store_true", help="also run the migration benchmark (ray-eplb bench --migration alone)")
    ap.add_argument("--forecast", default=DEFAULT_SPEC,
                    help=f"forecast spec: last | ema:A | window:W (default {DEFAULT_SPEC})")
    ap.add_argument("--expert-mb", type=positive, help="MB per expert for GB/rebal (default 17.3: DeepSeek-V2-Lite, bf16)")
    ap.add_argument("--total-scope", action="store_true", help="also budgets summed over all layers")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the forecast sweep")
    ap.add_argument("--sweep-specs", nargs="+", default=list(SWEEP),
                    help=f"forecasts of the sweep (default {' '.join(SWEEP)})")


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` for options that are wrong before any work: a forecast spec, a traces folder."""
    for spec in [args.forecast] + list(args.sweep_specs):
        Forecaster.from_spec(spec)
    if args.traces_dir and not Path(args.traces_dir).is_dir():
        raise ValueError(f"--traces-dir={args.traces_dir!r} is not a directory")


def main(argv: list[str] | None = None) -> int:
    from ray_eplb.controller.cli.args import Parser

    ap = Parser(prog="python -m ray_eplb.controller.bench.migration", description=__doc__.split("\n\n")[0])
    add_arguments(ap, standalone=True)
    args = ap.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as exc:
        ap.error(str(exc))
    return run_cli("bench-migration", args.json, lambda: run_benchmark(args), print_report)


if __name__ == "__main__":
    sys.exit(main())
