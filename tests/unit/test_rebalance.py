"""rebalance_experts (solver/rebalance.py); the metrics and maps are in test_metrics.py.

Invariants are checked with code written here (numpy, loops), not with the solver's own helpers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_eplb.controller.bench.workload import default_traces_dir
from ray_eplb.solver import balancedness, duplicate_pairs, rebalance_experts, replica_counts

TRACES = default_traces_dir() or Path("../shared/traces")


# ----------------------------------------------------------------------------------------------
# independent checks
# ----------------------------------------------------------------------------------------------
def check_valid(weight: torch.Tensor, num_replicas: int, num_gpus: int, out) -> tuple[np.ndarray, np.ndarray]:
    """Shapes, dtypes, device, ranges; logcnt and log2phy against phy2log. Returns numpy phy2log, logcnt."""
    phy2log, log2phy, logcnt = out
    num_layers, num_experts = weight.shape
    width = num_replicas - num_experts + 1
    for t in out:
        assert t.dtype == torch.int64 and t.device == weight.device
    assert tuple(phy2log.shape) == (num_layers, num_replicas)
    assert tuple(log2phy.shape) == (num_layers, num_experts, width)
    assert tuple(logcnt.shape) == (num_layers, num_experts)
    p, l2p, cnt = phy2log.cpu().numpy(), log2phy.cpu().numpy(), logcnt.cpu().numpy()
    assert ((p >= 0) & (p < num_experts)).all()
    for layer in range(num_layers):
        np.testing.assert_array_equal(cnt[layer], np.bincount(p[layer], minlength=num_experts))
        for e in range(num_experts):
            slots = np.nonzero(p[layer] == e)[0]  # ascending
            want = np.full(width, -1)
            want[: slots.size] = slots
            np.testing.assert_array_equal(l2p[layer, e], want)
    assert (cnt >= 1).all() and (cnt.sum(1) == num_replicas).all()
    assert num_replicas % num_gpus == 0  # so every GPU holds R/P consecutive slots
    return p, cnt


def per_gpu_copies(p: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L, P, E]`` replicas of each expert on each GPU."""
    num_layers, num_replicas = p.shape
    g = p.reshape(num_layers, num_gpus, num_replicas // num_gpus)
    return (g[..., None] == np.arange(num_experts)).sum(2)


def check_no_avoidable_duplicates(p: np.ndarray, cnt: np.ndarray, num_gpus: int, gpus_available: int) -> None:
    """A GPU holds more than one replica of an expert only if the expert has more replicas than the
    GPUs available to it, and then no more than ``ceil(count / available)``."""
    copies = per_gpu_copies(p, cnt.shape[1], num_gpus)  # [L, P, E]
    allowed = np.maximum(1, -(-cnt // gpus_available))[:, None, :]
    assert (copies <= allowed).all(), f"avoidable duplicate: {np.argwhere(copies > allowed)[:3].tolist()}"


def check_groups_whole(p: np.ndarray, num_experts: int, num_groups: int, num_nodes: int) -> None:
    """Under the hierarchical policy every expert of a group lives on one node (all replicas)."""
    num_layers, num_replicas = p.shape
    node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
    group_size = num_experts // num_groups
    for layer in range(num_layers):
        for g in range(num_groups):
            in_group = (p[layer] // group_size) == g
            assert len(set(node_of_slot[in_group].tolist())) == 1, f"group {g} of layer {layer} spans nodes"


def max_gpu_load(p: np.ndarray, cnt: np.ndarray, w: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]`` max GPU load with each expert's load split evenly among its replicas (hand-rolled)."""
    per_replica = w / cnt  # [L, E]
    slot = np.take_along_axis(per_replica, p, 1)  # [L, R]
    return slot.reshape(p.shape[0], num_gpus, -1).sum(-1).max(1)


# ----------------------------------------------------------------------------------------------
# property tests over shapes, weights and policies
# ----------------------------------------------------------------------------------------------
@st.composite
def problems(draw, hier_ok: bool = True):
    num_nodes = draw(st.integers(1, 3))
    gpus_per_node = draw(st.integers(1, 4))
    num_gpus = num_nodes * gpus_per_node
    if hier_ok:
        num_groups = num_nodes * draw(st.integers(1, 3))
        num_experts = num_groups * draw(st.integers(1, 4))
    else:
        num_groups = draw(st.integers(1, 6))
        num_experts = draw(st.integers(1, 16))
    slots = draw(st.integers(-(-num_experts // num_gpus), -(-num_experts // num_gpus) + 4))
    num_replicas = num_gpus * slots
    num_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["float", "int", "zeros", "hot", "zero_row", "skewed"]))
    shape = (num_layers, num_experts)
    if kind == "float":
        w = rng.random(shape) * 100
    elif kind == "int":
        w = rng.integers(0, 4, shape).astype(np.float64)
    elif kind == "zeros":
        w = rng.random(shape) * (rng.random(shape) < 0.4)
    elif kind == "hot":
        w = rng.random(shape) * 1e-3
        w[np.arange(num_layers), rng.integers(0, num_experts, num_layers)] = 1.0
    elif kind == "zero_row":
        w = rng.random(shape)
        w[0] = 0.0
    else:
        w = rng.exponential(1.0, shape) ** 4
    return torch.from_numpy(w), num_replicas, num_groups, num_nodes, num_gpus


@settings(max_examples=70, deadline=None)
@given(problems(), st.sampled_from(["hybrid_tail", "dhondt"]))
def test_global_policy_invariants(problem, method):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    out = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="global", method=method)
    p, cnt = check_valid(weight, num_replicas, num_gpus, out)
    check_no_avoidable_duplicates(p, cnt, num_gpus, num_gpus)
    # The counts are the count rule's, applied to the whole layer.
    np.testing.assert_array_equal(cnt, replica_counts(weight, num_replicas, method=method).numpy())


@settings(max_examples=70, deadline=None)
@given(problems(), st.sampled_from(["hybrid_tail", "dhondt"]))
def test_hierarchical_policy_invariants(problem, method):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    out = rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, policy="hierarchical", method=method
    )
    p, cnt = check_valid(weight, num_replicas, num_gpus, out)
    check_groups_whole(p, weight.shape[1], num_groups, num_nodes)
    check_no_avoidable_duplicates(p, cnt, num_gpus, num_gpus // num_nodes)
    # Each node gets an equal share of experts and slots.
    num_layers, num_experts = weight.shape
    node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
    for layer in range(num_layers):
        nodes = [set(p[layer, node_of_slot == k].tolist()) for k in range(num_nodes)]
        assert all(len(s) == num_experts // num_nodes for s in nodes)


@settings(max_examples=70, deadline=None)
@given(problems())
def test_auto_picks_the_lower_max_gpu_load_per_layer(problem):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    args = (weight, num_replicas, num_groups, num_nodes, num_gpus)
    auto = rebalance_experts(*args)
    p, cnt = check_valid(weight, num_replicas, num_gpus, auto)
    glob = rebalance_experts(*args, policy="global")
    hier = rebalance_experts(*args, policy="hierarchical")
    w = weight.numpy()
    pg, ph = glob[0].numpy(), hier[0].numpy()
    peak_g = max_gpu_load(pg, glob[2].numpy(), w, num_gpus)
    peak_h = max_gpu_load(ph, hier[2].numpy(), w, num_gpus)
    peak_a = max_gpu_load(p, cnt, w, num_gpus)
    np.testing.assert_allclose(peak_a, np.minimum(peak_g, peak_h), rtol=1e-12)
    for layer in range(weight.shape[0]):
        assert (p[layer] == pg[layer]).all() or (p[layer] == ph[layer]).all()
        if peak_h[layer] < peak_g[layer] * (1 - 1e-12):
            assert (p[layer] == ph[layer]).all()
        if peak_g[layer] < peak_h[layer] * (1 - 1e-12):
            assert (p[layer] == pg[layer]).all()


@settings(max_examples=50, deadline=None)
@given(problems(hier_ok=False))
def test_auto_without_a_valid_grouping_is_global(problem):
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    args = (weight, num_replicas, num_groups, num_nodes, num_gpus)
    auto = rebalance_experts(*args)
    p, cnt = check_valid(weight, num_replicas, num_gpus, auto)
    hier_ok = weight.shape[1] % num_groups == 0 and num_groups % num_nodes == 0
    if not hier_ok or num_nodes == 1:
        assert torch.equal(auto[0], rebalance_experts(*args, policy="global")[0])
        check_no_avoidable_duplicates(p, cnt, num_gpus, num_gpus)
    else:  # the draw happened to fit: a layer may be hierarchical, with only its node's GPUs
        is_hier = (rebalance_experts(*args, policy="hierarchical")[0].numpy() == p).all(1)
        check_no_avoidable_duplicates(p[~is_hier], cnt[~is_hier], num_gpus, num_gpus)
        check_no_avoidable_duplicates(p[is_hier], cnt[is_hier], num_gpus, num_gpus // num_nodes)


def test_auto_takes_hierarchical_where_it_is_strictly_better():
    # w = [9, 2, 6, 7], 6 slots, groups {0, 1} {2, 3}, 2 nodes of 1 GPU. Hierarchical: node 0 gets
    # experts 0, 1 with 3 slots (9 split in two): GPU loads 11 / 13. Global: counts [2, 1, 1, 2]
    # (peak 6), and with no expert twice on a GPU the best split of 4.5 4.5 2 6 3.5 3.5 is 14 / 10.
    weight = torch.tensor([[9.0, 2.0, 6.0, 7.0], [10.0, 10.0, 1.0, 1.0]])
    auto = rebalance_experts(weight, 6, 2, 2, 2)
    glob = rebalance_experts(weight, 6, 2, 2, 2, policy="global")
    hier = rebalance_experts(weight, 6, 2, 2, 2, policy="hierarchical")
    peak = lambda out: max_gpu_load(out[0].numpy(), out[2].numpy(), weight.numpy(), 2).tolist()  # noqa: E731
    assert peak(hier)[0] == 13.0 and peak(glob)[0] == 14.0
    assert torch.equal(auto[0][0], hier[0][0])
    # Layer 1 (w = [10, 10, 1, 1]): hierarchical puts both hot experts on node 0 (20 + ...) and loses.
    assert peak(glob)[1] < peak(hier)[1]
    assert torch.equal(auto[0][1], glob[0][1])
    assert peak(auto) == [13.0, peak(glob)[1]]


def test_auto_keeps_hierarchical_on_a_tie_as_documented():
    # w = [8, 5, 9, 8], 4 slots, 2 groups, 2 nodes x 2 GPUs: both policies peak at 9, different maps.
    weight = torch.tensor([[8.0, 5.0, 9.0, 8.0]])
    glob = rebalance_experts(weight, 4, 2, 2, 4, policy="global")
    hier = rebalance_experts(weight, 4, 2, 2, 4, policy="hierarchical")
    w = weight.numpy()
    assert max_gpu_load(glob[0].numpy(), glob[2].numpy(), w, 4).tolist() == [9.0]
    assert max_gpu_load(hier[0].numpy(), hier[2].numpy(), w, 4).tolist() == [9.0]
    assert not torch.equal(glob[0], hier[0])
    assert torch.equal(rebalance_experts(weight, 4, 2, 2, 4)[0], hier[0])


def test_unavoidable_duplicates_are_the_only_ones():
    # One hot expert with 6 replicas on 4 GPUs: it must double up on 2 GPUs, nothing else may.
    weight = torch.tensor([[100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = rebalance_experts(weight, 12, 1, 1, 4, policy="global")
    p, cnt = check_valid(weight, 12, 4, out)
    assert cnt[0, 0] == 6
    copies = per_gpu_copies(p, 7, 4)[0]
    assert sorted(copies[:, 0].tolist()) == [1, 1, 2, 2]
    assert (copies[:, 1:] <= 1).all()
    assert duplicate_pairs(out[0], 4) == 2


def test_deterministic():
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.integers(0, 5, (6, 32)).astype(np.float64))  # ties everywhere
    for policy in ("auto", "global", "hierarchical"):
        a = rebalance_experts(weight, 64, 8, 2, 8, policy=policy)
        b = rebalance_experts(weight.clone(), 64, 8, 2, 8, policy=policy)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_identity_when_every_expert_has_one_slot_per_gpu_share():
    # R == E: every count is 1 and every expert appears exactly once.
    weight = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    p, cnt = check_valid(weight, 16, 4, rebalance_experts(weight, 16, 4, 2, 4))
    assert (cnt == 1).all()
    assert (np.sort(p, 1) == np.arange(16)).all()


# ----------------------------------------------------------------------------------------------
# errors and the DeepSeek/vLLM fallback
# ----------------------------------------------------------------------------------------------
W = torch.ones(2, 8)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.ones(8), 8, 1, 1, 2), {}, r"2-D.*\(8,\)"),
        ((torch.ones(1, 2, 8), 8, 1, 1, 2), {}, r"2-D.*\(1, 2, 8\)"),
        ((torch.tensor([[1.0, float("nan")]]), 2, 1, 1, 1), {}, r"nan"),
        ((torch.tensor([[float("inf"), 1.0]]), 2, 1, 1, 1), {}, r"inf"),
        ((torch.tensor([[1.0, -0.5]]), 2, 1, 1, 1), {}, r"-0\.5"),
        ((W, 6, 1, 1, 2), {}, r"num_replicas=6"),
        ((W, 10, 1, 1, 4), {}, r"num_replicas=10.*num_gpus=4"),
        ((W, 12, 1, 2, 3), {}, r"num_gpus=3.*num_nodes=2"),
        ((W, 8, 3, 1, 2), {"policy": "hierarchical"}, r"num_groups=3"),
        ((W, 8, 2, 4, 4), {"policy": "hierarchical"}, r"num_nodes=4"),
        ((W, 8, 1, 1, 2), {"policy": "local"}, r"policy='local'"),
        ((W, 8, 1, 1, 2), {"method": "greedy"}, r"method='greedy'"),
        ((W, 8.0, 1, 1, 2), {}, r"num_replicas=8\.0"),
        ((W, 8, "1", 1, 2), {}, r"num_groups='1'"),
        ((W, 8, 1, None, 2), {}, r"num_nodes=None"),
        ((W, 8, 1, 1, True), {}, r"num_gpus=True"),
        ((W, 8, 1, 1, 0), {}, r"num_gpus=0"),
        ((W, 8, -1, 1, 2), {}, r"num_groups=-1"),
        ((W.numpy(), 8, 1, 1, 2), {}, r"ndarray"),
        ((torch.ones(2, 0), 8, 1, 1, 2), {}, r"experts|n=0|\(2, 0\)"),
    ],
)
def test_errors_name_the_bad_value(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args, **kwargs)


def test_zero_layers_give_empty_maps_or_a_value_error():
    try:
        phy2log, log2phy, logcnt = rebalance_experts(torch.zeros(0, 8), 16, 1, 1, 2)
    except ValueError as exc:
        assert "(0, 8)" in str(exc)
        return
    assert tuple(phy2log.shape) == (0, 16) and tuple(log2phy.shape) == (0, 8, 9) and tuple(logcnt.shape) == (0, 8)


def test_numpy_integer_arguments_are_accepted():
    out = rebalance_experts(W, np.int64(8), np.int32(1), np.int64(1), np.int16(2))
    check_valid(W, 8, 2, out)


def test_grouping_that_does_not_fit_falls_back_to_global():
    # 4 experts, 3 groups, 2 nodes (DeepSeek / vLLM callers pass such shapes): a valid placement.
    weight = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 5.0, 5.0]])
    for policy in ("auto", "global"):
        out = rebalance_experts(weight, 8, 3, 2, 4, policy=policy)
        p, cnt = check_valid(weight, 8, 4, out)
        check_no_avoidable_duplicates(p, cnt, 4, 4)
    assert torch.equal(rebalance_experts(weight, 8, 3, 2, 4)[0], rebalance_experts(weight, 8, 3, 2, 4, policy="global")[0])


# ----------------------------------------------------------------------------------------------
# dtypes and devices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
)
def test_dtypes_match_float64_where_exact(dtype):
    # Integers below 256 are exact in every dtype listed (bfloat16 has 8 significant bits).
    w64 = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 16)).astype(np.float64))
    want = rebalance_experts(w64, 32, 4, 2, 8)
    got = rebalance_experts(w64.to(dtype), 32, 4, 2, 8)
    check_valid(w64, 32, 8, got)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_non_contiguous_and_grad_inputs():
    base = torch.rand(16, 6, requires_grad=True)
    weight = base.t()  # [6, 16], non-contiguous, requires grad
    out = rebalance_experts(weight, 32, 4, 2, 4)
    check_valid(weight.detach(), 32, 4, out)
    assert all(torch.equal(a, b) for a, b in zip(out, rebalance_experts(weight.detach().contiguous(), 32, 4, 2, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_gives_cuda_outputs():
    weight = torch.rand(4, 16, device="cuda")
    out = rebalance_experts(weight, 32, 4, 2, 8)
    assert all(t.device.type == "cuda" and t.dtype == torch.int64 for t in out)
    want = rebalance_experts(weight.cpu(), 32, 4, 2, 8)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, want))


# ----------------------------------------------------------------------------------------------
# real traces (skipped without ../shared/traces)
# ----------------------------------------------------------------------------------------------
CASES = [
    ("dsv2lite_puffin", 288, 8, 4, 32), ("dsv2lite_puffin", 72, 8, 2, 8), ("llama4_maverick_mmlu", 144, 8, 2, 16),
    ("llama4_maverick_mmlu", 160, 8, 4, 32), ("qwen3_235b_prover", 136, 8, 1, 8), ("mixtral_domains", 16, 4, 2, 8),
]


@pytest.mark.skipif(not TRACES.is_dir(), reason="no ../shared/traces")
@pytest.mark.parametrize("name,num_replicas,num_groups,num_nodes,num_gpus", CASES)
def test_real_trace_shapes(name, num_replicas, num_groups, num_nodes, num_gpus):
    with np.load(TRACES / f"{name}.npz") as data:
        load = data["load"]
    weight = torch.from_numpy(load[0])  # [L, E], first window
    score = {}
    for policy in ("auto", "hierarchical"):
        out = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, policy=policy)
        p, cnt = check_valid(weight, num_replicas, num_gpus, out)
        avail = num_gpus if policy == "auto" else num_gpus // num_nodes
        if policy == "hierarchical":
            check_groups_whole(p, weight.shape[1], num_groups, num_nodes)
            check_no_avoidable_duplicates(p, cnt, num_gpus, avail)
        else:  # auto: a layer is global or hierarchical; each must meet its own bound
            hier = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="hierarchical")
            is_hier = (hier[0].numpy() == p).all(1)
            check_no_avoidable_duplicates(p[~is_hier], cnt[~is_hier], num_gpus, num_gpus)
            check_no_avoidable_duplicates(p[is_hier], cnt[is_hier], num_gpus, num_gpus // num_nodes)
        score[policy] = balancedness(out[0], out[2], weight, num_gpus)
    # auto's per-layer max is never above hierarchical's, and the mean load is the same.
    assert 0 < score["hierarchical"] <= score["auto"] + 1e-12 <= 1 + 1e-12


def test_a_shape_whose_working_memory_does_not_fit_is_refused_up_front():
    import time

    from ray_eplb.solver.rebalance import free_memory_bytes, working_memory_bytes

    weight = torch.rand(26, 64)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_replicas=2000000 .* GiB of working memory .* GiB are free"):
        rebalance_experts(weight, 2_000_000, 8, 4, 32)
    assert time.perf_counter() - t0 < 5  # said no before allocating, not after
    assert working_memory_bytes(26, 64, 2_000_000) > free_memory_bytes()
    assert working_memory_bytes(26, 64, 288) < 2**23  # the usual shapes need a few MB
