"""The width of ``log2phy``: ``rebalance_experts(..., log2phy_width=...)`` and ``logical_maps(..., width=...)``;
and the plan alone, ``place_experts``.

Expected maps are built here from ``phy2log`` with numpy loops, not with the solver's helpers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_eplb.controller.bench.workload import synthetic_trace
from ray_eplb.solver import compiled, logical_maps, place_experts, rebalance_experts
from ray_eplb.solver.maps import logical_maps_np
from ray_eplb.solver.rebalance import working_memory_bytes
from ray_eplb.solver.vllm_policy import RayEplbPolicy

SHAPES = [(72, 8, 2, 8), (136, 1, 1, 8), (256, 4, 2, 16), (64, 8, 4, 64)]  # (R, groups, nodes, GPUs), E = 64


def _load(num_layers: int, num_experts: int, seed: int) -> torch.Tensor:
    return synthetic_trace(2, num_layers, num_experts, top_k=4, skew=1.2, seed=seed).load[-1]  # [L, E]


def _expected_maps(p: np.ndarray, num_experts: int, width: int) -> np.ndarray:
    """``log2phy [L, E, width]`` of ``p [L, R]`` by loops: each expert's slots ascending, ``-1`` after."""
    out = np.full((p.shape[0], num_experts, width), -1)
    for layer in range(p.shape[0]):
        for e in range(num_experts):
            slots = np.nonzero(p[layer] == e)[0]
            out[layer, e, : slots.size] = slots
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", ["auto", "global"])
def test_used_width_is_the_most_replicas_and_the_full_map_cut_there(shape, policy):
    weight = _load(5, 64, seed=shape[0])
    full = rebalance_experts(weight, *shape, policy=policy)
    used = rebalance_experts(weight, *shape, policy=policy, log2phy_width="used")
    assert torch.equal(full[0], used[0]) and torch.equal(full[2], used[2])  # the plan does not depend on it
    p = used[0].numpy()
    most = max(np.bincount(row, minlength=64).max() for row in p)
    assert tuple(used[1].shape) == (5, 64, most) and used[1].dtype == torch.int64
    assert tuple(full[1].shape) == (5, 64, shape[0] - 64 + 1)
    np.testing.assert_array_equal(used[1].numpy(), _expected_maps(p, 64, most))
    assert torch.equal(full[1][..., :most], used[1])
    assert bool((full[1][..., most:] == -1).all())
    wider = rebalance_experts(weight, *shape, policy=policy, log2phy_width=np.int64(most + 3))[1]
    assert tuple(wider.shape) == (5, 64, most + 3)
    assert torch.equal(wider[..., :most], used[1]) and bool((wider[..., most:] == -1).all())


def test_used_width_with_a_migration_aware_call_and_with_no_layers():
    w0, w1 = _load(4, 64, seed=1), _load(4, 64, seed=2)
    old = rebalance_experts(w0, 96, 8, 2, 16)[0]
    full = rebalance_experts(w1, 96, 8, 2, 16, old_phy2log=old, max_moves=0.25)
    used = rebalance_experts(w1, 96, 8, 2, 16, old_phy2log=old, max_moves=0.25, log2phy_width="used")
    assert torch.equal(full[0], used[0])
    most = int(full[2].max())
    assert used[1].shape[2] == most and torch.equal(full[1][..., :most], used[1])
    empty = rebalance_experts(torch.zeros(0, 8), 16, 1, 1, 2, log2phy_width="used")
    assert tuple(empty[1].shape) == (0, 8, 1)  # at least one column, like the full width's floor


def test_a_width_below_the_most_replicas_names_both_numbers():
    weight = _load(3, 64, seed=5)
    most = int(rebalance_experts(weight, 128, 8, 2, 16)[2].max())
    assert most >= 2
    with pytest.raises(ValueError, match=rf"width={most - 1} is less than {most}, the replicas of expert"):
        rebalance_experts(weight, 128, 8, 2, 16, log2phy_width=most - 1)
    p = torch.tensor([[2, 0, 2, 1, 2]])  # expert 2 has three slots
    with pytest.raises(ValueError, match=r"width=2 is less than 3, the replicas of expert 2 in layer 0"):
        logical_maps(p, 3, width=2)
    assert logical_maps(p, 3, width=3)[0].tolist() == [[[1, -1, -1], [3, -1, -1], [0, 2, 4]]]
    assert logical_maps(p, 3, width="used")[0].shape == (1, 3, 3)


@pytest.mark.parametrize("bad", ["wide", "Full", 0, -2, True, 2.0, None])
def test_a_bad_width_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=rf"log2phy_width={bad!r}".replace("(", r"\(").replace(".", r"\.")):
        rebalance_experts(torch.ones(2, 8), 8, 1, 1, 2, log2phy_width=bad)
    if bad is not None:  # logical_maps' default
        with pytest.raises(ValueError, match=rf"width={bad!r}".replace(".", r"\.")):
            logical_maps(torch.tensor([[0, 1]]), 2, width=bad)


