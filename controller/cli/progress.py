"""A progress bar for the swaps of a running balancer, for ``ray-eplb rebalance`` and the demo.

The controller reports the swap under way in its status (``ControllerStatus.swap``: epoch, batch
``i`` of ``n``, done); :class:`SwapBar` polls that from a background thread and draws a bar while a
swap is staging its transfer batches, nothing otherwise. It draws only on a terminal: piped output,
``--json`` runs and tests see nothing of it.
"""
from __future__ import annotations

import sys
import threading
from typing import IO, Any, Callable

#: Seconds between two status polls while the bar is up.
POLL_S = 0.25


def wanted(stream: IO, json_output: bool = False) -> bool:
    """Draw a bar on ``stream``: only on a terminal, and never under ``--json``."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not json_output


def controller_poll(controller: Any) -> Callable[[], Any]:
    """``() -> SwapProgress | None`` of a controller actor's status."""
    import ray

    return lambda: ray.get(controller.status.remote(), timeout=10).swap


class SwapBar:
    """``with SwapBar(poll, enabled):`` shows ``swap to epoch E  [bar]  i/n batches`` while ``poll()``
    returns a swap that is not done, and clears it when the swap ends (or the block exits).

    ``poll``: ``() -> SwapProgress | None`` (see :func:`controller_poll`); ``enabled=False``: nothing
    is polled or drawn. ``stream``: where the bar goes (default stderr); ``console`` overrides it (tests)."""

    def __init__(self, poll: Callable[[], Any], enabled: bool, *, stream: IO | None = None, console: Any = None,
                 interval_s: float = POLL_S):
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} must be positive")
        self.poll, self.enabled, self.interval_s = poll, enabled, interval_s
        self.stream, self.console = stream, console
        self.shown: list[tuple[int, int, int]] = []  # (epoch, batch, batches) as drawn, for tests and logs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = None

    def __enter__(self) -> SwapBar:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = self.console or Console(file=self.stream or sys.stderr)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("batches"), TimeElapsedColumn(), console=console, transient=True,
                                  # Lines printed meanwhile (the demo's) go above the bar when it shares stdout.
                                  redirect_stdout=console.file is sys.stdout, redirect_stderr=False)
        self._progress.start()
        self._thread = threading.Thread(target=self._run, name="eplb-swap-bar", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._progress is not None:
            self._progress.stop()

    def _run(self) -> None:
        task, epoch = None, None
        while not self._stop.wait(self.interval_s):
            try:
                swap = self.poll()
            except Exception:  # noqa: BLE001 - a status call that failed once: the bar waits for the next
                continue
            if swap is not None and not swap.done:
                if task is not None and epoch != swap.epoch:
                    self._progress.remove_task(task)
                    task = None
                if task is None:
                    task = self._progress.add_task(f"swap to epoch {swap.epoch}", total=swap.batches,
                                                   completed=swap.batch)
                    epoch = swap.epoch
                self._progress.update(task, completed=swap.batch, total=swap.batches, refresh=True)
                self.shown.append((swap.epoch, swap.batch, swap.batches))
            elif task is not None:
                self._progress.remove_task(task)
                task, epoch = None, None
