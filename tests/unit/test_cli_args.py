"""Command-line checks: every bad argument of ``demo``, ``bench-runtime`` and ``bench`` is one line on
stderr with exit status 2, before any cluster starts (Ray is refused in unit tests)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from ray_eplb.controller.bench import runtime as bench_runtime
from ray_eplb.controller.bench import solver as bench_solver
from ray_eplb.controller.cli import demo
from ray_eplb.controller.cli.args import Parser, int_at_least, number


def one_line_exit_2(capsys, call, *needles: str) -> str:
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_the_parser_reports_one_line_and_exit_2(capsys):
    ap = Parser(prog="tool")
    ap.add_argument("--n", type=int_at_least(1))
    ap.add_argument("--x", type=number(0.0, strict=True, high=5.0))
    assert ap.parse_args(["--n", "3", "--x", "5"]).n == 3
    err = one_line_exit_2(capsys, lambda: ap.parse_args(["--n", "0"]), "tool: error:", "--n", "0 must be >= 1")
    assert "usage" not in err
    one_line_exit_2(capsys, lambda: ap.parse_args(["--n", "1.5"]), "'1.5' is not an integer")
    one_line_exit_2(capsys, lambda: ap.parse_args(["--x", "0"]), "0 must be > 0")
    one_line_exit_2(capsys, lambda: ap.parse_args(["--x", "5.5"]), "5.5 must be <= 5")
    for bad in ("inf", "-inf", "nan"):
        one_line_exit_2(capsys, lambda bad=bad: ap.parse_args([f"--x={bad}"]), f"'{bad}' must be finite")
    one_line_exit_2(capsys, lambda: ap.parse_args(["--y"]), "unrecognized arguments: --y")
    one_line_exit_2(capsys, lambda: ap.error("two\nlines"), "two lines")


@pytest.mark.parametrize("argv,flag", [
    (["--top-k", "-3"], "--top-k"), (["--slots-per-gpu", "-1"], "--slots-per-gpu"),
    (["--interval", "inf"], "--interval"), (["--interval", "nan"], "--interval"), (["--interval", "0"], "--interval"),
    (["--windows", "-1"], "--windows"), (["--layers", "-1"], "--layers"), (["--batch-mib", "-5"], "--batch-mib"),
    (["--batch-mib", "0"], "--batch-mib"), (["--batch-mib", "1e-9"], "less than one byte"), (["--workers", "0"], "--workers"), (["--nodes", "0"], "--nodes"),
    (["--rebalance-period", "-1"], "--rebalance-period"), (["--min-gain", "1"], "--min-gain"),
    (["--min-gain", "nan"], "--min-gain"), (["--min-layer-gain", "-0.1"], "--min-layer-gain"),
    (["--prepare-timeout", "inf"], "--prepare-timeout"), (["--compare-ratio", "0.5"], "--compare-ratio"),
    (["--window-seconds", "-1"], "--window-seconds"), (["--seed", "-1"], "--seed"), (["--hidden", "0"], "--hidden"),
    (["--batch-tokens", "0"], "--batch-tokens"), (["--batches-per-window", "-2"], "--batches-per-window"),
    (["--workers", "3", "--nodes", "2"], "--workers=3"), (["--max-moves", "-1"], "max_moves=-1"),
    (["--max-moves", "x"], "--max-moves"), (["--forecast", "ema:7"], "ema:7"),
    (["--checkpoint", "/no/such/folder/w.safetensors"], "--checkpoint"), (["--checkpoint", "/tmp"], "--checkpoint"),
    (["--screenshot", "/no/such/folder/a.png"], "--screenshot"),
    (["--slots-per-gpu", "1", "--workers", "4", "--nodes", "2", "--top-k", "6"], "--top-k=6"),
    (["--keep", "--compare"], "--keep"), (["--keep", "--address", "127.0.0.1:1"], "--keep"),
])
def test_every_bad_demo_argument_is_one_line_exit_2(capsys, argv, flag):
    one_line_exit_2(capsys, lambda: demo.parse(argv), "ray-eplb demo: error:", flag)


def test_good_demo_arguments_parse():
    a = demo.parse(["--top-k", "2", "--interval", "0.5", "--batch-mib", "0.5", "--window-seconds", "0", "--max-moves", "0.1"])
    assert (a.top_k, a.interval, a.batch_mib, a.window_seconds, a.max_moves) == (2, 0.5, 0.5, 0.0, 0.1)
    assert demo.controller_config(a).transfer_batch_bytes == 2**19  # no longer altered behind the user's back
    assert demo.parse([]).window_seconds is None
    assert demo.parse(["--keep"]).keep and not demo.parse([]).keep


def test_the_keep_notice_says_where_the_dashboard_is_how_to_log_in_and_how_to_stop():
    from ray_eplb.controller.cli.keep import kept, lines

    k = kept("10.0.0.5:6380", "127.0.0.1:8266", "/home/u/.ray/auth_token", "/tmp/ray/session_x")
    assert k["dashboard"] == "http://127.0.0.1:8266" and k["stop"] == ["ray-eplb stop --address 10.0.0.5:6380", "ray stop"]
    text = "\n".join(lines(k))
    assert "dashboard http://127.0.0.1:8266: log in with the token in /home/u/.ray/auth_token" in text
    assert "RAY_AUTH_MODE=token ray-eplb status --address 10.0.0.5:6380" in text
    assert "RAY_AUTH_MODE=token ray-eplb stop --address 10.0.0.5:6380 (the balancer), then `ray stop`" in text
    off = "\n".join(lines(kept("10.0.0.5:6380", "http://h:1", None, None)))
    assert "token authentication off" in off and "RAY_AUTH_MODE" not in off and "ray-eplb status --address 10.0.0.5:6380" in off


def test_demo_checks_against_the_trace_shape():
    a = demo.parse(["--workers", "8", "--nodes", "2"])
    assert demo.check_shape(a, 20, 26, 64, static=False) is None
    cases = [
        (["--slots-per-gpu", "1"], (20, 26, 64), "--slots-per-gpu=1 x --workers=8 = 8 slots cannot hold the trace's 64 experts"),
        (["--slots-per-gpu", "7"], (20, 26, 64), "need >= 8 per GPU"),
        (["--top-k", "9"], (20, 26, 8), "--top-k=9 exceeds the trace's 8 experts"),
        (["--layers", "27"], (20, 26, 64), "--layers=27 exceeds the trace's 26 layers"),
        (["--windows", "21"], (20, 26, 64), "--windows=21 exceeds the trace's 20 windows"),
    ]
    for argv, shape, message in cases:
        got = demo.check_shape(demo.parse(argv), *shape, static=False)
        assert got is not None and message in got, got
    assert demo.check_shape(demo.parse(["--slots-per-gpu", "8"]), 20, 26, 64, static=False) is None
    assert demo.check_shape(demo.parse(["--windows", "30"]), 1, 26, 64, static=True) is None  # sampled windows


@pytest.fixture
def traces(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_EPLB_TRACES", str(tmp_path))
    np.savez(tmp_path / "small.npz", load=np.ones((4, 3, 16)))
    return tmp_path


@pytest.mark.parametrize("argv,needles", [
    (["--trace", "smal"], ["'smal' not found", "available", "small"]),
    (["--trace", "small", "--slots-per-gpu", "1"], ["cannot hold the trace's 16 experts"]),
    (["--trace", "small", "--top-k", "17"], ["--top-k=17 exceeds the trace's 16 experts"]),
    (["--trace", "small", "--layers", "4"], ["--layers=4 exceeds the trace's 3 layers"]),
    (["--trace", "JUNK"], ["not a readable .npz archive"]),
])
def test_demo_main_stops_before_any_cluster_on_trace_problems(capsys, traces, argv, needles):
    (traces / "junk.npz").write_bytes(np.random.default_rng(1).bytes(1000))
    argv = [str(traces / "junk.npz") if x == "JUNK" else x for x in argv]
    assert demo.main(argv) == 2  # Ray is refused here: returning at all shows no cluster was started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ray-eplb demo: error:"), err
    assert all(n in err for n in needles), err


@pytest.mark.parametrize("argv,flag", [
    (["--workers", "0"], "--workers"), (["--workers", "3", "--nodes", "2"], "--workers=3"),
    (["--experts", "3"], "--experts"), (["--layers", "-1"], "--layers"), (["--stall", "-1"], "--stall"),
    (["--deadline", "inf"], "--deadline"), (["--rounds", "0"], "--rounds"), (["--swaps", "0"], "--swaps"),
    (["--soak", "0"], "--soak"), (["--soak", "nan"], "--soak"), (["--soak", "1", "--warmup", "1"], "--warmup=1"),
    (["--soak", "0.2", "--warmup", "0", "--sample-s", "10"], "fewer than 2 samples"),
    (["--sample-s", "0"], "--sample-s"), (["--rebalance-s", "-6"], "--rebalance-s"),
])
def test_every_bad_bench_runtime_argument_is_one_line_exit_2(capsys, argv, flag):
    one_line_exit_2(capsys, lambda: bench_runtime.main(argv), "ray-eplb bench-runtime: error:", flag)


def test_good_bench_runtime_arguments_parse():
    a = bench_runtime.parse(["--soak", "0.5", "--warmup", "0.1", "--workers", "2"])
    assert (a.soak, a.warmup, a.workers, a.nodes, a.sample_s) == (0.5, 0.1, 2, 2, 10.0)
    assert bench_runtime.parse([]).soak is None


@pytest.mark.parametrize("argv,needle", [
    (["--windows", "1"], "--windows"), (["--repeats", "0"], "--repeats"), (["--greedy-repeats", "-1"], "--greedy-repeats"),
    (["--seed", "-2"], "--seed"), (["--variants", "method"], "key=value"), (["--variants", "mehtod=dhondt"], "mehtod"),
    (["--forecast", "bogus"], "bogus"), (["--sweep-specs", "window:0"], "window:0"), (["--expert-mb", "inf"], "--expert-mb"),
    (["--traces-dir", "/no/such/folder"], "/no/such/folder"),
])
def test_every_bad_bench_argument_is_one_line_exit_2(capsys, argv, needle):
    one_line_exit_2(capsys, lambda: bench_solver.parse_args(argv), "ray-eplb bench: error:", needle)


def test_good_bench_arguments_parse(tmp_path):
    args = bench_solver.parse_args(["--windows", "2", "--variants", "method=dhondt", "--traces-dir", str(tmp_path)])
    assert isinstance(args, argparse.Namespace) and args.windows == 2 and args.variants == ["method=dhondt"]
