"""RayEplbPolicy against vLLM's EPLB policy contract, without vLLM: the signature vLLM calls, a CPU
``physical_to_logical_map [L, R]`` back, every slot a valid expert, every expert placed."""
import inspect

import pytest
import torch

from ray_eplb.solver import balancedness, logical_maps
from ray_eplb.solver.vllm_policy import RayEplbPolicy

# vLLM's abstract policy: rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
# old_global_expert_indices=None) -> physical_to_logical_map.
CONTRACT = ["weight", "num_replicas", "num_groups", "num_nodes", "num_ranks", "old_global_expert_indices"]


def _skewed(layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(layers, experts, generator=g) ** 3 * 1000).round()  # [L, E] token counts


def _check_map(phy2log: torch.Tensor, layers: int, replicas: int, experts: int) -> None:
    assert phy2log.device == torch.device("cpu")  # vLLM asserts the device
    assert phy2log.dtype == torch.int64
    assert phy2log.shape == (layers, replicas)
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < experts
    counts = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert bool((counts >= 1).all())


def test_signature_is_vllms():
    params = list(inspect.signature(RayEplbPolicy.rebalance_experts).parameters)
    assert params == CONTRACT
    assert inspect.signature(RayEplbPolicy.rebalance_experts).parameters["old_global_expert_indices"].default is None


@pytest.mark.parametrize(("layers", "experts", "replicas", "groups", "nodes", "ranks"), [
    (3, 16, 16, 0, 1, 4),    # no redundant slots, no expert groups (vLLM passes 0)
    (4, 16, 24, 1, 1, 8),
    (2, 64, 72, 8, 2, 8),    # DeepSeek-style groups over two nodes
    (2, 12, 16, 5, 1, 4),    # groups that do not divide the experts
])
def test_fresh_plan_meets_the_contract(layers, experts, replicas, groups, nodes, ranks):
    weight = _skewed(layers, experts, seed=layers + experts)
    phy2log = RayEplbPolicy.rebalance_experts(weight, replicas, groups, nodes, ranks)
    _check_map(phy2log, layers, replicas, experts)
    _, logcnt = logical_maps(phy2log, experts)
    row = torch.arange(replicas) % experts
    rr = row.expand(layers, -1).contiguous()
    _, rr_cnt = logical_maps(rr, experts)
    assert balancedness(phy2log, logcnt, weight, ranks) > balancedness(rr, rr_cnt, weight, ranks)


def test_integer_loads_and_a_load_window_are_accepted():
    weight = _skewed(3, 16, seed=2)
    flat = RayEplbPolicy.rebalance_experts(weight.to(torch.int64), 24, 1, 1, 8)
    _check_map(flat, 3, 24, 16)
    window = torch.stack([weight * 0.25, weight * 0.75])  # [W, L, E]: the same total
    assert torch.equal(RayEplbPolicy.rebalance_experts(window, 24, 1, 1, 8), flat)


def test_migration_aware_keeps_more_slots_than_fresh():
    old_load, new_load = _skewed(4, 32, seed=3), _skewed(4, 32, seed=4)
    old = RayEplbPolicy.rebalance_experts(old_load, 40, 1, 1, 8)
    fresh = RayEplbPolicy.rebalance_experts(new_load, 40, 1, 1, 8)
    aware = RayEplbPolicy.rebalance_experts(new_load, 40, 1, 1, 8, old)
    _check_map(aware, 4, 40, 32)
    kept_aware, kept_fresh = int((aware == old).sum()), int((fresh == old).sum())
    assert kept_aware > kept_fresh
    _, cnt_aware = logical_maps(aware, 32)
    _, cnt_old = logical_maps(old, 32)
    assert balancedness(aware, cnt_aware, new_load, 8) > balancedness(old, cnt_old, new_load, 8)


def test_configured_move_budget_is_respected():
    old = RayEplbPolicy.rebalance_experts(_skewed(3, 32, seed=5), 40, 1, 1, 8)
    capped = RayEplbPolicy.configured(max_moves=4)
    assert capped.max_moves == 4 and RayEplbPolicy.max_moves is None  # the base class is unchanged
    new = capped.rebalance_experts(_skewed(3, 32, seed=6), 40, 1, 1, 8, old)
    _check_map(new, 3, 40, 32)
    moved = (new != old).sum(1)
    assert int(moved.max()) <= 4 and int(moved.sum()) > 0
    with pytest.raises(ValueError, match="unknown setting"):
        RayEplbPolicy.configured(budget=3)
    with pytest.raises(ValueError, match="policy='best'"):
        RayEplbPolicy.configured(policy="best")


@pytest.mark.parametrize("old", [
    torch.zeros(3, 32, dtype=torch.int64),           # another slot count (the EP size changed)
    torch.zeros(3, 40, dtype=torch.int64),           # every slot on expert 0: others unplaced
    torch.full((3, 40), -1, dtype=torch.int64),      # not a map
    (torch.arange(40) % 32).float().expand(3, -1),   # floats
])
def test_an_unusable_old_map_gives_the_fresh_plan(old):
    weight = _skewed(3, 32, seed=7)
    assert torch.equal(RayEplbPolicy.rebalance_experts(weight, 40, 1, 1, 8, old),
                       RayEplbPolicy.rebalance_experts(weight, 40, 1, 1, 8))


def test_bad_arguments_raise_valueerror():
    with pytest.raises(ValueError, match="num_replicas=8 is smaller"):
        RayEplbPolicy.rebalance_experts(_skewed(2, 16, seed=8), 8, 1, 1, 4)
    with pytest.raises(ValueError, match=r"weight has shape \(16,\)"):
        RayEplbPolicy.rebalance_experts(torch.ones(16), 16, 1, 1, 4)
