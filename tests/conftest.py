"""Shared fixtures. The Ray cluster is session-scoped and only starts when a test asks for it
(integration tests); unit tests forbid Ray altogether (tests/unit/conftest.py)."""
import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test run: 2 CPUs, 4 rank slots (``eplb_rank``), no
    dashboard, small object store. Token authentication is off here only: tests, not the product."""
    import ray

    from ray_eplb.actors.ray_worker import RANK_RESOURCE, enable_zero_copy

    os.environ["RAY_AUTH_MODE"] = "disabled"
    enable_zero_copy()
    ray.init(
        address="local", num_cpus=2, resources={RANK_RESOURCE: 4}, include_dashboard=False,
        log_to_driver=False, object_store_memory=512 * 1024**2,
    )
    yield ray
    ray.shutdown()
