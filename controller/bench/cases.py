"""The benchmark cases (a trace and a cluster shape each) and their load windows, shared by
``ray-eplb bench`` (:mod:`~ray_eplb.controller.bench.solver`) and ``bench --migration``
(:mod:`~ray_eplb.controller.bench.migration`). Static tables (T == 1) become 12 windows of 200,000
routed tokens per layer; without a traces folder the synthetic shapes run instead, and say so."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_eplb.controller.bench.workload import default_traces_dir, load_trace, sample_windows, synthetic_trace

STATIC_WINDOWS = 12
STATIC_TOKENS = 200_000


@dataclass(frozen=True)
class Case:
    trace: str
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    target_in_window: float | None = None  # best published solver's in-window balancedness
    synthetic_experts: int = 0  # > 0: a synthetic workload with this many experts

    @property
    def name(self) -> str:
        return f"{self.trace} {self.num_replicas},{self.num_groups},{self.num_nodes},{self.num_gpus}"


CASES = [
    Case("dsv2lite_puffin", 288, 8, 4, 32, 0.997),
    Case("dsv2lite_puffin", 72, 8, 2, 8, 0.996),
    Case("llama4_maverick_mmlu", 144, 8, 2, 16, 0.911),
    Case("llama4_maverick_mmlu", 160, 8, 4, 32, 0.892),
    Case("qwen3_235b_prover", 144, 8, 2, 16, 0.996),
    Case("qwen3_235b_prover", 136, 8, 1, 8, 0.9998),
    Case("qwen3_30b_prover", 144, 8, 2, 16, 0.996),
    Case("qwen2_57b_sharegpt", 72, 8, 2, 8, 0.995),
    Case("qwen2_57b_multidomain", 80, 8, 2, 16, 0.988),
    Case("olmoe_domains", 72, 8, 2, 8, 0.993),
    Case("mixtral_domains", 16, 4, 2, 8, 0.962),
]

# Shapes of the real cases on the synthetic workload (no published targets there).
SYNTHETIC_CASES = [
    Case("synthetic_e64", 288, 8, 4, 32, synthetic_experts=64),
    Case("synthetic_e64", 72, 8, 2, 8, synthetic_experts=64),
    Case("synthetic_e128", 144, 8, 2, 16, synthetic_experts=128),
    Case("synthetic_e8", 16, 4, 2, 8, synthetic_experts=8),
]


def case_windows(case: Case, traces_dir: Path | None, max_windows: int | None, seed: int) -> torch.Tensor:
    """The case's load windows, ``[T, L, E]`` float64 (``T >= 2``), truncated to ``max_windows``."""
    if case.synthetic_experts:
        top_k = 2 if case.synthetic_experts <= 8 else 6
        load = synthetic_trace(STATIC_WINDOWS, 12, case.synthetic_experts, top_k=top_k, seed=seed).load
    else:
        load = load_trace(case.trace, traces_dir).load  # [T, L, E]
        if load.shape[0] == 1:
            load = sample_windows(load[0], STATIC_WINDOWS, STATIC_TOKENS, seed)  # [12, L, E]
    if max_windows is not None:
        load = load[: max(2, max_windows)]
    return load


def select_cases(args: argparse.Namespace, notes: list[str]) -> tuple[list[Case], str, Path | None]:
    """The cases to run (real traces, or the synthetic ones when there is no traces folder or
    ``--synthetic``; a notice goes to ``notes``), filtered by ``--cases``: ``(cases, workload
    label, traces folder or None)``. Raises ``ValueError`` when the filter matches nothing."""
    traces_dir = Path(args.traces_dir) if args.traces_dir else default_traces_dir()
    if args.synthetic or traces_dir is None or not traces_dir.is_dir():
        if not args.synthetic:
            notes.append(f"no traces folder found ({args.traces_dir or 'default: $RAY_EPLB_TRACES or ../shared/traces'}); "
                         "running on the built-in SYNTHETIC workload, not real traces")
        cases, workload, traces_dir = SYNTHETIC_CASES, "synthetic workload", None
    else:
        cases, workload = CASES, f"real traces from {traces_dir}"
    if args.cases:
        cases = [c for c in cases if any(w in c.name for w in args.cases)]
        if not cases:
            raise ValueError(f"--cases {args.cases!r} matches no case")
    return cases, workload, traces_dir
