"""``ray-eplb demo --model DIR --json`` on a tiny Qwen3-MoE folder written by ``ray-eplb tiny-model``,
in fresh processes as a user runs them: every generated token equals the unpatched model's, the
balancer rebalanced under live generation and the measured balancedness beats the start placement's."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

CLI = [sys.executable, "-m", "ray_eplb.controller.cli.main"]


def run(args, timeout):
    out = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(200)
def test_demo_on_a_tiny_qwen3_moe_folder_matches_the_unpatched_model_and_rebalances(tmp_path):
    folder = tmp_path / "tiny-qwen3"
    assert "qwen3_moe" in run(["tiny-model", str(folder), "--family", "qwen3_moe"], 120)
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    out = run(["demo", "--model", str(folder), "--workers", "4", "--nodes", "1", "--phases", "3",
               "--windows-per-phase", "3", "--batch", "8", "--new-tokens", "10", "--json"], 180)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["model_type"] == "qwen3_moe"
    assert summary["generated_tokens"] == 3 * 3 * 8 * 10
    assert summary["mismatched_tokens"] == 0 and summary["wrong_weight_slots"] == 0 and summary["ok"]
    assert summary["rebalances"] >= 1 and summary["experts_moved"] > 0 and summary["bytes_moved"] > 0
    assert summary["windows_after_first_rebalance"] >= 1
    assert summary["balancedness_after"] > summary["balancedness_before"], summary


def test_tiny_model_refuses_a_folder_holding_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = subprocess.run(CLI + ["tiny-model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "already holds a model" in out.stderr