@pytest.mark.skipif(not compiled.ENABLED, reason="numba is not installed (the numpy code runs)")
def test_compiled_and_numpy_maps_agree_at_every_width(monkeypatch):
    rng = np.random.default_rng(11)
    for _ in range(20):
        e, extra = int(rng.integers(1, 20)), int(rng.integers(0, 9))
        p = np.stack([rng.permutation(np.r_[np.arange(e), rng.integers(0, e, extra)])
                      for _ in range(int(rng.integers(1, 4)))])
        most = max(np.bincount(row).max() for row in p)
        for width in (None, "full", "used", most, most + 2):
            out = []
            for enabled in (True, False):
                monkeypatch.setattr(compiled, "ENABLED", enabled)
                out.append(logical_maps_np(p, e, width))
            (a, ca), (b, cb) = out
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ca, cb)
            m = {None: p.shape[1] - e + 1, "full": p.shape[1] - e + 1, "used": most}.get(width, width)
            np.testing.assert_array_equal(a, _expected_maps(p, e, m))


@pytest.mark.parametrize("enabled", [True, False] if compiled.ENABLED else [False])
@pytest.mark.parametrize("bad", [-1, 3])
def test_maps_refuse_an_expert_id_out_of_range_compiled_or_not(monkeypatch, enabled, bad):
    """Neither fill checks its indices: the count before it must refuse the id, on both paths."""
    monkeypatch.setattr(compiled, "ENABLED", enabled)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        logical_maps_np(np.array([[0, 1, 2, bad]]), 3, "used")


def test_vllm_policy_returns_the_plan_of_the_default_call():
    w0, w1 = _load(3, 64, seed=8), _load(3, 64, seed=9)
    fresh = RayEplbPolicy.rebalance_experts(w0, 96, 8, 2, 16)
    assert torch.equal(fresh, rebalance_experts(w0, 96, 8, 2, 16)[0])
    aware = RayEplbPolicy.rebalance_experts(w1, 96, 8, 2, 16, fresh)
    assert torch.equal(aware, rebalance_experts(w1, 96, 8, 2, 16, old_phy2log=fresh)[0])


def test_the_working_memory_check_counts_the_width_asked_for():
    assert working_memory_bytes(58, 256, 2048, 1) < working_memory_bytes(58, 256, 2048) / 10
    assert working_memory_bytes(58, 256, 2048, 1793) == working_memory_bytes(58, 256, 2048)
    with pytest.raises(ValueError, match=r"log2phy \[L, E, 10000000\] alone is"):
        rebalance_experts(torch.rand(26, 64), 128, 8, 4, 32, log2phy_width=10_000_000)


@pytest.mark.parametrize("shape", SHAPES)
def test_place_experts_is_the_plan_of_rebalance_experts(shape):
    w0, w1 = _load(4, 64, seed=12), _load(4, 64, seed=13)
    fresh = place_experts(w0, *shape)
    assert fresh.dtype == torch.int64 and tuple(fresh.shape) == (4, shape[0])
    assert torch.equal(fresh, rebalance_experts(w0, *shape)[0])
    for kwargs in ({}, {"max_moves": 0.25}, {"max_moves": 3, "min_gain": 0.01}, {"policy": "global"}):
        got = place_experts(w1, *shape, old_phy2log=fresh, **kwargs)
        assert torch.equal(got, rebalance_experts(w1, *shape, old_phy2log=fresh, **kwargs)[0]), kwargs


def test_place_experts_checks_its_arguments_as_rebalance_experts_does():
    with pytest.raises(ValueError, match=r"num_replicas=6 is smaller than the number of experts 8"):
        place_experts(torch.ones(2, 8), 6, 1, 1, 2)
    with pytest.raises(ValueError, match=r"num_replicas=9 is not divisible by num_gpus=2"):
        place_experts(torch.ones(2, 8), 9, 1, 1, 2)
    with pytest.raises(ValueError, match=r"policy='best' is not one of"):
        place_experts(torch.ones(2, 8), 8, 1, 1, 2, policy="best")
    with pytest.raises(TypeError):  # no log2phy, so no width to choose
        place_experts(torch.ones(2, 8), 8, 1, 1, 2, log2phy_width="used")
    # Its working memory has no log2phy: 58 x 256 experts on 2**18 slots need about 1.8 GiB, not 29 GiB.
    assert working_memory_bytes(58, 256, 2**18, 0) < 2 * 2**30 < 29 * 2**30 < working_memory_bytes(58, 256, 2**18)
