"""``ray-eplb plan``: solve a placement offline from an engine's recorded expert loads.

    ray-eplb plan LOADS --replicas R --gpus G --nodes N [--groups K] [--old FILE] [--max-moves X]
                  -o FILE [--format ours|sglang|sglang-json|sglang-pt|triple] [--plot PNG] [--window all|last|N]

``LOADS`` is a SGLang expert-distribution dump (``.pt``), a ray-eplb trace (``.npz``) or a
ray-eplb loads JSON (formats in :mod:`ray_eplb.topology.records`). Prints per-layer
balancedness before (the ``--old`` placement, else one replica per expert round-robin) and
after, the slots moved and the duplicate replicas on one GPU; writes the placement. Bad input
exits with status 2 and one line on stderr. No Ray.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ray_eplb.solver import balancedness, balancedness_per_layer, duplicate_pairs, rebalance_experts
from ray_eplb.solver.rebalance import POLICIES
from ray_eplb.topology.placement import Placement
from ray_eplb.topology.records import (
    PLACEMENT_FORMATS,
    error_line,
    format_for,
    read_loads,
    read_phy2log,
    select_window,
    write_placement,
)
from ray_eplb.topology.shape import Topology

PROG = "ray-eplb plan"


def _max_moves(text: str) -> int | float:
    """``"12"`` -> 12 slots per layer; ``"0.25"`` -> a quarter of each layer's slots."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a slot count nor a fraction") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Plan an expert placement from recorded loads and write it for an engine.",
    )
    p.add_argument("loads", metavar="LOADS",
                   help="expert loads: SGLang expert-distribution dump (.pt, 'stat' mode), "
                        "ray-eplb trace (.npz) or ray-eplb loads JSON (.json)")
    p.add_argument("--replicas", type=int, required=True, metavar="R",
                   help="slots (physical experts) per layer: logical experts + redundant ones; a multiple of --gpus")
    p.add_argument("--gpus", type=int, required=True, metavar="G",
                   help="expert-parallel ranks (GPUs) in all, over all nodes")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes the GPUs are spread over (default 1)")
    p.add_argument("--groups", type=int, default=1, metavar="K",
                   help="expert groups (DeepSeek's n_group) kept whole on a node where that costs no balance (default 1)")
    p.add_argument("--policy", choices=POLICIES, default="auto",
                   help="solver policy: auto (default), global or hierarchical")
    p.add_argument("--old", metavar="FILE",
                   help="the placement running now (any placement format this command writes); the plan "
                        "then moves as few slots as it can, and 'before' is this placement")
    p.add_argument("--max-moves", type=_max_moves, metavar="X",
                   help="with --old: at most X slots change per layer (an int) or that fraction of them (0.25)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the placement")
    p.add_argument("--format", dest="fmt", default="ours", choices=(*PLACEMENT_FORMATS, "sglang"),
                   help="ours (JSON with the topology, default); sglang-json or sglang-pt (SGLang's "
                        "--init-expert-location); sglang (either, by the output's suffix); triple "
                        "(phy2log, log2phy, logcnt tensors for DeepSeek EPLB / vLLM, .pt)")
    p.add_argument("--plot", metavar="PNG", help="also draw per-layer balancedness before/after into this PNG")
    p.add_argument("--window", default="all", metavar="all|last|N",
                   help="which recorded windows to plan on: all (summed, default), last, or the last N summed; "
                        "a SGLang dump with a finite buffer is a ring, so use all for it")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse already printed usage and the one-line error
        return int(exc.code or 0)
    try:
        return _run(args)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    fmt = format_for(args.output, args.fmt)
    if args.max_moves is not None and args.old is None:
        raise ValueError("--max-moves needs --old (the placement whose slots it limits moving)")
    weight = select_window(read_loads(args.loads), args.window)  # [L, E]
    num_layers, num_experts = weight.shape
    for flag in ("replicas", "gpus", "nodes", "groups"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag}={getattr(args, flag)} must be positive")
    if args.replicas % args.gpus:
        raise ValueError(f"--replicas={args.replicas} is not a multiple of --gpus={args.gpus}")
    if args.gpus % args.nodes:
        raise ValueError(f"--gpus={args.gpus} is not a multiple of --nodes={args.nodes}")
    if args.replicas < num_experts:
        raise ValueError(f"--replicas={args.replicas} is smaller than the {num_experts} experts in {args.loads}")
    topology = Topology.from_counts(args.replicas, args.gpus, args.nodes, num_experts, num_layers, args.groups)
    if args.old is not None:
        before = _old_placement(args.old, topology)
        label = f"--old {args.old}"
    else:
        before = Placement.identity(topology)
        label = "one replica per expert, round-robin"
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, topology.num_slots, topology.num_groups, topology.num_nodes, topology.num_gpus,
        policy=args.policy, old_phy2log=None if args.old is None else before.phy2log, max_moves=args.max_moves,
    )
    after = Placement(topology=topology, epoch=before.epoch + 1, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)
    report = summarize(before, after, weight)
    print(f"{args.loads}: {num_layers} layers x {num_experts} experts, window {args.window}; "
          f"{topology.num_slots} slots on {topology.num_gpus} GPUs ({topology.num_nodes} node(s), "
          f"{topology.num_groups} group(s)); before = {label}")
    print(render(report))
    write_placement(args.output, after, fmt)
    print(f"wrote {args.output} ({fmt})")
    if args.plot:
        plot(report, args.plot, title=f"{Path(args.loads).name}: {topology.num_slots} slots on {topology.num_gpus} GPUs")
        print(f"wrote {args.plot}")
    return 0


