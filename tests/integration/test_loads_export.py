"""``ray-eplb loads`` against the test run's live balancer (``conftest.runtime``): what the workers
counted comes out in every load format, exactly, and the placement in force in every placement
format; ``ray-eplb plan`` reads both back (``--old`` the exported placement)."""
import json

import pytest
import torch

from ray_eplb.controller.cli import loads as loads_cli
from ray_eplb.controller.cli import plan as plan_cli
from ray_eplb.topology.records import read_loads, read_phy2log, read_placement

pytestmark = pytest.mark.timeout(120)


def export(*args):
    return loads_cli.main(["--address", "auto", *map(str, args)])


def total(tmp_path, name):
    path = tmp_path / name
    code = export("-o", path, "--total")
    return torch.zeros(0) if code == 2 else read_loads(path)[0]  # exit 2: no token recorded yet


def test_live_loads_and_placement_export_and_plan_round_trip(runtime, tmp_path, capsys):
    import ray

    topo, ctl = runtime.topology, runtime.controller
    ray.get(ctl.step.remote())  # a round for whatever earlier tests left uncounted
    before = total(tmp_path, "before.json")
    gen = torch.Generator().manual_seed(3)
    ours = torch.zeros(topo.num_layers, topo.num_experts, dtype=torch.float64)  # [L, E] routed here
    for layer in range(topo.num_layers):
        x = torch.randn(48, runtime.source.hidden_size, generator=gen)
        ids = torch.stack([torch.zeros(48, dtype=torch.int64), torch.randint(1, 4, (48,), generator=gen)], 1)  # [N, 2]
        runtime.router.dispatch(layer, x, ids, torch.full((48, 2), 0.5))
        ours[layer] += torch.bincount(ids.reshape(-1), minlength=topo.num_experts).double()
    ray.get(ctl.step.remote())
    after = total(tmp_path, "after.json")
    assert torch.equal(after - (before if before.numel() else 0), ours)

    for name in ("win.json", "win.npz", "win.pt"):
        assert export("-o", tmp_path / name) == 0
        window = read_loads(tmp_path / name)  # [T, L, E]
        assert window.shape[1:] == (topo.num_layers, topo.num_experts) and 1 <= window.shape[0]
        assert torch.equal(window[-1], ours)  # the last round counted exactly what was routed here
    sg = torch.load(tmp_path / "win.pt", weights_only=True)
    assert list(sg) == ["logical_count"] and sg["logical_count"].dtype == torch.int64

    st = ray.get(ctl.current_map.remote())  # the placement in force
    for name, fmt in (("p.json", "ours"), ("p_sglang.json", "sglang"), ("p.pt", "sglang-pt"), ("p_triple.pt", "triple")):
        assert export("--placement", "-o", tmp_path / name, "--format", fmt) == 0
        phy2log, found, _ = read_phy2log(tmp_path / name)
        assert torch.equal(phy2log, st.phy2log)
    assert read_placement(tmp_path / "p.json").epoch == st.epoch
    assert list(json.loads((tmp_path / "p_sglang.json").read_text())) == ["physical_to_logical_map"]

    capsys.readouterr()
    code = plan_cli.main([str(tmp_path / "win.pt"), "--replicas", str(topo.num_slots), "--gpus", str(topo.num_gpus),
                          "--nodes", str(topo.num_nodes), "--old", str(tmp_path / "p.json"), "-o",
                          str(tmp_path / "planned.json")])
    assert code == 0, capsys.readouterr().err
    planned = read_placement(tmp_path / "planned.json")
    assert planned.topology == topo and planned.epoch == st.epoch + 1


def test_export_errors_are_one_line(runtime, tmp_path, capsys):
    assert export("-o", tmp_path / "loads.txt") == 2
    assert export("-o", tmp_path / "loads.pt", "--format", "triple") == 2
    assert export("--placement", "--total", "-o", tmp_path / "p.json") == 2
    assert export("-o", tmp_path / "loads.json", "--namespace", "nobody_runs_here") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert "give --format" in err[0] and "'triple'" in err[1] and "--total" in err[2] and "nobody_runs_here" in err[3]
