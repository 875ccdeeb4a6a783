"""The dashboard's browser check under a time limit: a Chromium that never comes up makes it fail with
a message naming the limit, and its whole process group and its profile folder are gone after."""
import os
import stat
import sys
import tempfile
import time

import pytest

from ray_eplb.controller.cli.browser import EPOCH_LINE, browser_check


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_browser_that_hangs_fails_the_check_by_its_time_limit_and_is_cleaned_up(tmp_path, monkeypatch):
    pidfile = tmp_path / "pids"
    fake = tmp_path / "bin" / "chromium"
    fake.parent.mkdir()
    # Never writes DevToolsActivePort; a child of its own keeps the group busy.
    fake.write_text(f"""#!{sys.executable}
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
time.sleep(600)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "t").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # pick up TMPDIR
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish within 3 s"):
        browser_check("127.0.0.1:1", timeout_s=3)
    assert time.monotonic() - t0 < 15
    pids = [int(p) for p in pidfile.read_text().split()]
    deadline = time.monotonic() + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))
    assert list((tmp_path / "t").iterdir()) == []  # the profile folder is gone


def test_the_epoch_lines_the_log_page_is_searched_for():
    fmt = "2026-12-01 16:27:15,547 {level} ray_eplb.controller{sub}: epoch {e} {what}"
    got = [EPOCH_LINE.search(fmt.format(level=lv, sub=sub, e=e, what=w))
           for lv, sub, e, w in [("INFO", "", 3, "committed (drift): 33 slots"),
                                 ("WARNING", ".balancer", 12, "aborted in prepare"),
                                 ("INFO", "", 0, "ready"), ("DEBUG", "", 4, "committed")]]
    assert [m and m.groups() for m in got] == [("3", "committed"), ("12", "aborted"), None, None]


class _FakeTab:
    """Stands in for the DevTools tab: the Log link carries the nil actor id until the page has been
    reloaded ``fixed_after`` times."""

    def __init__(self, fixed_after: int):
        self.reloads, self.fixed_after = 0, fixed_after

    async def until(self, expression: str, what: str, timeout_s: float):
        if "a.click()" in expression and self.reloads < self.fixed_after:
            raise RuntimeError(f"{what} within {timeout_s:g} s")
        return "#/actors/0123abcd" if "a.click()" in expression else True

    async def js(self, expression: str):
        return f"ray_eplb_controller ALIVE | Log link: #/actors/ffff (after {self.reloads} reloads)"

    async def call(self, method: str, **params):
        assert method == "Page.reload"
        self.reloads += 1


@pytest.mark.parametrize("fixed_after", [0, 1, 2])
def test_a_log_link_without_the_actor_id_is_waited_for_again_after_one_reload(fixed_after):
    import asyncio

    from ray_eplb.controller.cli.browser import _click_log_link

    tab = _FakeTab(fixed_after)
    if fixed_after < 2:
        assert asyncio.run(_click_log_link(tab, 0.1, "ray_eplb_controller")) == "#/actors/0123abcd"
        assert tab.reloads == fixed_after  # a reload only where the first wait failed
    else:
        with pytest.raises(RuntimeError, match=r"no Log link with an actor id in the row of ray_eplb_controller"
                                               r".*after 0 reloads.*before a reload.*after 1 reloads.*after it"):
            asyncio.run(_click_log_link(tab, 0.1, "ray_eplb_controller"))
        assert tab.reloads == 1  # one reload, then the error
