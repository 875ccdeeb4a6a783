"""``ray-eplb loads -o FILE``: the running balancer's recorded expert loads, or its placement in
force (``--placement``), written in the engine record formats of :mod:`ray_eplb.topology.records`.

    ray-eplb loads -o FILE [--format ours|npz|sglang] [--total] [--address A] [--namespace NS]
    ray-eplb loads --placement -o FILE [--format ours|sglang|sglang-json|sglang-pt|triple]

Loads: by default the rounds of the controller's recent window (``[T, L, E]``, one row per control
round, what it plans on); ``--total``: everything it counted since it started (``[1, L, E]``; a
restarted controller starts again from zero). Rows are the balancer's MoE layers (a model with dense
first layers has no rows for those). ``ray-eplb plan FILE`` reads either file back, and
``--placement`` files are what ``plan --old`` takes. The format follows the suffix when not given:
``.json`` ours, ``.npz`` npz, ``.pt`` sglang (loads) or sglang-pt (placements).
Exit codes as for ``ray-eplb status``: 2 bad input, 3 no balancer running.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOAD_SUFFIX = {".json": "ours", ".npz": "npz", ".pt": "sglang", ".pth": "sglang"}
PLACEMENT_SUFFIX = {".json": "ours", ".pt": "sglang-pt", ".pth": "sglang-pt"}


def resolve_format(path: str, fmt: str | None, placement: bool) -> str:
    """The record format for ``path``: ``fmt`` when given (checked), else by its suffix."""
    from ray_eplb.topology.records import LOAD_FORMATS, PLACEMENT_FORMATS, format_for

    choices = (*PLACEMENT_FORMATS, "sglang") if placement else LOAD_FORMATS
    what = "a placement" if placement else "loads"
    if fmt is None:
        fmt = (PLACEMENT_SUFFIX if placement else LOAD_SUFFIX).get(Path(path).suffix.lower())
        if fmt is None:
            raise ValueError(f"-o {path}: give --format, or name the file .json, .pt{'' if placement else ' or .npz'}")
    if fmt not in choices:
        raise ValueError(f"--format {fmt!r} does not write {what}: one of {', '.join(choices)}")
    return format_for(path, fmt) if placement else fmt


def export(record: dict, path: str, fmt: str, *, placement: bool, total: bool) -> str:
    """Write ``record`` (the controller's ``recorded_loads()``) to ``path`` as ``fmt``; one summary line."""
    import torch

    from ray_eplb.topology import Placement, Topology
    from ray_eplb.topology.records import write_loads, write_placement

    for key in ("window", "total", "phy2log", "topology", "epoch"):
        if key not in record:
            raise ValueError(f"the controller's record has no {key!r}")
    topo = Topology.model_validate(record["topology"])
    if placement:
        phy2log = torch.tensor(record["phy2log"], dtype=torch.int64)  # [L, R]
        p = Placement.from_phy2log(topo, phy2log, int(record["epoch"]))
        write_placement(path, p, fmt)
        return f"wrote {path} ({fmt}): placement epoch {p.epoch}, {topo.num_layers} layers x {topo.num_slots} slots"
    if total:
        load = torch.tensor(record["total"], dtype=torch.float64).reshape(1, topo.num_layers, topo.num_experts)
    else:
        load = torch.tensor(record["window"], dtype=torch.float64)
        if load.numel() == 0:
            raise ValueError("the balancer has recorded no round yet (its loop is not running?); try again later")
    if float(load.sum()) <= 0:
        raise ValueError("the balancer has recorded no token yet: nothing to export")
    want = (topo.num_layers, topo.num_experts)
    if load.dim() != 3 or tuple(load.shape[1:]) != want:
        raise ValueError(f"the controller's loads have shape {tuple(load.shape)}, expected [T, {want[0]}, {want[1]}]")
    meta = {} if fmt == "sglang" else {"note": f"ray-eplb balancer, epoch {record['epoch']}, "
                                                f"{'total since start' if total else 'recent window rounds'}"}
    write_loads(path, load, fmt, **meta)
    return (f"wrote {path} ({fmt}): {load.shape[0]} window(s) x {want[0]} layers x {want[1]} experts, "
            f"{int(load.sum())} routed tokens")


def main(argv: list[str] | None = None) -> int:
    from ray_eplb.controller.cli.ops import BadInput, run

    def build(ap: argparse.ArgumentParser) -> None:
        ap.description = __doc__.splitlines()[0]
        ap.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the record")
        ap.add_argument("--format", dest="fmt", default=None,
                        help="loads: ours (JSON), npz, sglang (.pt); with --placement: ours, sglang (by suffix), "
                             "sglang-json, sglang-pt, triple. Default: by the output's suffix")
        ap.add_argument("--placement", action="store_true", help="write the placement in force instead of the loads")
        ap.add_argument("--total", action="store_true",
                        help="loads counted since the controller started (one row) instead of the recent window's rounds")

    def body(a: argparse.Namespace) -> int:
        import ray

        from ray_eplb.controller.service import attach

        if a.placement and a.total:
            raise BadInput("--total is about loads; --placement writes the placement in force")
        out = Path(a.output)
        if out.is_dir() or not out.resolve().parent.is_dir():
            raise BadInput(f"-o {a.output}: not a file in an existing folder")
        fmt = resolve_format(a.output, a.fmt, a.placement)  # before touching the cluster
        bal = attach(a.address, a.namespace)
        record = ray.get(bal.controller.recorded_loads.remote())
        print(export(record, a.output, fmt, placement=a.placement, total=a.total))
        return 0

    return run("loads", list(sys.argv[1:] if argv is None else argv), build, body)


if __name__ == "__main__":
    sys.exit(main())
