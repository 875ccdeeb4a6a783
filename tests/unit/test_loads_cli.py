"""``ray-eplb loads`` without a cluster: the format a file gets, and the controller's record written
in each format and read back by the records readers; a record that does not fit names the problem."""
import pytest
import torch

from ray_eplb.controller.cli.loads import export, resolve_format
from ray_eplb.topology import Placement, Topology
from ray_eplb.topology.records import read_loads, read_placement

TOPO = Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=3, num_experts=4, num_layers=2)


def record(window):
    p = Placement.identity(TOPO, epoch=7)
    w = torch.as_tensor(window, dtype=torch.float64)
    return {"window": w.tolist(), "total": (w.sum(0) if w.numel() else torch.zeros(2, 4)).tolist(), "rounds": 9,
            "epoch": p.epoch, "phy2log": p.phy2log.tolist(), "topology": TOPO.model_dump()}


@pytest.mark.parametrize("name,placement,fmt,want", [
    ("a.json", False, None, "ours"), ("a.npz", False, None, "npz"), ("a.pt", False, None, "sglang"),
    ("a.json", True, None, "ours"), ("a.pt", True, None, "sglang-pt"), ("a.json", True, "sglang", "sglang-json"),
    ("a.pt", True, "triple", "triple"),
])
def test_format_follows_the_flag_or_the_suffix(name, placement, fmt, want):
    assert resolve_format(name, fmt, placement) == want


@pytest.mark.parametrize("name,placement,fmt,words", [
    ("a.txt", False, None, "give --format"), ("a.npz", True, None, "give --format"),
    ("a.pt", False, "triple", "does not write loads"), ("a.json", True, "npz", "does not write a placement"),
])
def test_bad_format_is_named(name, placement, fmt, words):
    with pytest.raises(ValueError, match=words):
        resolve_format(name, fmt, placement)


def test_window_and_total_round_trip_in_every_format(tmp_path):
    rounds = torch.arange(2 * 2 * 4, dtype=torch.float64).reshape(2, 2, 4)  # [T, L, E]
    for fmt, suffix in (("ours", "json"), ("npz", "npz"), ("sglang", "pt")):
        path = tmp_path / f"w.{suffix}"
        assert "2 window(s)" in export(record(rounds), str(path), fmt, placement=False, total=False)
        assert torch.equal(read_loads(path), rounds)
        export(record(rounds), str(path), fmt, placement=False, total=True)
        assert torch.equal(read_loads(path), rounds.sum(0, keepdim=True))


def test_placement_round_trips_with_its_epoch(tmp_path):
    path = tmp_path / "p.json"
    export(record([[[1, 0, 0, 0], [0, 1, 0, 0]]]), str(path), "ours", placement=False, total=False)
    export(record([[[1, 0, 0, 0], [0, 1, 0, 0]]]), str(path), "ours", placement=True, total=False)
    got = read_placement(path)
    assert got.epoch == 7 and torch.equal(got.phy2log, Placement.identity(TOPO).phy2log)


def test_a_record_that_does_not_fit_is_refused_with_its_shape(tmp_path):
    bad = record(torch.ones(2, 2, 4))
    bad["window"] = torch.ones(2, 3, 4).tolist()
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\), expected \[T, 2, 4\]"):
        export(bad, str(tmp_path / "x.json"), "ours", placement=False, total=False)
    with pytest.raises(ValueError, match="recorded no round yet"):
        export(record(torch.zeros(0, 2, 4)), str(tmp_path / "x.json"), "ours", placement=False, total=False)
    with pytest.raises(ValueError, match="no token yet"):
        export(record(torch.zeros(1, 2, 4)), str(tmp_path / "x.json"), "ours", placement=False, total=False)
    idle = record(torch.zeros(3, 2, 4))
    idle["total"] = torch.ones(2, 4).tolist()  # tokens long ago, none in the window
    with pytest.raises(ValueError, match="window's 3 rounds saw no token .* --total"):
        export(idle, str(tmp_path / "x.json"), "ours", placement=False, total=False)
    assert "8 routed tokens" in export(idle, str(tmp_path / "x.json"), "ours", placement=False, total=True)
    missing = record(torch.ones(1, 2, 4))
    del missing["phy2log"]
    with pytest.raises(ValueError, match="no 'phy2log'"):
        export(missing, str(tmp_path / "x.json"), "ours", placement=True, total=False)


def test_model_rows_are_its_decoder_layers_as_sglang_counts_them(tmp_path):
    from ray_eplb.actors.hf_checkpoint import MoeSpec

    spec = MoeSpec(model_type="qwen3_moe", num_hidden_layers=3, moe_layers=(1, 2), num_experts=4, top_k=2,
                   hidden_size=8, ffn_size=4)  # decoder layer 0 dense
    rounds = torch.arange(1, 1 + 2 * 2 * 4, dtype=torch.float64).reshape(2, 2, 4)  # [T, L, E]
    export(record(rounds), str(tmp_path / "l.pt"), "sglang", placement=False, total=False, spec=spec)
    got = torch.load(tmp_path / "l.pt", weights_only=True)["logical_count"]
    assert got.shape == (2, 3, 4) and not got[:, 0].any() and torch.equal(got[:, 1:], rounds.long())
    p = record(rounds)
    p["phy2log"] = torch.tensor([[3, 2, 1, 0, 0, 1], [0, 1, 2, 3, 3, 3]]).tolist()
    export(p, str(tmp_path / "p.pt"), "sglang-pt", placement=True, total=False, spec=spec)
    m = torch.load(tmp_path / "p.pt", weights_only=True)["physical_to_logical_map"]
    assert m.tolist() == [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 1], [0, 1, 2, 3, 3, 3]]
    with pytest.raises(ValueError, match="format 'ours' keeps"):
        export(p, str(tmp_path / "p.json"), "ours", placement=True, total=False, spec=spec)
    with pytest.raises(ValueError, match="--model has 2 MoE layers x 8 experts, the balancer 2 x 4"):
        export(p, str(tmp_path / "p.pt"), "sglang-pt", placement=True, total=False,
               spec=spec.model_copy(update={"num_experts": 8}))
