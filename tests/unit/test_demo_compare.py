"""The demo's planning options and the --compare bookkeeping (no cluster)."""
import pytest

from ray_eplb.controller.cli.compare import compare, modes, verdict
from ray_eplb.controller.cli.demo import controller_config, parse


def test_demo_options_reach_the_controller_config():
    a = parse(["--max-moves", "0.1", "--budget-scope", "total", "--min-layer-gain", "0.02", "--forecast", "window:3",
               "--batch-mib", "2", "--rebalance-period", "3"])
    cfg = controller_config(a)
    assert (cfg.planning, cfg.max_moves, cfg.budget_scope, cfg.min_layer_gain, cfg.forecast) == \
        ("incremental", 0.1, "total", 0.02, "window:3")
    assert cfg.transfer_batch_bytes == 2 * 2**20 and cfg.rebalance_period_s == 3
    assert isinstance(controller_config(parse(["--max-moves", "8"])).max_moves, int)


@pytest.mark.parametrize("argv, match", [
    (["--planning", "fresh", "--max-moves", "0.1"], "max_moves=0.1"),
    (["--max-moves", "1.5"], "max_moves=1.5"),
    (["--forecast", "ema:3"], "ema:3"),
    (["--compare-ratio", "0.5"], "compare-ratio"),
])
def test_bad_demo_options_fail_before_any_cluster_starts(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and match in err and err.count("\n") == 1, err


def test_compare_runs_fresh_then_incremental_more_often_with_a_budget():
    a = parse(["--compare", "--interval", "0.5", "--rebalance-period", "4"])
    fresh, inc = modes(a)
    assert (fresh.planning, fresh.max_moves, fresh.rebalance_period) == ("fresh", None, 4)
    assert (inc.planning, inc.max_moves, inc.rebalance_period) == ("incremental", 0.1, 1.0)
    assert fresh.trigger == inc.trigger == "periodic" and fresh.min_gain == inc.min_gain == 0
    assert modes(parse(["--compare", "--rebalance-period", "2"]))[1].rebalance_period == 1.0  # never below --interval


def summary(rebalances, nbytes, bal, bad=0):
    return {"rebalances": rebalances, "bytes_moved": nbytes, "balancedness_run": bal, "mismatched_tokens": bad,
            "rebalance_period_s": 1.0, "experts_moved": 0, "transfer_batches": 0, "aborted": 0, "swap_s_mean": None,
            "ok": bad == 0}


def test_verdict_checks_each_part_of_the_target():
    v = verdict(summary(5, 1000, 0.85), summary(20, 600, 0.88))
    assert (v["rebalance_ratio"], v["bytes_ratio"]) == (4.0, 0.6)
    assert v["rebalances_4x"] and v["bytes_not_more"] and v["higher_balancedness"] and v["no_mismatch"]
    v = verdict(summary(5, 1000, 0.88), summary(19, 1100, 0.87, bad=2))
    assert not (v["rebalances_4x"] or v["bytes_not_more"] or v["higher_balancedness"] or v["no_mismatch"])


def test_compare_returns_nonzero_when_a_run_mismatches(capsys):
    a = parse(["--compare"])
    runs = iter([summary(2, 100, 0.8), summary(9, 50, 0.9, bad=1)])
    assert compare(a, lambda m: next(runs)) == 1
    assert "4.5x the rebalances" in capsys.readouterr().out
