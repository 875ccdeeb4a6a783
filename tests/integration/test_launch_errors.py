"""Workers asked for what the cluster cannot give fail in seconds, saying what is missing (the test
cluster has no GPU and 4 rank slots on one node)."""
import time

import pytest

from ray_eplb.actors import SyntheticWeightSource
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
SOURCE = SyntheticWeightSource(hidden_size=8, ffn_size=16)


@pytest.mark.timeout(60)
def test_cuda_workers_on_a_cluster_without_gpus_fail_in_seconds(ray_session):
    from ray_eplb.actors.ray_worker import launch_workers

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"device='cuda': the Ray cluster has no GPU \(its resources: .*CPU=2"):
        launch_workers(TOPO, Placement.identity(TOPO), SOURCE, device="cuda", namespace="launch-errors")
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(60)
def test_more_ranks_than_the_nodes_offer_fail_before_waiting(ray_session):
    from ray_eplb.actors.ray_worker import launch_workers

    big = TOPO.model_copy(update={"num_nodes": 3})  # 3 x 2 rank slots; the one node offers 4
    with pytest.raises(RuntimeError, match=r"need 2 eplb_rank on each of 3 node\(s\).*offer 4 eplb_rank \(room for 2\)"):
        launch_workers(big, Placement.identity(big), SOURCE, device="cpu", namespace="launch-errors", ready_timeout_s=600)


@pytest.mark.timeout(60)
def test_placement_not_ready_names_the_missing_resource(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from ray_eplb.actors.ray_worker import RANK_RESOURCE, launch_workers

    free = ray_session.available_resources().get(RANK_RESOURCE, 0)
    hold = placement_group([{RANK_RESOURCE: free}]) if free else None  # whatever other tests left free
    try:
        if hold is not None:
            ray_session.get(hold.ready(), timeout=30)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"not placed within 2 s: 2 node\(s\) x 2 ranks need 2 eplb_rank.*0 eplb_rank free"):
            launch_workers(TOPO, Placement.identity(TOPO), SOURCE, device="cpu", namespace="launch-errors", ready_timeout_s=2)
        assert time.monotonic() - t0 < 15
    finally:
        if hold is not None:
            remove_placement_group(hold)
