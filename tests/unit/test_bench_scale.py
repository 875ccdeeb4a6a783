"""The scale benchmark (controller/bench/scale.py): a --quick run's structure and sanity, and the
trace tiling."""
from __future__ import annotations

import json

import pytest
import torch

from ray_eplb.controller.bench import scale


def test_quick_run_reports_every_variant_with_sane_values(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert scale.main(["--quick", "--windows", "3", "--repeats", "1", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    (row,) = report["results"]
    assert (row["layers"], row["experts"], row["slots"], row["gpus"]) == (6, 64, 96, 16)
    variants = row["variants"]
    assert set(variants) == set(scale.VARIANTS)
    for name, res in variants.items():
        assert res["ms"] > 0 and res["ratio_to_greedy"] > 0, name
        assert 0 < res["in_window"] <= 1 and 0 < res["next_window"] <= 1, name
        assert 0 <= res["moved_frac"] <= 1, name
    assert variants["greedy"]["ratio_to_greedy"] == pytest.approx(1.0)
    for name in ("fresh", "migrate", "migrate_25", "from_greedy", "no_move"):
        assert variants[name]["avoidable_dups"] == 0, name  # ours, including from the greedy's plan
    assert variants["no_move"]["moved_frac"] == 0.0  # its starting plan is this window's fresh plan
    assert variants["fresh"]["in_window"] >= variants["greedy"]["in_window"]
    growth = report["growth"]
    assert [g["value"] for g in growth] == [4, 8]
    assert all(g["fresh_ms"] > 0 and g["greedy_ms"] > 0 and g["maps_ms"] > 0 for g in growth)
    for g in growth:  # the used-width column: as wide as the most replicas, never wider than R - E + 1
        assert g["fresh_used_ms"] > 0 and g["maps_used_ms"] > 0
        assert 1 <= g["used_width"] <= g["full_width"] == {4: 64 - 48 + 1, 8: 128 - 48 + 1}[g["value"]]
    ratios = report["growth_ratios"]
    assert (ratios["from"], ratios["to"]) == (4, 8)
    assert ratios["call_used"] == pytest.approx(growth[1]["fresh_used_ms"] / growth[0]["fresh_used_ms"])
    assert all(g["plan_ms"] > 0 for g in growth)  # the plan alone (place_experts), timed as its own call
    assert ratios["plan"] == pytest.approx(growth[1]["plan_ms"] / growth[0]["plan_ms"])
    printed = capsys.readouterr().out
    assert "quick / synthetic" in printed and "growth" in printed and "slots per GPU 4 -> 8" in printed


def test_tile_load_copies_trace_layers_side_by_side():
    src = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)  # [T, L0, E0]
    out = scale.tile_load(src, 5, 8)
    assert out.shape == (2, 5, 8)
    assert torch.equal(out[:, 4, :4], src[:, 4 % 3])  # layers cycle
    assert torch.equal(out[:, 1, 4:], src[:, (1 + 7) % 3])  # copy k of layer l: trace layer (l + 7k) mod L0
    with pytest.raises(ValueError, match="multiple"):
        scale.tile_load(src, 5, 6)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        scale.main(["--windows", "2"])
    assert scale.main(["--shapes", "no_such_shape", "--no-sweep", "--quiet"]) == 2
