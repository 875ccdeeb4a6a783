"""Engine records: loads and placements through every file format, SGLang's loader contract, and
one-line errors on malformed files."""
import json

import numpy as np
import pytest
import torch

from ray_eplb.solver import rebalance_experts
from ray_eplb.solver.maps import logical_maps
from ray_eplb.topology import Placement, Topology
from ray_eplb.topology.records import (
    PLACEMENT_FORMATS,
    format_for,
    read_loads,
    read_phy2log,
    read_placement,
    select_window,
    write_loads,
    write_placement,
)

SUFFIX = {"ours": ".json", "sglang-json": ".json", "sglang-pt": ".pt", "triple": ".pt"}


def _counts(windows=3, layers=4, experts=8, seed=0) -> torch.Tensor:
    """Skewed integer token counts ``[T, L, E]`` (int32, as SGLang's recorder keeps them)."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(1.0, 6.0, experts)[torch.randperm(experts, generator=g)]
    return (torch.rand(windows, layers, experts, generator=g) * 100 * skew).round().to(torch.int32)


def _placement(layers=4, experts=8, slots=12, gpus=4, seed=0) -> Placement:
    topology = Topology.from_counts(slots, gpus, 1, experts, layers)
    phy2log, _, _ = rebalance_experts(_counts(1, layers, experts, seed)[0].double(), slots, 1, 1, gpus)
    return Placement.from_phy2log(topology, phy2log, epoch=3)


# ---- loads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4, 8), (4, 8)])
def test_sglang_stat_dump_is_read_as_windows(tmp_path, shape):
    counts = _counts(5, 4, 8)[0] if len(shape) == 2 else _counts(5, 4, 8)
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    # What SGLang's stat accumulator saves (rank 0): these three keys.
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path)
    loads = read_loads(path)
    assert loads.dtype == torch.float64
    assert loads.shape == (5, 4, 8) if len(shape) == 3 else loads.shape == (1, 4, 8)
    assert torch.equal(loads.reshape(shape), counts.double())


@pytest.mark.parametrize(("fmt", "suffix"), [("ours", ".json"), ("npz", ".npz"), ("sglang", ".pt")])
def test_loads_round_trip(tmp_path, fmt, suffix):
    counts = _counts().double()
    path = tmp_path / f"loads{suffix}"
    write_loads(path, counts, fmt, model="tiny", note="test")
    assert torch.equal(read_loads(path), counts)


def test_loads_json_keeps_fractions_and_a_single_window(tmp_path):
    load = torch.tensor([[0.5, 1.25, 0.0], [3.0, 0.0, 2.0]], dtype=torch.float64)  # [L, E]
    path = tmp_path / "loads.json"
    write_loads(path, load, "ours")
    doc = json.loads(path.read_text())
    assert doc["format"] == "ray-eplb-loads" and doc["version"] == 1
    assert torch.equal(read_loads(path), load[None])


def test_sglang_loads_written_are_integer_logical_count(tmp_path):
    path = tmp_path / "loads.pt"
    write_loads(path, torch.tensor([[[1.4, 2.6]]]), "sglang")
    data = torch.load(path, weights_only=True)
    assert set(data) == {"logical_count"}
    assert data["logical_count"].dtype == torch.int64
    assert data["logical_count"].tolist() == [[[1, 3]]]


def test_sglang_json_logical_count_is_read(tmp_path):
    path = tmp_path / "init.json"
    path.write_text(json.dumps({"logical_count": [[1, 2, 3], [4, 5, 6]]}))
    assert read_loads(path).tolist() == [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]


def test_select_window():
    loads = _counts(4, 2, 3).double()
    assert torch.equal(select_window(loads, "all"), loads.sum(0))
    assert torch.equal(select_window(loads, "last"), loads[3])
    assert torch.equal(select_window(loads, "2"), loads[2] + loads[3])
    for bad in ("0", "5", "first"):
        with pytest.raises(ValueError, match="window"):
            select_window(loads, bad)


# ---- placements -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PLACEMENT_FORMATS)
def test_placement_round_trip(tmp_path, fmt):
    placement = _placement()
    path = tmp_path / f"plan{SUFFIX[fmt]}"
    write_placement(path, placement, fmt)
    back = read_placement(path, placement.topology)
    assert torch.equal(back.phy2log, placement.phy2log)
    assert torch.equal(back.logcnt, placement.logcnt)
    assert back.epoch == (3 if fmt == "ours" else 0)  # only our format records the epoch


def test_our_placement_carries_its_topology(tmp_path):
    placement = _placement()
    write_placement(tmp_path / "p.json", placement, "ours")
    assert read_placement(tmp_path / "p.json") == placement  # no topology passed: the file's
    other = Topology.from_counts(12, 2, 1, 8, 4)
    with pytest.raises(ValueError, match="gpus_per_node"):
        read_placement(tmp_path / "p.json", other)


def test_engine_placements_need_a_topology(tmp_path):
    write_placement(tmp_path / "p.pt", _placement(), "sglang-pt")
    with pytest.raises(ValueError, match="no topology"):
        read_placement(tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        read_placement(tmp_path / "p.pt", Topology.from_counts(16, 4, 1, 8, 4))


def _sglang_init_expert_location(path, *, num_layers, num_logical_experts, ep_num_redundant_experts, ep_size):
    """SGLang's ``--init-expert-location`` loader as its source reads the file (expert_location.py):
    ``.pt`` by ``torch.load(weights_only=True)``, ``.json`` by ``json.loads``; a file with
    ``physical_to_logical_map`` goes to ``init_by_mapping(server_args, model_config, **data)``, which
    turns a list into ``torch.tensor`` and inverts it expert by expert."""
    data = torch.load(path, weights_only=True) if str(path).endswith(".pt") else json.loads(path.read_text())
    assert "physical_to_logical_map" in data

    def init_by_mapping(server_args, model_config, physical_to_logical_map):  # any other key: TypeError
        if not isinstance(physical_to_logical_map, torch.Tensor):
            physical_to_logical_map = torch.tensor(physical_to_logical_map)
        return physical_to_logical_map

    phy2log = init_by_mapping(None, None, **data)
    num_physical = num_logical_experts + ep_num_redundant_experts
    assert phy2log.dtype == torch.int64
    assert phy2log.shape == (num_layers, num_physical)
    assert num_physical % ep_size == 0
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < num_logical_experts
    for layer in range(num_layers):  # every logical expert needs a physical one to dispatch to
        replicas = [[] for _ in range(num_logical_experts)]
        for slot, expert in enumerate(phy2log[layer].tolist()):
            replicas[expert].append(slot)
        assert all(replicas)
    return phy2log


@pytest.mark.parametrize("fmt", ["sglang-json", "sglang-pt"])
def test_sglang_placement_meets_the_loader_contract(tmp_path, fmt):
    placement = _placement(layers=4, experts=8, slots=12, gpus=4)
    path = tmp_path / f"init{SUFFIX[fmt]}"
    write_placement(path, placement, fmt)
    data = torch.load(path, weights_only=True) if fmt == "sglang-pt" else json.loads(path.read_text())
    assert list(data) == ["physical_to_logical_map"]
    got = _sglang_init_expert_location(path, num_layers=4, num_logical_experts=8, ep_num_redundant_experts=4,
                                       ep_size=4)
    assert torch.equal(got, placement.phy2log)


def test_triple_holds_the_deepseek_tensors(tmp_path):
    placement = _placement(layers=3, experts=8, slots=16, gpus=4)
    write_placement(tmp_path / "t.pt", placement, "triple")
    data = torch.load(tmp_path / "t.pt", weights_only=True)
    assert set(data) == {"phy2log", "log2phy", "logcnt"}
    assert all(t.dtype == torch.int64 for t in data.values())
    assert data["phy2log"].shape == (3, 16)
    assert data["log2phy"].shape == (3, 8, 16 - 8 + 1)
    assert data["logcnt"].shape == (3, 8)
    log2phy, logcnt = logical_maps(data["phy2log"], 8)
    assert torch.equal(data["log2phy"], log2phy) and torch.equal(data["logcnt"], logcnt)
    assert int(data["logcnt"].sum()) == 3 * 16


def test_format_for_resolves_sglang_by_suffix():
    assert format_for("a.pt", "sglang") == "sglang-pt"
    assert format_for("a.json", "sglang") == "sglang-json"
    assert format_for("a.pt", "triple") == "triple"
    with pytest.raises(ValueError, match=r"\.json or \.pt"):
        format_for("a.txt", "sglang")


# ---- malformed files: one line naming the key or the shape ----------------------------------------


def _write(path, content):
    if path.suffix == ".pt":
        torch.save(content, path)
    elif path.suffix == ".npz":
        np.savez(path, **content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


BAD_LOADS = [
    ("d.pt", {"rank": 0}, "'logical_count' missing"),
    ("d.pt", {"records": [], "last_physical_to_logical_map": torch.zeros(1, 2)}, "per_token"),
    ("d.pt", {"physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)}, "placement, not loads"),
    ("d.pt", {"logical_count": torch.zeros(8)}, r"'logical_count' has shape \(8,\)"),
    ("d.pt", {"logical_count": torch.zeros(2, 0, 3)}, r"'logical_count' has shape \(2, 0, 3\)"),
    ("d.pt", {"logical_count": torch.ones(2, 3, dtype=torch.bool)}, "'logical_count' has dtype torch.bool"),
    ("d.pt", {"logical_count": -torch.ones(2, 3)}, "'logical_count' holds a negative load"),
    ("d.pt", [1, 2], "holds a list, expected a dict"),
    ("t.npz", {"weights": np.ones((2, 3))}, "'load' missing"),
    ("t.npz", {"load": np.full((1, 2, 3), np.nan)}, "'load' holds a NaN"),
    ("l.json", {"format": "ray-eplb-loads", "load": [[1, 2], [3]]}, "'load' is not a rectangular array"),
    ("l.json", {"format": "ray-eplb-loads", "load": [["a", "b"]]}, "'load' is not a rectangular array of numbers"),
    ("l.json", {"format": "something-else", "load": [[1]]}, "'format' is 'something-else'"),
    ("l.json", {"format": "ray-eplb-loads"}, "'load' missing"),
    ("l.json", "{not json", "not valid JSON"),
    ("l.json", [1, 2], "expected an object"),
    ("l.csv", "1,2", "unknown loads file type '.csv'"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_LOADS)
def test_malformed_loads_give_one_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message) as info:
        read_loads(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"logical_count": torch.ones(2, 2), "extra": object()}, path)  # needs full unpickling
    with pytest.raises(ValueError, match="weights_only=True") as info:
        read_loads(path)
    assert "\n" not in str(info.value)


BAD_PLACEMENTS = [
    ("p.pt", {"logical_count": torch.ones(2, 4)}, "these are loads, not a placement"),
    ("p.pt", {"physical_to_logical_map": torch.zeros(4, dtype=torch.int64)},
     r"'physical_to_logical_map' has shape \(4,\)"),
    ("p.pt", {"physical_to_logical_map": torch.zeros(2, 4)}, "'physical_to_logical_map' has dtype float32"),
    ("p.json", {"physical_to_logical_map": [[0, 1], [1, -1]]}, "'physical_to_logical_map' holds a negative"),
    ("p.json", {"physical_to_logical_map": [[0, 1], [1]]}, "'physical_to_logical_map' is not a rectangular"),
    ("p.pt", {"phy2log": torch.tensor([[0, 1, 0]]), "logcnt": torch.tensor([[2, 1]])}, "'log2phy' missing"),
    ("p.pt", {"phy2log": torch.tensor([[0, 1, 0]]), "log2phy": torch.tensor([[[0, 2], [1, -1]]]),
              "logcnt": torch.tensor([[1, 2]])}, "'logcnt' does not match phy2log"),
    ("p.pt", {"phy2log": torch.tensor([[0, 1, 0]]), "log2phy": torch.tensor([[[0, 1], [2, -1]]]),
              "logcnt": torch.tensor([[2, 1]])}, "'log2phy' does not invert phy2log"),
    ("p.json", {"format": "ray-eplb-placement", "phy2log": [[0, 1]]}, "'topology' missing"),
    ("p.json", {"format": "ray-eplb-placement", "phy2log": [[0, 1]], "topology": {"num_nodes": 1}},
     "key 'topology' is not a valid topology"),
    ("p.json", {"format": "ray-eplb-placement", "phy2log": [[0, 1]], "epoch": -1,
                "topology": {"num_nodes": 1, "gpus_per_node": 2, "slots_per_gpu": 1, "num_experts": 2,
                             "num_layers": 1}}, "'epoch' is -1"),
    ("p.txt", "x", "unknown placement file type '.txt'"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_PLACEMENTS)
def test_malformed_placements_give_one_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message) as info:
        read_phy2log(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_placement_that_leaves_an_expert_out_is_refused(tmp_path):
    topology = Topology.from_counts(4, 2, 1, 3, 1)
    path = _write(tmp_path / "p.json", {"physical_to_logical_map": [[0, 1, 0, 1]]})  # expert 2 has no slot
    with pytest.raises(ValueError, match="expert 2 of layer 0 has no slot") as info:
        read_placement(path, topology)
    assert "\n" not in str(info.value)
    path = _write(tmp_path / "q.json", {"physical_to_logical_map": [[0, 1, 2, 3]]})
    with pytest.raises(ValueError, match="holds expert 3, the topology has 3"):
        read_placement(path, topology)
