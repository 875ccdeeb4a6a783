"""Calling every worker at once under a deadline, never blocking the event loop on one of them.

Workers are handle-likes: ``worker.method.remote(*args)`` returns an awaitable (a Ray ``ObjectRef``,
or a coroutine in unit tests).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Sequence


async def wait_for(x: Awaitable) -> Any:
    """``await x`` as a coroutine (``asyncio.ensure_future`` takes ObjectRefs and coroutines alike)."""
    return await x


async def fanout(workers: Sequence[Any], method: str, args: Sequence[tuple] | dict[int, tuple],
                 timeout_s: float) -> tuple[dict, dict]:
    """Call ``method(*args[rank])`` on every worker (``args`` a sequence, index = rank) or on the
    ranks ``args`` names (a dict); ``({rank: result}, {rank: error})`` by the deadline (a worker
    that has not answered by then is reported, and its call cancelled)."""
    calls = args.items() if isinstance(args, dict) else enumerate(args)
    tasks = {asyncio.ensure_future(wait_for(getattr(workers[r], method).remote(*a))): r for r, a in calls}
    if not tasks:
        return {}, {}
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    results, failures = {}, {}
    for t in pending:
        t.cancel()
        failures[tasks[t]] = f"no answer within {timeout_s:g} s"
    for t in done:
        exc = t.exception()
        if exc is None:
            results[tasks[t]] = t.result()
        else:
            failures[tasks[t]] = f"{type(exc).__name__}: {exc}"
    return results, failures
