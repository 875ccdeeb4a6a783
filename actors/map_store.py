"""The balancer's durable state: the last committed map, the one being committed, the next epoch
number and whether the control loop should run. Kept in Ray's GCS key-value store, so it outlives
the controller and every worker (Ray restarts them; the GCS stays), and read by both.

One JSON record per balancer (key ``ray_eplb:state``, in the balancer's namespace)::

    {"topology": {...}, "epoch": 7, "digest": "9f...", "phy2log": [[...]],   # committed map [L, R]
     "pending": null | {"epoch": 8, "digest": "...", "phy2log": [[...]]},     # being committed
     "next_epoch": 9, "loop": "running" | "stopped" | "idle"}

Only the controller writes it; a restarted worker reads it to load the committed map without
waiting for the controller. :class:`MemoryStore` is the same interface in a dict (unit tests, no Ray).
"""
from __future__ import annotations

import json
from typing import Any

KEY = b"ray_eplb:state"


class MemoryStore:
    """The store in memory (plain Python; what unit tests and single-process use get)."""

    def __init__(self) -> None:
        self._record: dict | None = None

    def load(self) -> dict | None:
        """The stored record (a copy), or ``None`` when nothing was stored."""
        return None if self._record is None else json.loads(json.dumps(self._record))

    def save(self, record: dict) -> None:
        self._record = json.loads(json.dumps(record))

    def clear(self) -> None:
        self._record = None


class MapStore(MemoryStore):
    """The store in Ray's GCS key-value store under the balancer's ``namespace`` (needs a Ray
    connection: a driver after ``ray.init`` or an actor)."""

    def __init__(self, namespace: str):
        super().__init__()
        self.namespace = namespace

    @staticmethod
    def _kv() -> Any:
        # Ray's GCS key-value API: what Ray's own libraries (Serve, Tune) keep their state in.
        from ray.experimental import internal_kv

        return internal_kv

    def load(self) -> dict | None:
        raw = self._kv()._internal_kv_get(KEY, namespace=self.namespace)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"the stored balancer state in namespace {self.namespace!r} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"the stored balancer state in namespace {self.namespace!r} is not a JSON object")
        return record

    def save(self, record: dict) -> None:
        self._kv()._internal_kv_put(KEY, json.dumps(record).encode(), overwrite=True, namespace=self.namespace)

    def clear(self) -> None:
        self._kv()._internal_kv_del(KEY, namespace=self.namespace)
