"""``ray-eplb loads -o FILE``: the running balancer's recorded expert loads, or its placement in
force (``--placement``), written in the engine record formats of :mod:`ray_eplb.topology.records`.

    ray-eplb loads -o FILE [--format ours|npz|sglang] [--total] [--address A] [--namespace NS]
    ray-eplb loads --placement -o FILE [--format ours|sglang|sglang-json|sglang-pt|triple]
    ... [--model DIR]: one row per decoder layer of the model in DIR, as SGLang counts them

Loads: by default the rounds of the controller's recent window (``[T, L, E]``, one row per control
round, what it plans on); ``--total``: everything it counted since it started (``[1, L, E]``; a
restarted controller starts again from zero). Rows are the balancer's MoE layers; with ``--model DIR``
they are the decoder layers of that Hugging Face model, as SGLang's recorder and ``--init-expert-location``
count them (dense layers: zero loads; in placements, round-robin rows). ``ray-eplb plan FILE`` reads either file back, and
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


def export(record: dict, path: str, fmt: str, *, placement: bool, total: bool, spec=None) -> str:
    """Write ``record`` (the controller's ``recorded_loads()``) to ``path`` as ``fmt``; one summary line.

    ``spec``: the served model's :class:`~ray_eplb.actors.hf_checkpoint.MoeSpec`: rows are then its
    decoder layers, as SGLang counts them (dense layers: zero loads, round-robin placement rows)."""
    import torch

    from ray_eplb.topology import Placement, Topology
    from ray_eplb.topology.records import write_loads, write_placement

    for key in ("window", "total", "phy2log", "topology", "epoch"):
        if key not in record:
            raise ValueError(f"the controller's record has no {key!r}")
    topo = Topology.model_validate(record["topology"])
    if spec is not None and (spec.num_layers, spec.num_experts) != (topo.num_layers, topo.num_experts):
        raise ValueError(f"--model has {spec.num_layers} MoE layers x {spec.num_experts} experts, the balancer "
                         f"{topo.num_layers} x {topo.num_experts}")
    rows = topo.num_layers if spec is None else spec.num_hidden_layers
    if placement:
        if spec is not None and fmt == "ours":
            raise ValueError("--model gives SGLang's decoder-layer rows; format 'ours' keeps the balancer's topology")
        phy2log = torch.tensor(record["phy2log"], dtype=torch.int64)  # [L, R]
        if tuple(phy2log.shape) != (topo.num_layers, topo.num_slots):
            raise ValueError(f"the controller's phy2log has shape {tuple(phy2log.shape)}, expected "
                             f"[{topo.num_layers}, {topo.num_slots}]")
        if spec is not None:
            full = Placement.identity(topo.model_copy(update={"num_layers": rows})).phy2log.clone()  # [L_dec, R]
            full[list(spec.moe_layers)] = phy2log
            topo, phy2log = topo.model_copy(update={"num_layers": rows}), full
        p = Placement.from_phy2log(topo, phy2log, int(record["epoch"]))
        write_placement(path, p, fmt)
        return f"wrote {path} ({fmt}): placement epoch {p.epoch}, {rows} layers x {topo.num_slots} slots"
    load = torch.tensor(record["total"] if total else record["window"], dtype=torch.float64)
    if total:
        load = load.unsqueeze(0)  # [1, L, E]
    elif load.numel() == 0:
        raise ValueError("the balancer has recorded no round yet (its loop is not running?); try again later")
    want = (topo.num_layers, topo.num_experts)
    if load.dim() != 3 or tuple(load.shape[1:]) != want:
        raise ValueError(f"the controller's loads have shape {tuple(load.shape)}, expected [T, {want[0]}, {want[1]}]")
    if float(load.sum()) <= 0:
        if not total and float(torch.tensor(record["total"], dtype=torch.float64).sum()) > 0:
            raise ValueError(f"the recent window's {load.shape[0]} rounds saw no token (idle traffic); "
                             "--total exports everything counted since the controller started")
        raise ValueError("the balancer has recorded no token yet: nothing to export")
    if spec is not None:
        full = torch.zeros(load.shape[0], rows, topo.num_experts, dtype=torch.float64)  # [T, L_dec, E]
        full[:, list(spec.moe_layers)] = load
        load = full
    meta = {} if fmt == "sglang" else {"note": f"ray-eplb balancer, epoch {record['epoch']}, "
                                                f"{'total since start' if total else 'recent window rounds'}"}
    write_loads(path, load, fmt, **meta)
    return (f"wrote {path} ({fmt}): {load.shape[0]} window(s) x {rows} layers x {topo.num_experts} experts, "
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
        ap.add_argument("--model", default=None, metavar="DIR",
                        help="the served Hugging Face model's folder: one row per decoder layer, as SGLang counts "
                             "them (dense layers: zero loads, round-robin placement rows)")

    def body(a: argparse.Namespace) -> int:
        import ray

        from ray_eplb.controller.service import attach

        if a.placement and a.total:
            raise BadInput("--total is about loads; --placement writes the placement in force")
        out = Path(a.output)
        if out.is_dir() or not out.resolve().parent.is_dir():
            raise BadInput(f"-o {a.output}: not a file in an existing folder")
        fmt = resolve_format(a.output, a.fmt, a.placement)  # before touching the cluster
        spec = None
        if a.model is not None:
            from ray_eplb.actors.hf_checkpoint import MoeSpec

            spec = MoeSpec.from_folder(a.model)
        bal = attach(a.address, a.namespace)
        record = ray.get(bal.controller.recorded_loads.remote())
        print(export(record, a.output, fmt, placement=a.placement, total=a.total, spec=spec))
        return 0

    return run("loads", list(sys.argv[1:] if argv is None else argv), build, body)


if __name__ == "__main__":
    sys.exit(main())
