"""``ray-eplb demo --compare``: from-scratch planning against incremental planning on one trace.

Both runs replay the same trace through the same gate (same seeds: the same tokens reach the same
logical experts) on the same cluster, each with its own workers and controller, both starting from
the round-robin placement, both with the periodic trigger only and no gain threshold (so the
period alone sets how often they may rebalance):

* ``fresh``: every ``--rebalance-period`` seconds, a from-scratch solve (aligned to the current
  placement, as our controller does; published solvers do not even align);
* ``incremental``: ``--compare-ratio`` times as often, changing at most ``--max-moves`` slots
  (default 10% of each layer's slots) from the current placement.

The check: incremental rebalances at least 4x as often for no more bytes moved, and ends
with a higher mean balancedness over the run (measured per window on the tokens each rank served),
with 0 mismatched tokens in both.
"""
from __future__ import annotations

import argparse
import copy
import json
from typing import Callable

DEFAULT_BUDGET = 0.1


def modes(a: argparse.Namespace) -> list[argparse.Namespace]:
    """The two runs' arguments, derived from the command line's."""
    fresh = copy.copy(a)
    fresh.planning, fresh.max_moves, fresh.min_layer_gain = "fresh", None, 0.0
    inc = copy.copy(a)
    inc.planning = "incremental"
    inc.max_moves = DEFAULT_BUDGET if a.max_moves is None else a.max_moves
    inc.rebalance_period = max(a.interval, a.rebalance_period / a.compare_ratio)
    for m in (fresh, inc):
        m.trigger, m.min_gain, m.json = "periodic", 0.0, False
    return [fresh, inc]


def verdict(fresh: dict, inc: dict) -> dict:
    """The runtime check of incremental against fresh planning on two run summaries."""
    ratio = inc["rebalances"] / max(fresh["rebalances"], 1)
    bytes_ratio = inc["bytes_moved"] / max(fresh["bytes_moved"], 1)
    return {
        "rebalance_ratio": round(ratio, 2),
        "bytes_ratio": round(bytes_ratio, 3),
        "balancedness_gain": round(inc["balancedness_run"] - fresh["balancedness_run"], 4),
        "rebalances_4x": ratio >= 4,
        "bytes_not_more": bytes_ratio <= 1.0,
        "higher_balancedness": inc["balancedness_run"] > fresh["balancedness_run"],
        "no_mismatch": fresh["mismatched_tokens"] == 0 and inc["mismatched_tokens"] == 0,
    }


def compare(a: argparse.Namespace, run: Callable[[argparse.Namespace], dict]) -> int:
    """Run both modes with ``run(args) -> summary`` and print the comparison; 0 when both ran clean."""
    summaries = {}
    for m in modes(a):
        budget = "" if m.max_moves is None else f", max {m.max_moves} moves"
        print(f"[demo] --- {m.planning} planning: rebalance every {m.rebalance_period:g} s{budget} ---")
        summaries[m.planning] = run(m)
    fresh, inc = summaries["fresh"], summaries["incremental"]
    v = verdict(fresh, inc)
    cols = [("rebalance period s", "rebalance_period_s", "{:g}"), ("rebalances", "rebalances", "{}"),
            ("slots moved", "experts_moved", "{}"), ("MiB moved", "bytes_moved", "{:.1f}"),
            ("transfer batches", "transfer_batches", "{}"), ("aborted swaps", "aborted", "{}"),
            ("mean swap s", "swap_s_mean", "{}"), ("mean balancedness", "balancedness_run", "{:.4f}"),
            ("mismatched tokens", "mismatched_tokens", "{}")]
    print(f"[demo] {'':20s} {'fresh':>12s} {'incremental':>12s}")
    for label, key, fmt in cols:
        cell = [fmt.format(s[key] / 2**20 if key == "bytes_moved" else s[key]) for s in (fresh, inc)]
        print(f"[demo] {label:20s} {cell[0]:>12s} {cell[1]:>12s}")
    print(f"[demo] incremental vs fresh: {v['rebalance_ratio']:g}x the rebalances "
          f"({'>=' if v['rebalances_4x'] else '<'} 4x), {v['bytes_ratio']:.2f}x the bytes, "
          f"mean balancedness {v['balancedness_gain']:+.4f} ({'higher' if v['higher_balancedness'] else 'NOT higher'})")
    if a.json:
        print(json.dumps({"fresh": fresh, "incremental": inc, "verdict": v}))
    return 0 if fresh["ok"] and inc["ok"] else 1
