"""The swap progress bar of ``ray-eplb rebalance`` and the demo: drawn from the status's swap while
one stages its batches, cleared after, never drawn off a terminal or under ``--json``."""
import io
import threading
import time

import pytest
from rich.console import Console

from ray_eplb.controller.cli.progress import SwapBar, wanted
from ray_eplb.controller.status import SwapProgress


class Swaps:
    """A stand-in for the controller's status: steps through the given swap states, one per poll,
    then reports the last one forever."""

    def __init__(self, states):
        self.states, self.calls, self.done = list(states), 0, threading.Event()

    def __call__(self):
        self.calls += 1
        if self.calls >= len(self.states):
            self.done.set()
            return self.states[-1]
        return self.states[self.calls - 1]


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_the_bar_follows_the_batches_of_a_swap_and_goes_away_when_it_is_done():
    states = [None, *(SwapProgress(epoch=4, batch=i, batches=3, done=False) for i in (1, 1, 2, 2)),
              SwapProgress(epoch=4, batch=3, batches=3, done=True), None]
    poll = Swaps(states)
    console, buf = _terminal()
    with SwapBar(poll, True, console=console, interval_s=0.02) as bar:
        assert poll.done.wait(5)
        time.sleep(0.1)
    assert sorted(set(bar.shown)) == [(4, 1, 3), (4, 2, 3)]  # drawn while staging, not once done
    out = buf.getvalue()
    assert "swap to epoch 4" in out and "1/3" in out and "2/3" in out


def test_a_new_swap_gets_its_own_bar_and_a_failing_poll_is_skipped():
    states = [SwapProgress(epoch=1, batch=1, batches=2, done=False), RuntimeError("status timed out"),
              SwapProgress(epoch=2, batch=1, batches=5, done=False), None]

    it = iter(states)

    def poll():
        s = next(it, None)
        if isinstance(s, Exception):
            raise s
        return s

    console, buf = _terminal()
    with SwapBar(poll, True, console=console, interval_s=0.02) as bar:
        time.sleep(0.3)
    assert bar.shown == [(1, 1, 2), (2, 1, 5)]
    assert "swap to epoch 2" in buf.getvalue() and "1/5" in buf.getvalue()


def test_off_a_terminal_nothing_is_polled_or_drawn():
    poll = Swaps([SwapProgress(epoch=1, batch=1, batches=2, done=False)])
    with SwapBar(poll, wanted(io.StringIO()), interval_s=0.02) as bar:
        time.sleep(0.1)
    assert poll.calls == 0 and bar.shown == []


def test_wanted_only_on_a_terminal_and_never_with_json():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert wanted(Tty()) and not wanted(Tty(), json_output=True) and not wanted(io.StringIO())
    with pytest.raises(ValueError, match="interval_s=0"):
        SwapBar(lambda: None, True, interval_s=0)
