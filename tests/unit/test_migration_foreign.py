"""A foreign starting plan (DeepSeek's greedy, which stacks replicas of one expert on a GPU):
one migration-aware call leaves no avoidable duplicate, and the batched repair keeps its rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_eplb.controller.bench.cases import Case
from ray_eplb.controller.bench.solver import unavoidable_duplicates
from ray_eplb.controller.bench.workload import default_traces_dir, load_trace, synthetic_trace
from ray_eplb.solver import duplicate_pairs, rebalance_experts
from ray_eplb.solver.baseline import greedy_rebalance_experts
from ray_eplb.solver.maps import avoidable_duplicates_np
from ray_eplb.solver.packing import surplus_copies
from ray_eplb.solver.repair import separate_copies_batched

SHAPES = [(288, 8, 4, 32), (72, 8, 2, 8), (144, 8, 2, 16), (160, 1, 4, 32)]


def _avoidable(phy2log: torch.Tensor, logcnt: torch.Tensor, shape: tuple[int, int, int, int]) -> int:
    case = Case("x", *shape)
    return duplicate_pairs(phy2log, shape[3]) - unavoidable_duplicates(phy2log, logcnt, case)


def _check_one_call_clears(prev: torch.Tensor, w: torch.Tensor, shape: tuple[int, int, int, int],
                           policy: str = "auto") -> None:
    old, _, old_cnt = greedy_rebalance_experts(prev, *shape)
    assert _avoidable(old, old_cnt, shape) > 0  # the premise: the greedy's plan wastes slots
    phy2log, _, logcnt = rebalance_experts(w, *shape, old_phy2log=old, policy=policy)
    assert _avoidable(phy2log, logcnt, shape) == 0
    if policy != "hierarchical":  # (a hierarchical plan may double up where a node has too few GPUs)
        assert avoidable_duplicates_np(phy2log.numpy(), shape[3], w.shape[1]).sum() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_one_call_clears_the_greedys_duplicates_on_synthetic_load(shape):
    load = synthetic_trace(2, 6, 128 if shape[0] >= 128 else 64, top_k=8, seed=3).load
    _check_one_call_clears(load[0], load[1], shape)


@pytest.mark.parametrize("shape", [(288, 8, 4, 32), (72, 8, 2, 8)])
def test_hierarchical_policy_also_clears_them(shape):
    load = synthetic_trace(2, 6, 64, top_k=8, seed=4).load
    _check_one_call_clears(load[0], load[1], shape, policy="hierarchical")


@pytest.mark.parametrize("trace, shape", [("dsv2lite_puffin", (288, 8, 4, 32)), ("qwen3_30b_prover", (144, 8, 2, 16))])
def test_one_call_clears_the_greedys_duplicates_on_a_trace(trace, shape):
    traces = default_traces_dir()
    if traces is None or not (traces / f"{trace}.npz").exists():
        pytest.skip("no traces folder")
    load = load_trace(trace, traces).load
    prev, w = (load[0], load[1]) if load.shape[0] > 1 else (load[0], load[0] * 1.01)
    _check_one_call_clears(prev, w, shape)


def test_avoidable_duplicates_np_by_hand():
    # 2 GPUs x 3 slots. Expert 0 has 3 replicas: one more than GPUs, so one pair is unavoidable.
    phy2log = np.array([[0, 0, 1, 0, 2, 3], [0, 0, 1, 2, 2, 3]])
    assert avoidable_duplicates_np(phy2log, 2, 4).tolist() == [0, 2]


def test_batched_repair_clears_surplus_and_keeps_counts():
    rng = np.random.default_rng(0)
    num_rows, num_bins, slots, n = 5, 8, 6, 20
    own = np.stack([rng.permutation(np.concatenate([np.arange(n), rng.integers(0, n, num_bins * slots - n)]))
                    for _ in range(num_rows)]).reshape(num_rows, num_bins, slots)
    counts = np.stack([np.bincount(r.ravel(), minlength=n) for r in own])  # [B, n]
    per = rng.random((num_rows, n)) / counts
    cap = -(-counts // num_bins)
    assert surplus_copies(own, cap).any()
    fixed = separate_copies_batched(own, per, cap)
    assert not surplus_copies(fixed, cap).any()
    assert np.array_equal(np.stack([np.bincount(r.ravel(), minlength=n) for r in fixed]), counts)
