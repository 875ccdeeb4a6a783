"""Unit tests run without Ray: any attempt to start or join a cluster fails the test."""
import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray (use tests/integration)")

    monkeypatch.setattr(ray, "init", refuse)
