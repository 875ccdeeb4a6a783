"""``ray-eplb plan`` end to end: a SGLang-style dump in, a placement file and a report out."""
import json
import re

import pytest
import torch

from ray_eplb.controller.bench.workload import default_traces_dir
from ray_eplb.controller.cli.plan import main
from ray_eplb.solver import balancedness_per_layer
from ray_eplb.topology import Placement, Topology
from ray_eplb.topology.records import read_placement, write_placement

LAYERS, EXPERTS, SLOTS, GPUS = 4, 16, 24, 8
ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$")


@pytest.fixture
def dump(tmp_path):
    """A SGLang stat-mode recorder dump: 6 forward passes, layer 0 dense (all zero), skewed MoE layers."""
    g = torch.Generator().manual_seed(1)
    hot = torch.rand(LAYERS, EXPERTS, generator=g) ** 4 * 50 + 1  # [L, E] a few hot experts per layer
    counts = torch.poisson(hot.expand(6, -1, -1) * 20, generator=g).to(torch.int32)  # [T, L, E]
    counts[:, 0] = 0
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path)
    return path, counts.double()


def _rows(out: str) -> list[tuple[int, float, float, int]]:
    return [(int(m[1]), float(m[2]), float(m[3]), int(m[4])) for m in map(ROW.match, out.splitlines()) if m]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_from_a_sglang_dump_to_a_sglang_file(tmp_path, capsys, dump):
    path, counts = dump
    out_file = tmp_path / "init.json"
    rc, out, err = _run(capsys, path, "--replicas", SLOTS, "--gpus", GPUS, "-o", out_file, "--format", "sglang")
    assert rc == 0, err
    data = json.loads(out_file.read_text())
    assert list(data) == ["physical_to_logical_map"]  # SGLang passes every key on as an argument
    phy2log = torch.tensor(data["physical_to_logical_map"])
    assert phy2log.shape == (LAYERS, SLOTS) and phy2log.dtype == torch.int64
    topology = Topology.from_counts(SLOTS, GPUS, 1, EXPERTS, LAYERS)
    after = Placement.from_phy2log(topology, phy2log)  # every expert has a slot
    before = Placement.identity(topology)
    weight = counts.sum(0)
    rows = _rows(out)
    assert [r[0] for r in rows] == list(range(LAYERS))
    want_before = balancedness_per_layer(before.phy2log, before.logcnt, weight, GPUS)
    want_after = balancedness_per_layer(after.phy2log, after.logcnt, weight, GPUS)
    moved = (after.phy2log != before.phy2log).sum(1)
    for layer, b, a, m in rows:
        assert b == pytest.approx(float(want_before[layer]), abs=5e-4)
        assert a == pytest.approx(float(want_after[layer]), abs=5e-4)
        assert m == int(moved[layer])
    assert rows[0][1] == rows[0][2] == 1.0  # the dense layer carries no load
    assert all(a > b for _, b, a, _ in rows[1:])  # the plan beats round-robin on every loaded layer
    assert f"slots moved: {int(moved.sum())} of {LAYERS * SLOTS}" in out
    assert re.search(r"duplicate replicas on one GPU: \d+ \(avoidable: 0\)", out)


def test_every_format_holds_the_same_plan(tmp_path, capsys, dump):
    path, _ = dump
    topology = Topology.from_counts(SLOTS, GPUS, 1, EXPERTS, LAYERS)
    plans = []
    for fmt, suffix in [("ours", ".json"), ("sglang-json", ".json"), ("sglang-pt", ".pt"), ("triple", ".pt")]:
        target = tmp_path / f"{fmt}{suffix}"
        rc, _, err = _run(capsys, path, "--replicas", SLOTS, "--gpus", GPUS, "-o", target, "--format", fmt)
        assert rc == 0, err
        plans.append(read_placement(target, topology))
    assert all(p.phy2log.equal(plans[0].phy2log) for p in plans[1:])


