"""The solver's numba cache is dropped whenever any solver source changes (numba alone checks only
the file a kernel is defined in, not the files of the kernels it calls)."""
from ray_eplb.solver.jit import drop_stale_cache, sources_digest


def _tree(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    return cache


def test_entries_survive_while_sources_are_unchanged_and_go_when_any_changes(tmp_path):
    cache = _tree(tmp_path)
    (cache / "a.k-3.py311.nbi").write_text("index")
    assert drop_stale_cache(str(tmp_path))  # no digest yet: whatever is there may be stale
    assert not (cache / "a.k-3.py311.nbi").exists()
    (cache / "a.k-3.py311.nbi").write_text("index")
    (cache / "a.k-3.py311.1.nbc").write_text("code")
    assert not drop_stale_cache(str(tmp_path))  # same sources: kept
    assert (cache / "a.k-3.py311.nbi").exists() and (cache / "a.k-3.py311.1.nbc").exists()
    (tmp_path / "b.py").write_text("y = 3\n")  # a file the cached kernel does not live in
    assert drop_stale_cache(str(tmp_path))
    assert not list(cache.glob("*.nbi")) and not list(cache.glob("*.nbc"))
    assert (cache / "numba-sources.digest").read_text() == sources_digest(str(tmp_path))


def test_digest_follows_names_and_contents(tmp_path):
    _tree(tmp_path)
    d0 = sources_digest(str(tmp_path))
    (tmp_path / "b.py").rename(tmp_path / "c.py")
    d1 = sources_digest(str(tmp_path))
    (tmp_path / "c.py").write_text("y = 2 \n")
    assert len({d0, d1, sources_digest(str(tmp_path))}) == 3
