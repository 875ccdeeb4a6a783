"""The controller's forever-wrapper: call ``step()`` every ``interval_s`` until stopped.

A plain asyncio helper (no Ray): a step that raises is reported and the loop goes on; a loop task
that dies anyway is reported as ``crashed: ...`` instead of dying silently.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable


class Loop:
    """Runs ``step()`` every ``interval_s`` seconds as a background task.

    Args:
        step: the round to run (an async callable).
        interval_s: period of the rounds (a round that takes longer starts the next one at once).
        on_error: called with ``(phase, exception)`` when a step raises, and with
            ``("loop", exception)`` if the loop task itself dies.
    """

    def __init__(self, step: Callable[[], Awaitable], interval_s: float, on_error: Callable[[str, BaseException], None]):
        self.step, self.interval_s, self.on_error = step, interval_s, on_error
        self.state = "idle"  # idle | running | stopping | stopped | crashed: ...
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    async def run(self) -> None:
        while self.state == "running":
            t0 = time.monotonic()
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - step() should not raise; never let the loop die
                self.on_error("step", exc)
            try:  # sleep until the next round, or until stop() wakes us
                await asyncio.wait_for(self._wake.wait(), max(0.0, self.interval_s - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    async def start(self) -> str:
        """Start the loop as a background task (idempotent)."""
        if self._task is None or self._task.done():
            # Running from here on, not from the task's first step: a stop() that comes before the
            # task has run must still find it running and stop it.
            self.state = "running"
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self.run())
            self._task.add_done_callback(self._done)
        return self.state

    def _done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.state = f"crashed: {task.exception()!r}"
            self.on_error("loop", task.exception())
        elif self.state == "running":
            self.state = "stopped"

    async def stop(self) -> str:
        """Stop after the current step."""
        if self.state == "running":
            self.state = "stopping"
            if self._wake is not None:
                self._wake.set()
        if self._task is not None:
            await self._task
        self.state = "stopped"
        return self.state
