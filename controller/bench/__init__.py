"""ray_eplb.controller.bench: the benchmarks (solver, migration, runtime), their cases, the load
workloads they replay (real traces, or the built-in synthetic one), and the dense reference MoE
that the demo, the tests and the benchmarks check every output against. Tools, not the control
plane: nothing in :mod:`ray_eplb.controller` imports this package."""
