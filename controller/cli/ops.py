"""``ray-eplb start | status | history | rebalance | config | stop``: run a standing balancer on a Ray
cluster and steer it from any shell (:mod:`ray_eplb.controller.service`).

Every command joins the cluster at ``--address`` (default: ``RAY_ADDRESS``, else the cluster this
machine runs) as a Ray driver, with Ray's token authentication as configured for that cluster.
Exit codes: 0 done, 1 the balancer refused or failed (an aborted rebalance), 2 bad input (one line
on stderr), 3 no balancer is running (or no cluster answers), with the command that starts one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

START_HINT = "start one with: ray-eplb start --address {address} --weights synthetic:64:128 --experts 16 --layers 4"


class BadInput(ValueError):
    """A command-line value the command cannot use (exit code 2)."""


def common(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    ap.add_argument("--namespace", default=None, help="the balancer's Ray namespace (default ray_eplb)")
    return ap


def run(prog: str, argv: list[str], build: Callable[[argparse.ArgumentParser], None],
        body: Callable[[argparse.Namespace], int]) -> int:
    """Parse, run ``body``, and turn failures into the exit codes of the module docstring."""
    from ray_eplb.controller.service import NoBalancer

    ap = common(argparse.ArgumentParser(prog=f"ray-eplb {prog}", description=__doc__.splitlines()[0]))
    build(ap)
    try:
        a = ap.parse_intermixed_args(argv)  # `config set --address A k=v`: positionals around options
    except SystemExit as exc:  # argparse already printed its one-line error (code 2) or the help (0)
        return int(exc.code or 0)
    a.address = a.address or os.environ.get("RAY_ADDRESS") or "auto"
    from ray_eplb.actors.names import NAMESPACE

    a.namespace = a.namespace or NAMESPACE
    import ray

    connected_before = ray.is_initialized()  # a caller's own connection is theirs to close
    try:
        return body(a)
    except NoBalancer as exc:
        hint = f"; {START_HINT.format(address=a.address)}" if exc.startable else ""
        print(f"ray-eplb {prog}: {exc}{hint}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:
        print(f"ray-eplb {prog}: {_cause(exc)}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized() and not connected_before:
            ray.shutdown()


def _cause(exc: BaseException) -> str:
    """One line: the message of ``exc`` (of the ValueError inside a Ray task error)."""
    inner = getattr(exc, "cause", None)
    text = str(inner if isinstance(inner, ValueError) else exc)
    return " ".join(text.split())[:500]


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``: values read as JSON (``8``, ``0.1``, ``null``,
    ``true``), else kept as text (``ema:0.5``). ``BadInput`` names an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise BadInput(f"{item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def load_config(path: str | None, settings: list[str]) -> Any:
    """A :class:`ControllerConfig` from a JSON or YAML file (its fields at the top level) and
    ``key=value`` overrides; ``ValueError`` names a bad file or value."""
    from ray_eplb.controller.config import ControllerConfig

    fields: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            fields = yaml.safe_load(text) or {}
        else:
            try:
                fields = json.loads(text)
            except ValueError as exc:
                raise BadInput(f"config file {path!r} is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise BadInput(f"config file {path!r} must hold a mapping of ControllerConfig fields")
    fields.update(parse_settings(settings))
    return ControllerConfig.model_validate(fields)


# ---------------------------------------------------------------------- start / stop
def start(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--weights", default="synthetic:64:128",
                        help="synthetic:HIDDEN:FFN[:SEED], hf:FOLDER or a .safetensors path (default synthetic:64:128)")
        ap.add_argument("--experts", type=int, default=None, help="experts per layer (hf: read from the folder)")
        ap.add_argument("--layers", type=int, default=None, help="MoE layers (hf: read from the folder)")
        ap.add_argument("--nodes", type=int, default=None, help="expert-parallel nodes (default: discovered)")
        ap.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: discovered)")
        ap.add_argument("--slots-per-gpu", type=int, default=None, help="expert slots per rank (default ceil(E/R) + 1)")
        ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where experts compute")
        ap.add_argument("--config", default=None, metavar="FILE", help="ControllerConfig fields in a JSON or YAML file")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a ControllerConfig field")
        ap.add_argument("--no-loop", action="store_true", help="do not start the control loop (rebalance by hand)")
        ap.add_argument("--json", action="store_true", help="print the outcome as JSON")

    def body(a: argparse.Namespace) -> int:
        from ray_eplb.controller.service import attach, connect, start, weight_source

        config = load_config(a.config, a.set)  # bad input fails before touching the cluster
        source, layers, experts = weight_source(a.weights)
        layers, experts = a.layers or layers, a.experts or experts
        if not layers or not experts:
            raise BadInput(f"--weights {a.weights} needs --layers and --experts")
        connect(a.address, a.namespace)
        try:
            bal = attach(a.address, a.namespace)
        except LookupError:
            bal = start(topology(a, layers, experts), source, config, address=a.address, namespace=a.namespace,
                        device=a.device, start_loop=not a.no_loop, weights=a.weights)
        st = bal.report()
        t = bal.topology
        what = "started" if bal.started_now else "already running (nothing started; ray-eplb stop removes it)"
        if a.json:
            print(json.dumps({"started": bal.started_now, "namespace": bal.namespace, "topology": t.model_dump(),
                              "epoch": st.epoch, "loop": st.loop}))
        else:
            print(f"balancer {bal.namespace} {what}: {t.num_nodes} nodes x {t.gpus_per_node} ranks, "
                  f"{t.slots_per_gpu} slots per rank, {t.num_experts} experts x {t.num_layers} layers; epoch {st.epoch}, "
                  f"loop {st.loop}; weights {bal.deployment.get('weights')}")
        return 0

    return run("start", argv, build, body)


def topology(a: argparse.Namespace, layers: int, experts: int) -> Any:
    """The topology from the flags, or discovered from the cluster's rank resources."""
    from ray_eplb.topology import Topology, discover_topology
    from ray_eplb.topology.discovery import default_slots_per_gpu

    if (a.nodes is None) != (a.gpus_per_node is None):
        raise BadInput("--nodes and --gpus-per-node go together (or neither: discovered from the cluster)")
    if a.nodes is None:
        return discover_topology(experts, layers, slots_per_gpu=a.slots_per_gpu)
    slots = a.slots_per_gpu or default_slots_per_gpu(experts, a.nodes * a.gpus_per_node)
    return Topology(num_nodes=a.nodes, gpus_per_node=a.gpus_per_node, slots_per_gpu=slots, num_experts=experts,
                    num_layers=layers)