def test_old_plan_and_move_budget(tmp_path, capsys, dump):
    path, counts = dump
    topology = Topology.from_counts(SLOTS, GPUS, 2, EXPERTS, LAYERS, num_groups=4)
    old = Placement.identity(topology, epoch=5)
    write_placement(tmp_path / "old.json", old, "ours")
    target = tmp_path / "new.json"
    rc, out, err = _run(capsys, path, "--replicas", SLOTS, "--gpus", GPUS, "--nodes", 2, "--groups", 4,
                        "--old", tmp_path / "old.json", "--max-moves", 3, "-o", target, "--window", "last")
    assert rc == 0, err
    new = read_placement(target)
    assert new.topology == topology and new.epoch == 6
    moved = (new.phy2log != old.phy2log).sum(1)
    assert int(moved.max()) <= 3
    assert int(moved.sum()) > 0
    rows = _rows(out)
    assert [r[3] for r in rows] == moved.tolist()
    weight = counts[-1]
    want = balancedness_per_layer(new.phy2log, new.logcnt, weight, GPUS)
    assert [r[2] for r in rows] == pytest.approx(want.tolist(), abs=5e-4)


def test_plot_writes_a_png(tmp_path, capsys, dump):
    path, _ = dump
    png = tmp_path / "plan.png"
    rc, _, err = _run(capsys, path, "--replicas", SLOTS, "--gpus", GPUS, "-o", tmp_path / "p.json", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


BAD = [
    (["--replicas", 20, "--gpus", 8], "--replicas=20 is not a multiple of --gpus=8"),
    (["--replicas", 8, "--gpus", 8], "--replicas=8 is smaller than the 16 experts"),
    (["--replicas", 24, "--gpus", 8, "--nodes", 3], "--gpus=8 is not a multiple of --nodes=3"),
    (["--replicas", 24, "--gpus", 8, "--max-moves", 2], "--max-moves needs --old"),
    (["--replicas", 24, "--gpus", 8, "--window", "9"], "window=9 must be between 1 and the 6 windows"),
    (["--replicas", 24, "--gpus", 8, "--old", "missing.json"], "missing.json: No such file"),
    (["--replicas", 24, "--gpus", 8, "--format", "sglang", "-o", "x.txt"], r"needs an output ending in \.json or \.pt"),
    (["--gpus", 8], "the following arguments are required: --replicas"),
    (["--replicas", 24, "--gpus", 8, "--max-moves", "lots"], "neither a slot count nor a fraction"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, dump, args, message):
    monkeypatch.chdir(tmp_path)
    argv = [dump[0], *args] + ([] if "-o" in args else ["-o", "out.json"])
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("ray-eplb plan: error:") and re.search(message, last)
    assert "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


def test_old_plan_of_another_shape_is_refused(tmp_path, capsys, dump):
    write_placement(tmp_path / "old.pt", Placement.identity(Topology.from_counts(32, 8, 1, EXPERTS, LAYERS)),
                    "sglang-pt")
    rc, _, err = _run(capsys, dump[0], "--replicas", SLOTS, "--gpus", GPUS, "--old", tmp_path / "old.pt",
                      "-o", tmp_path / "o.json")
    assert rc == 2
    assert "old.pt: phy2log has shape (4, 32), the loads and --replicas need (4, 24)" in err
    assert len(err.strip().splitlines()) == 1


def test_loads_that_are_not_loads(tmp_path, capsys):
    bad = tmp_path / "init.pt"
    torch.save({"physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)}, bad)
    rc, _, err = _run(capsys, bad, "--replicas", 8, "--gpus", 4, "-o", tmp_path / "o.json")
    assert rc == 2 and "key 'logical_count' missing (this is a placement, not loads)" in err
    assert len(err.strip().splitlines()) == 1


def test_real_trace(tmp_path, capsys):
    traces = default_traces_dir()
    if traces is None or not (traces / "dsv2lite_puffin.npz").is_file():
        pytest.skip("../shared/traces/dsv2lite_puffin.npz is not here")
    target = tmp_path / "plan.pt"
    rc, out, err = _run(capsys, traces / "dsv2lite_puffin.npz", "--replicas", 72, "--gpus", 8, "--nodes", 2,
                        "--groups", 8, "-o", target, "--format", "sglang", "--window", "last")
    assert rc == 0, err
    phy2log = torch.load(target, weights_only=True)["physical_to_logical_map"]
    assert phy2log.shape == (26, 72)  # DeepSeek-V2-Lite: 26 MoE layers x 64 experts, 8 redundant
    match = re.search(r"balancedness \(mean GPU load / max, all layers\): ([\d.]+) -> ([\d.]+)", out)
    before, after = float(match[1]), float(match[2])
    assert after > before
    assert len(_rows(out)) == 26
