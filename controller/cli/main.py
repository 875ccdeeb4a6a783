"""The ``ray-eplb`` command. Each subcommand lives in its own module (``module`` runs its ``main``,
``module:function`` that function), imported only when it runs, so ``ray-eplb bench`` never imports Ray."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("ray_eplb.controller.cli.demo", "end-to-end demo on an embedded local Ray cluster"),
    "bench": ("ray_eplb.controller.bench.solver", "solver benchmark on real traces (synthetic fallback); "
              "--migration: migration-aware; --scale: production-scale shapes"),
    "bench-runtime": ("ray_eplb.controller.bench.runtime", "runtime benchmark: telemetry, swap, transfer"),
    "tiny-model": ("ray_eplb.controller.cli.tiny_model", "write a tiny random-weight Hugging Face MoE model "
                   "(demo --model, the Serve example)"),
    "loads": ("ray_eplb.controller.cli.loads", "export the running balancer's recorded loads (or --placement) "
              "as SGLang / trace / JSON records"),
    "plan": ("ray_eplb.controller.cli.plan", "plan a placement offline from engine load records (SGLang, trace, JSON)"),
    "start": ("ray_eplb.controller.cli.ops:start", "start a standing balancer on a Ray cluster (detached; outlives this shell)"),
    "status": ("ray_eplb.controller.cli.ops:status", "the running balancer: epoch, balancedness, last rebalance, workers"),
    "history": ("ray_eplb.controller.cli.ops:history", "rebalances so far; --plot PNG draws balancedness and GPU loads"),
    "rebalance": ("ray_eplb.controller.cli.ops:rebalance", "rebalance now (--dry-run: show the plan and its gain only)"),
    "config": ("ray_eplb.controller.cli.ops:config", "show or set the running controller's configuration"),
    "stop": ("ray_eplb.controller.cli.ops:stop", "remove the running balancer (its actors, placement groups, store)"),
    "grafana": ("ray_eplb.controller.cli.ops:grafana", "print the Grafana dashboard JSON of the balancer's metrics"),
}

SCALE_BENCH = "ray_eplb.controller.bench.scale"
MODEL_DEMO = "ray_eplb.controller.cli.model_demo"


def version() -> str:
    """The installed package's version (``unknown`` when run from a source tree not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ray-eplb")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: ray-eplb [--version] [--help] COMMAND [options]\n\n"
            "Ray-native expert-parallel load balancer for Mixture-of-Experts serving.\n\ncommands:\n"
            + "\n".join(lines) + "\n\nRun 'ray-eplb COMMAND --help' for a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"ray-eplb {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(usage())
        print(f"\nray-eplb: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "bench" and "--scale" in rest:  # the production-scale shapes: a benchmark of its own
        return int(importlib.import_module(SCALE_BENCH).main([a for a in rest if a != "--scale"]) or 0)
    if name == "demo" and any(x == "--model" or x.startswith("--model=") for x in rest):  # a Hugging Face folder
        return int(importlib.import_module(MODEL_DEMO).main(rest) or 0)
    path, _, function = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(path), function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