def stop(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--json", action="store_true", help="print what was removed as JSON")

    def body(a: argparse.Namespace) -> int:
        from ray_eplb.controller.service import NoBalancer, shutdown

        out = shutdown(a.namespace, address=a.address)
        if not out["actors"]:
            raise NoBalancer(f"no balancer is running in namespace {a.namespace!r} (nothing to stop)")
        if a.json:
            print(json.dumps(out))
        else:
            print(f"stopped balancer {a.namespace}: {len(out['actors'])} actors killed, "
                  f"{len(out['placement_groups'])} placement groups removed, its store cleared")
        return 0

    return run("stop", argv, build, body)


# ---------------------------------------------------------------------- status / config
def status(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--json", action="store_true", help="the ControllerStatus as JSON")

    def body(a: argparse.Namespace) -> int:
        from ray_eplb.controller.service import attach

        st = attach(a.address, a.namespace).report()
        print(st.model_dump_json(indent=1) if a.json else "\n".join(st.lines()))
        return 0

    return run("status", argv, build, body)


def config(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("action", choices=("show", "set"), help="show the configuration, or set fields")
        ap.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="ControllerConfig fields to change")

    def body(a: argparse.Namespace) -> int:
        import ray

        from ray_eplb.controller.service import attach

        if a.action == "set" and not a.settings:
            raise BadInput("config set needs at least one key=value")
        changes = parse_settings(a.settings)
        if a.action == "show" and changes:
            raise BadInput("config show takes no key=value")
        from ray_eplb.controller.config import ControllerConfig

        bal = attach(a.address, a.namespace)
        cfg = ray.get(bal.controller.status.remote()).config
        if a.action == "set":
            ControllerConfig.model_validate({**cfg, **changes})  # a bad value fails here, in one line
            try:
                cfg = ray.get(bal.controller.reconfigure.remote(**changes))
            except ray.exceptions.RayTaskError as exc:
                raise BadInput(_cause(exc)) from None
        print(json.dumps(cfg, indent=1))
        return 0

    return run("config", argv, build, body)


# ---------------------------------------------------------------------- rebalance / history
def rebalance(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--fresh", action="store_true", help="solve from scratch (no move budget, no hysteresis)")
        ap.add_argument("--dry-run", action="store_true", help="solve on the forecast and show the plan; apply nothing")
        ap.add_argument("--json", action="store_true", help="print the outcome as JSON")

    def body(a: argparse.Namespace) -> int:
        import ray

        from ray_eplb.controller.operations import tensor_free
        from ray_eplb.controller.service import attach

        bal = attach(a.address, a.namespace)
        if a.dry_run:
            plan = ray.get(bal.controller.plan_only.remote(fresh=a.fresh))
            if a.json:
                print(json.dumps(plan))
            elif plan["action"] != "plan":
                print(f"no plan: {plan['why']}")
            else:
                est = "" if plan["bytes_estimate"] is None else f", about {plan['bytes_estimate'] / 2**20:.1f} MiB"
                print(f"dry run ({plan['planning']}, nothing applied): balancedness {plan['predicted_before']:.3f} -> "
                      f"{plan['predicted_after']:.3f} predicted on the forecast (gain {plan['gain']:+.4f}, min_gain "
                      f"{plan['min_gain']}); would move {plan['moved']} slots{est}; the loop "
                      f"{'would' if plan['would_apply'] else 'would not'} apply it")
            return 0
        from ray_eplb.controller.cli.progress import SwapBar, controller_poll, wanted

        ref = bal.controller.rebalance_now.remote(fresh=a.fresh)
        with SwapBar(controller_poll(bal.controller), wanted(sys.stderr, a.json)):  # a bar on a terminal
            rec = ray.get(ref)
        if a.json:
            print(json.dumps(tensor_free(rec)))
        else:
            print(outcome_line(rec))
        return 1 if rec.get("action") in ("aborted", "error") else 0

    return run("rebalance", argv, build, body)


def outcome_line(rec: dict) -> str:
    """One line for a round's record (a rebalance's outcome)."""
    act = rec.get("action", "none")
    if act == "committed":
        return (f"committed epoch {rec['epoch']} ({rec.get('reason', 'explicit')}, {rec.get('planning', '-')}): "
                f"{rec['moved']} slots, {rec['bytes_moved'] / 2**20:.1f} MiB in {rec['batches']} batches, "
                f"{rec['swap_s']:.2f} s; predicted balancedness {_f(rec.get('predicted_before'))} -> "
                f"{_f(rec.get('predicted_after'))}")
    if act == "aborted":
        return f"aborted epoch {rec.get('epoch')} in {rec.get('phase')}: {rec.get('failures')}"
    if act == "error":
        return f"failed: {rec.get('error')}"
    return f"{act}: {rec.get('why', 'the placement in force already fits the forecast')}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def history(argv: list[str]) -> int:
    def build(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--json", action="store_true", help="rebalances, rounds and per-GPU loads as JSON")
        ap.add_argument("--plot", default=None, metavar="PNG", help="write balancedness over time and load heatmaps here")
        ap.add_argument("--last", type=int, default=20, help="rebalances to list (default 20)")

    def body(a: argparse.Namespace) -> int:
        import ray

        from ray_eplb.controller.operations import tensor_free
        from ray_eplb.controller.service import attach

        if a.plot and not a.plot.lower().endswith(".png"):
            raise BadInput(f"--plot {a.plot}: the plot is a PNG file (name it .png)")
        ctl = attach(a.address, a.namespace).controller
        hist, timeline, loads = ray.get([ctl.history.remote(), ctl.timeline.remote(), ctl.rebalance_loads.remote()])
        if a.plot:
            from ray_eplb.controller.cli.plots import history_figure

            history_figure(timeline, hist, loads, a.plot)
        if a.json:
            print(json.dumps({"history": tensor_free(hist), "timeline": timeline, "rebalance_loads": loads}))
            return 0
        for rec in hist[-a.last:]:
            when = time.strftime("%H:%M:%S", time.localtime(rec.get("time", 0)))
            print(f"{when}  {outcome_line(rec)}")
        if not hist:
            print(f"no rebalance yet ({len(timeline)} rounds)")
        if a.plot:
            print(f"wrote {a.plot}")
        return 0

    return run("history", argv, build, body)


def grafana(argv: list[str]) -> int:
    """Print the Grafana dashboard JSON (import it beside Ray's own dashboards)."""
    if argv:
        print(f"ray-eplb grafana: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return 2
    from importlib.resources import files

    sys.stdout.write(files("ray_eplb.controller").joinpath("grafana_dashboard.json").read_text())
    return 0
