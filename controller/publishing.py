"""Publishing maps to routers: the long poll routers subscribe with (``wait_map``), the map in force
for a restarted worker or an operator (``current_map``), the routers' leases and acks, and the
release of retired epochs once no live router routes with them. A mixin of
:class:`~ray_eplb.controller.balancer.EplbController` (uses its ``placement``, ``_placements``,
``_routers``, ``_retired``, ``config``, ``_sync``, ``_fire``, ``_recovered`` and ``recover``)."""
from __future__ import annotations

import asyncio
import time

from ray_eplb.topology import Placement


class Publishing:
    """Routers' subscription to the controller's maps, and the release of retired epochs."""

    async def _publish(self, new: Placement) -> None:
        _, cond = self._sync()
        async with cond:
            self.placement = new
            self._placements[new.epoch] = new
            for e in sorted(self._placements)[:-8]:
                del self._placements[e]
            cond.notify_all()

    async def wait_map(self, known_epoch: int, router_id: str | None = None, timeout_s: float = 10.0) -> Placement | None:
        """Long poll for routers: the current placement as soon as its epoch is newer than
        ``known_epoch``, or ``None`` after ``timeout_s``. Polling with ``known_epoch`` acks that map."""
        await self._ready()
        if router_id is not None:
            self._routers[router_id] = (known_epoch, time.monotonic())
            self._maybe_release()
        _, cond = self._sync()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.placement.epoch > known_epoch), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.placement

    async def current_map(self) -> Placement | None:
        """The placement in force once no round is under way (``None`` while the store cannot be
        read). Operators and tests ask for it; a restarted worker reads the store itself."""
        lock, _ = self._sync()
        async with lock:
            await self._ready()
            return self.placement if self._recovered else None

    def _maybe_release(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, (_, seen) in self._routers.items() if now - seen >= self.config.router_ttl_s]:
            del self._routers[rid]  # its lease lapsed: a router that polls again is registered again
        live = [e for e, _ in self._routers.values()]
        for epoch, retired_at in sorted(self._retired.items()):
            if all(e > epoch for e in live) or now - retired_at >= self.config.release_timeout_s:
                del self._retired[epoch]
                self._fire("release", epoch)

    async def forget_router(self, router_id: str) -> bool:
        """A router closed: stop waiting for its acks (True if it was registered)."""
        found = self._routers.pop(router_id, None) is not None
        self._maybe_release()
        return found
