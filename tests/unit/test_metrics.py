"""The metrics (solver/metrics.py) and the logical maps (solver/maps.py), on hand-made cases."""
import pytest
import torch

from ray_eplb.solver import balancedness, balancedness_per_layer, duplicate_pairs, gpu_loads, logical_maps


def test_gpu_loads_and_balancedness_hand_computed():
    # 2 GPUs x 2 slots. Layer 0: expert 0 (load 6) on slots 0 and 2, expert 1 (4) on slot 1,
    # expert 2 (2) on slot 3: GPU 0 = 3 + 4 = 7, GPU 1 = 3 + 2 = 5 -> mean 6, max 7.
    # Layer 1: experts 0, 1, 2, 2 with loads 1, 1, 4: GPU 0 = 2, GPU 1 = 4 -> mean 3, max 4.
    phy2log = torch.tensor([[0, 1, 0, 2], [0, 1, 2, 2]])
    logcnt = torch.tensor([[2, 1, 1], [1, 1, 2]])
    load = torch.tensor([[6.0, 4.0, 2.0], [1.0, 1.0, 4.0]])
    assert gpu_loads(phy2log, logcnt, load, 2).tolist() == [[7.0, 5.0], [2.0, 4.0]]
    assert balancedness(phy2log, logcnt, load, 2) == pytest.approx((6 + 3) / (7 + 4))
    per_layer = balancedness_per_layer(phy2log, logcnt, load, 2)
    assert per_layer.dtype == torch.float64
    assert per_layer.tolist() == pytest.approx([6 / 7, 3 / 4])
    # One GPU: perfectly balanced by definition. No load at all: 1.0.
    assert balancedness(phy2log, logcnt, load, 1) == 1.0
    assert balancedness(phy2log, logcnt, torch.zeros(2, 3), 2) == 1.0
    assert balancedness_per_layer(phy2log, logcnt, torch.tensor([[0.0, 0, 0], [1, 1, 4]]), 2).tolist() == [1.0, 0.75]


def test_balancedness_is_sum_over_layers_not_mean_of_ratios():
    # Layer 0: GPU loads 1 / 0 (mean 0.5, max 1); layer 1: 10 / 10: (0.5 + 10) / (1 + 10), not the
    # mean of the per-layer ratios (0.75).
    phy2log = torch.tensor([[0, 1], [0, 1]])
    logcnt = torch.ones(2, 2, dtype=torch.int64)
    load = torch.tensor([[1.0, 0.0], [10.0, 10.0]])
    assert balancedness(phy2log, logcnt, load, 2) == pytest.approx(10.5 / 11)
    assert balancedness_per_layer(phy2log, logcnt, load, 2).tolist() == pytest.approx([0.5, 1.0])


def test_metrics_reject_bad_shapes():
    phy2log = torch.tensor([[0, 1, 0, 2]])
    with pytest.raises(ValueError, match="num_gpus=3"):
        gpu_loads(phy2log, torch.tensor([[2, 1, 1]]), torch.ones(1, 3), 3)
    with pytest.raises(ValueError, match="shapes"):
        gpu_loads(phy2log, torch.tensor([[2, 1, 1]]), torch.ones(1, 4), 2)


def test_duplicate_pairs_hand_made():
    # GPU 0 = [0, 0, 1], GPU 1 = [2, 2, 2]; layer 1: no duplicates.
    phy2log = torch.tensor([[0, 0, 1, 2, 2, 2], [0, 1, 2, 3, 0, 1]])
    assert duplicate_pairs(phy2log, 2) == 1 + 2
    assert duplicate_pairs(phy2log[1:], 2) == 0
    assert duplicate_pairs(phy2log, 1) == 2 + 1 + 2  # one GPU: every repeat counts
    assert duplicate_pairs(phy2log, 6) == 0


def test_logical_maps_hand_made_and_errors():
    log2phy, logcnt = logical_maps(torch.tensor([[2, 0, 2, 1, 2]]), 3)
    assert logcnt.tolist() == [[1, 1, 3]]
    assert log2phy.tolist() == [[[1, -1, -1], [3, -1, -1], [0, 2, 4]]]
    with pytest.raises(ValueError, match="outside"):
        logical_maps(torch.tensor([[0, 3]]), 2)
    with pytest.raises(ValueError, match="fewer"):
        logical_maps(torch.tensor([[0, 1]]), 3)
    with pytest.raises(ValueError, match="2-D"):
        logical_maps(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="replicas"):
        logical_maps(torch.tensor([[0, 0, 0]]), 2)  # expert 1 has no slot, expert 0 one too many


def test_balancedness_of_nan_inf_or_negative_load_raises():
    from ray_eplb.solver import balancedness

    phy2log = torch.tensor([[0, 1, 2, 3]])
    logcnt = torch.ones(1, 4, dtype=torch.int64)
    for bad in (float("nan"), float("inf"), -1.0):
        load = torch.tensor([[1.0, bad, 1.0, 1.0]])
        with pytest.raises(ValueError, match=r"load\[0, 1\]"):
            balancedness(phy2log, logcnt, load, 2)
    with pytest.raises(ValueError, match="4 such entries"):
        balancedness(phy2log, logcnt, torch.full((1, 4), float("nan")), 2)
    assert balancedness(phy2log, logcnt, torch.zeros(1, 4), 2) == 1.0


def test_avoidable_duplicates_leave_out_what_the_counts_force():
    from ray_eplb.solver.metrics import avoidable_duplicates, unavoidable_duplicates

    # 2 GPUs x 3 slots; expert 0 has 3 replicas (one must double up), expert 1 two on GPU 0 (avoidable)
    phy2log = torch.tensor([[0, 1, 1, 0, 0, 2]])
    logcnt = torch.tensor([[3, 2, 1]])
    assert duplicate_pairs(phy2log, 2) == 2
    assert unavoidable_duplicates(phy2log, logcnt, 2) == 1
    assert avoidable_duplicates(phy2log, logcnt, 2) == 1
    assert avoidable_duplicates(torch.tensor([[0, 1, 0, 0, 1, 2]]), logcnt, 2) == 0