def _old_placement(path: str, topology: Topology) -> Placement:
    phy2log, found, epoch = read_phy2log(path)
    want = (topology.num_layers, topology.num_slots)
    if tuple(phy2log.shape) != want:
        raise ValueError(f"{path}: phy2log has shape {tuple(phy2log.shape)}, the loads and --replicas need {want}")
    if found is not None and found.num_experts != topology.num_experts:
        raise ValueError(f"{path}: topology has {found.num_experts} experts, the loads have {topology.num_experts}")
    if int(phy2log.max()) >= topology.num_experts:
        raise ValueError(f"{path}: phy2log holds expert {int(phy2log.max())}, the loads have {topology.num_experts}")
    return Placement.from_phy2log(topology, phy2log, epoch)


def avoidable_duplicates(placement: Placement) -> int:
    """Surplus replicas on a GPU that holds another replica of the same expert, beyond what the replica
    counts force (an expert with more replicas than the GPUs it may use must double up)."""
    from ray_eplb.solver.metrics import avoidable_duplicates as count

    t = placement.topology
    return count(placement.phy2log, placement.logcnt, t.num_gpus, t.num_nodes, t.num_groups)


def summarize(before: Placement, after: Placement, weight: torch.Tensor) -> dict:
    """Numbers for the report: per-layer (``[L]`` lists) and overall balancedness, moves, duplicates."""
    gpus = after.topology.num_gpus
    moved = after.changed_slots(before).sum(1)  # [L]
    return {
        "before": balancedness_per_layer(before.phy2log, before.logcnt, weight, gpus).tolist(),
        "after": balancedness_per_layer(after.phy2log, after.logcnt, weight, gpus).tolist(),
        "moved": moved.tolist(),
        "overall_before": balancedness(before.phy2log, before.logcnt, weight, gpus),
        "overall_after": balancedness(after.phy2log, after.logcnt, weight, gpus),
        "slots_moved": int(moved.sum()),
        "slots": after.phy2log.numel(),
        "duplicates": duplicate_pairs(after.phy2log, gpus),
        "avoidable_duplicates": avoidable_duplicates(after),
    }


def render(report: dict) -> str:
    """The per-layer table and the totals as text."""
    lines = ["layer  before   after  moved"]
    for layer, (b, a, m) in enumerate(zip(report["before"], report["after"], report["moved"])):
        lines.append(f"{layer:5d}  {b:6.3f}  {a:6.3f}  {m:5d}")
    share = report["slots_moved"] / report["slots"] if report["slots"] else 0.0
    lines += [
        f"balancedness (mean GPU load / max, all layers): {report['overall_before']:.4f} -> {report['overall_after']:.4f}",
        f"slots moved: {report['slots_moved']} of {report['slots']} ({share:.1%})",
        f"duplicate replicas on one GPU: {report['duplicates']} (avoidable: {report['avoidable_duplicates']})",
    ]
    return "\n".join(lines)


def plot(report: dict, path: str, *, title: str) -> None:
    """Per-layer balancedness before and after as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = range(len(report["before"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(report["before"])), 3.5))
    ax.plot(layers, report["before"], "o-", label=f"before ({report['overall_before']:.3f})", color="tab:gray")
    ax.plot(layers, report["after"], "o-", label=f"after ({report['overall_after']:.3f})", color="tab:blue")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
