"""Workloads (controller/bench/workload.py): trace files, the synthetic fallback, window sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ray_eplb.controller.bench import workload
from ray_eplb.controller.bench.workload import default_traces_dir, load_trace, load_workload, sample_windows, synthetic_trace

SHARED = default_traces_dir() or Path("../shared/traces")  # where the CI clone finds them too
# From ../shared/traces/README.md: (windows, layers, experts); None = any number of windows.
KNOWN = {
    "dsv2lite_puffin": (20, 26, 64),
    "llama4_maverick_mmlu": (25, 24, 128),
    "qwen3_235b_prover": (1, 94, 128),
    "qwen3_30b_prover": (1, 48, 128),
    "qwen2_57b_sharegpt": (1, 28, 64),
    "qwen2_57b_multidomain": (1, 28, 64),
    "olmoe_domains": (6, 3, 64),
    "mixtral_domains": (5, 3, 8),
}


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------------------------
# load_trace
# ----------------------------------------------------------------------------------------------
def test_load_trace_by_path_and_by_name(tmp_path):
    load = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)  # ints are read as float64
    path = write_npz(tmp_path / "tiny.npz", load=load, model=np.array("toy-moe"))
    for trace in (load_trace(path), load_trace(str(path)), load_trace("tiny", traces_dir=tmp_path),
                  load_trace("tiny.npz", traces_dir=tmp_path)):
        assert trace.name == "tiny" and trace.model == "toy-moe" and not trace.synthetic
        assert trace.load.dtype == torch.float64 and tuple(trace.load.shape) == (2, 3, 4)
        assert torch.equal(trace.load, torch.from_numpy(load.astype(np.float64)))
        assert not trace.static
    static = load_trace(write_npz(tmp_path / "static.npz", load=np.ones((1, 2, 4))))
    assert static.static and static.model == ""


def test_load_trace_finds_names_in_the_env_folder(tmp_path, monkeypatch):
    write_npz(tmp_path / "mine.npz", load=np.ones((3, 2, 4)))
    monkeypatch.setenv("RAY_EPLB_TRACES", str(tmp_path))
    assert tuple(load_trace("mine").load.shape) == (3, 2, 4)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_trace("missing")


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"loads": np.ones((1, 2, 3))}, r"no 'load' array"),
        ({"load": np.ones((2, 3))}, r"\[T, L, E\].*\(2, 3\)"),
        ({"load": np.ones((1, 2, 3, 4))}, r"\[T, L, E\].*\(1, 2, 3, 4\)"),
        ({"load": np.ones((0, 2, 3))}, r"non-empty.*\(0, 2, 3\)"),
        ({"load": np.array([[[1.0, np.nan]]])}, r"NaN"),
        ({"load": np.array([[[1.0, np.inf]]])}, r"inf"),
        ({"load": np.array([[[1.0, -1.0]]])}, r"negative"),
        ({"load": np.array([[["a", "b"]]])}, r"bad.npz.*'a'"),  # names the file and the value
    ],
)
def test_malformed_trace_files_raise_value_error(tmp_path, arrays, match):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_a_file_that_is_not_an_npz_raises_a_one_line_value_error(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes: numpy's "pickled data" case
    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as f:
        np.save(f, np.ones((2, 3, 4)))  # a .npy array under an .npz name
    cut = tmp_path / "cut.npz"
    cut.write_bytes(write_npz(tmp_path / "whole.npz", load=np.ones((20, 30, 40))).read_bytes()[:200])
    obj = tmp_path / "obj.npz"
    np.savez(obj, load=np.array([{"a": 1}], dtype=object))  # needs pickle: refused
    flags = tmp_path / "flags.npz"
    np.savez(flags, load=np.ones((1, 2, 3), dtype=bool))
    for path, match in ((junk, "not a readable .npz"), (noise, "not a readable .npz"), (bare, "single .npy"),
                        (cut, "cut.npz"), (obj, "obj.npz"), (flags, "not numeric.*bool")):
        with pytest.raises(ValueError, match=match) as info:
            load_trace(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value), str(info.value)


def test_missing_trace_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_trace("nope", traces_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "nope.npz", traces_dir=tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------
# load_workload: real trace or synthetic fallback
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_traces(tmp_path, monkeypatch):
    """An empty traces folder in $RAY_EPLB_TRACES and a working directory with no ../shared."""
    empty = tmp_path / "traces"
    empty.mkdir()
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("RAY_EPLB_TRACES", str(empty))
    monkeypatch.chdir(cwd)
    return empty


@pytest.fixture
def no_folder(tmp_path, monkeypatch):
    """No $RAY_EPLB_TRACES, and no ../shared/traces beside the working directory or the checkout."""
    monkeypatch.delenv("RAY_EPLB_TRACES", raising=False)
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(workload, "__file__", str(tmp_path / "x" / "y" / "z" / "workload.py"))
    assert workload.default_traces_dir() is None


def test_load_workload_falls_back_to_synthetic_only_when_nothing_was_asked_and_no_folder(no_folder, capsys):
    trace = load_workload(num_windows=3, num_layers=2, num_experts=8, tokens=100)
    out = capsys.readouterr().out
    assert "synthetic" in out and "dsv2lite_puffin" in out
    assert trace.synthetic and tuple(trace.load.shape) == (3, 2, 8)
    assert torch.equal(trace.load, synthetic_trace(3, 2, 8, tokens=100).load)
    # A trace asked for by name or by path is never replaced by the synthetic workload.
    with pytest.raises(FileNotFoundError, match="no traces folder"):
        load_workload("not_here", num_windows=2, num_layers=1, num_experts=4)
    with pytest.raises(FileNotFoundError):
        load_workload("/nowhere/not_here.npz")


def test_a_trace_name_that_does_not_exist_lists_the_available_ones(no_traces, capsys):
    write_npz(no_traces / "alpha.npz", load=np.ones((2, 3, 4)))
    write_npz(no_traces / "beta.npz", load=np.ones((2, 3, 4)))
    with pytest.raises(FileNotFoundError, match=r"'alpah' not found.*available.*alpha, beta"):
        load_workload("alpah")
    # With a traces folder, the default trace missing is an error too, not the synthetic workload.
    with pytest.raises(FileNotFoundError, match=r"dsv2lite_puffin.*alpha, beta"):
        load_workload()
    (no_traces / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\(none\)"):
        load_trace("x", traces_dir=no_traces / "empty")
    assert "synthetic" not in capsys.readouterr().out


def test_load_workload_uses_a_real_trace_when_there_is_one(no_traces, capsys):
    write_npz(no_traces / "dsv2lite_puffin.npz", load=np.ones((2, 3, 4)), model=np.array("m"))
    trace = load_workload()
    assert not trace.synthetic and trace.name == "dsv2lite_puffin" and tuple(trace.load.shape) == (2, 3, 4)
    assert capsys.readouterr().out == ""
    write_npz(no_traces / "other.npz", load=np.ones((1, 1, 2)))
    assert load_workload("other").name == "other"
    assert workload.available_traces() == ["dsv2lite_puffin", "other"]


def test_default_traces_dir_prefers_the_env(no_traces, monkeypatch):
    assert workload.default_traces_dir() == no_traces


# ----------------------------------------------------------------------------------------------
# synthetic_trace and sample_windows
# ----------------------------------------------------------------------------------------------
def test_synthetic_trace_shape_totals_and_determinism():
    a = synthetic_trace(num_windows=6, num_layers=3, num_experts=16, top_k=4, tokens=500, seed=7)
    assert a.synthetic and a.top_k == 4 and a.name == "synthetic"
    assert tuple(a.load.shape) == (6, 3, 16) and a.load.dtype == torch.float64
    assert (a.load >= 0).all() and (a.load == a.load.round()).all()
    assert torch.equal(a.load.sum(-1), torch.full((6, 3), 500.0 * 4))
    assert torch.equal(a.load, synthetic_trace(6, 3, 16, top_k=4, tokens=500, seed=7).load)
    assert not torch.equal(a.load, synthetic_trace(6, 3, 16, top_k=4, tokens=500, seed=8).load)


def test_synthetic_trace_is_skewed():
    trace = synthetic_trace(num_windows=4, num_layers=2, num_experts=64, tokens=20_000, seed=0)
    share = trace.load / trace.load.sum(-1, keepdim=True)  # [T, L, E]
    hottest = share.max(-1).values * 64  # hottest expert relative to the mean
    assert (hottest > 3).all()


def test_sample_windows_sums_and_determinism():
    table = torch.tensor([[5.0, 1.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = sample_windows(table, num_windows=5, tokens_per_layer=1000, seed=3)
    assert tuple(w.shape) == (5, 3, 4) and w.dtype == torch.float64
    assert torch.equal(w.sum(-1), torch.tensor([[1000.0, 0.0, 1000.0]] * 5))
    assert (w[:, 0, 2] == 0).all()  # an expert with no load never gets a token
    assert torch.equal(w, sample_windows(table, 5, 1000, seed=3))
    assert not torch.equal(w, sample_windows(table, 5, 1000, seed=4))
    assert not torch.equal(w[0], w[1])  # windows differ from one another
    # The draws follow the table: expert 0 of layer 0 gets about half the tokens.
    big = sample_windows(table, 2, 200_000, seed=0)
    assert abs(float(big[:, 0, 0].mean()) / 200_000 - 0.5) < 0.01
    # Integer tables work too.
    assert torch.equal(sample_windows(table.to(torch.int64), 5, 1000, seed=3), w)


# ----------------------------------------------------------------------------------------------
# the real traces (skipped where ../shared/traces is absent)
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/traces")
def test_every_shared_trace_loads_with_its_documented_shape():
    files = sorted(SHARED.glob("*.npz"))
    assert files
    for path in files:
        trace = load_trace(path)
        assert trace.load.dim() == 3 and min(trace.load.shape) > 0, path.name
        assert (trace.load >= 0).all() and torch.isfinite(trace.load).all()
        if trace.name in KNOWN:
            assert tuple(trace.load.shape) == KNOWN[trace.name], path.name
        assert load_trace(trace.name, traces_dir=SHARED).load.shape == trace.load.shape


def test_a_missing_env_traces_folder_is_reported_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_EPLB_TRACES", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        workload.default_traces_dir()
    with pytest.raises(FileNotFoundError, match="nope"):
        load_trace("dsv2lite_puffin")


def test_a_non_numeric_load_names_the_file(tmp_path):
    path = tmp_path / "strings.npz"
    np.savez(path, load=np.array([[["a", "b"]]]))
    with pytest.raises(ValueError, match="strings.npz"):
        load_trace(path)
