"""Migration-aware placement: bad input gets a ValueError that names the bad value."""
import numpy as np
import pytest
import torch

from ray_eplb.solver import rebalance_experts
from ray_eplb.solver.migration import check_old

W = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
OLD = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]])


@pytest.mark.parametrize("old,msg", [
    (OLD[:1], r"shape \(1, 6\), expected \(2, 6\)"), (OLD[:, :4], r"shape \(2, 4\)"), (OLD[0], r"shape \(6,\)"),
    (OLD - 1, r"expert ids in \[0, 4\).*-1"), (OLD + 1, r"\[0, 4\).*4\]"), (OLD.double(), "float64"),
    (torch.tensor([[0, 1, 2, 0, 1, 2], [3, 2, 1, 0, 3, 2]]), "expert 3 of layer 0 no slot"),
    (torch.tensor([[0, 1, 2, 3, 0, 1], [3, 3, 3, 0, 1, 1]]), "expert 2 of layer 1 no slot"),
])
@pytest.mark.parametrize("policy", ["auto", "global", "hierarchical"])
def test_bad_old_phy2log(old, msg, policy):
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(W, 6, 2, 1, 2, policy=policy, old_phy2log=old)


def test_check_old_accepts_numpy_and_lists():
    assert check_old(OLD.numpy().astype(np.int16), 2, 6, 4).dtype == np.int64
    assert check_old(OLD.tolist(), 2, 6, 4).shape == (2, 6)
    arr, cnt = check_old(OLD, 2, 6, 4, counts=True)  # the counts its check made, for the planner
    assert cnt.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]] and arr.tolist() == OLD.tolist()


@pytest.mark.parametrize("max_moves,msg", [
    (-1, "max_moves=-1 must be >= 0"), (0.0, r"fraction in \(0, 1\]"), (1.5, r"fraction in \(0, 1\]"),
    (-0.5, r"fraction"), (float("nan"), "fraction"), ("3", "max_moves='3'"), (True, "max_moves=True"),
    ([2], r"max_moves=\[2\]"),
])
def test_bad_max_moves(max_moves, msg):
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(W, 6, 2, 1, 2, old_phy2log=OLD, max_moves=max_moves)


def test_bad_budget_scope_and_min_gain():
    with pytest.raises(ValueError, match="budget_scope='layers'"):
        rebalance_experts(W, 6, 2, 1, 2, old_phy2log=OLD, budget_scope="layers")
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=f"min_gain={bad!r}"):
            rebalance_experts(W, 6, 2, 1, 2, old_phy2log=OLD, min_gain=bad)


def test_max_moves_with_hierarchical_is_refused():
    with pytest.raises(ValueError, match="max_moves needs policy 'global' or 'auto'"):
        rebalance_experts(W, 6, 2, 1, 2, policy="hierarchical", old_phy2log=OLD, max_moves=2)


@pytest.mark.parametrize("kwargs", [{"max_moves": 2}, {"max_moves": 0.5}, {"min_gain": 0.1}])
def test_budget_or_hysteresis_without_old_is_refused(kwargs):
    with pytest.raises(ValueError, match="need old_phy2log"):
        rebalance_experts(W, 6, 2, 1, 2, **kwargs)
