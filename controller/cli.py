"""The ``ray-eplb`` command: ``bench`` (solver benchmark), ``demo`` (the real cluster demo),
``bench-runtime`` (runtime benchmark). Each subcommand lives in its own module, imported lazily so
``ray-eplb bench`` never imports Ray."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("ray_eplb.controller.bench_solver", "solver benchmark on real traces (synthetic fallback)"),
    "demo": ("ray_eplb.controller.demo", "end-to-end demo on an embedded local Ray cluster"),
    "bench-runtime": ("ray_eplb.controller.bench_runtime", "runtime benchmark: telemetry, swap, transfer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: ray-eplb COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nray-eplb: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
