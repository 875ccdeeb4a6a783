"""The Ray Serve example's deployment on the test run's runtime: a real ``serve.run`` and deployment
handle, every response equal to the dense single-process reference before and after a forced
rebalance, and the replica's router moving to the new epoch.

The deployment attaches by name to the test run's controller and workers (``conftest.runtime``:
2 layers x 8 experts, hidden 16, FFN 32, weight seed 5), as it would to any running ray-eplb. Serve
runs without its HTTP proxy (no port to collide with) and is shut down at the end, so the tests
after this one find the cluster as before; the controller's configuration and placement are put
back too (the placement as a new epoch of the same map)."""
import time

import pytest
import torch
from examples_loader import load_example

pytestmark = pytest.mark.timeout(180)
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[serve]')")


@pytest.fixture(scope="module")
def served(runtime):
    import ray

    from ray_eplb.actors.ray_worker import NAMESPACE

    ex = load_example("serve_moe.py")
    topo = runtime.topology
    spec = ex.ModelSpec(num_layers=topo.num_layers, num_experts=topo.num_experts, top_k=2,
                        hidden_size=runtime.source.hidden_size, ffn_size=runtime.source.ffn_size, vocab_size=64,
                        seed=runtime.source.seed)
    ctl = runtime.controller
    before, placement = ray.get([ctl.status.remote(), ctl.current_map.remote()])
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    try:
        app = ex.MoEServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(spec, NAMESPACE)
        handle = serve.run(app, name="eplb_serve_test", route_prefix=None)
        yield ex, spec, handle
    finally:
        serve.shutdown()
        ray.get(ctl.reconfigure.remote(**{k: before.config[k] for k in ("min_gain", "forecast")}))
        ray.get(ctl.apply_placement.remote(placement.phy2log))


def check(ex, spec, dense, out, x):
    """The served output and routing equal the dense reference's on the same input."""
    from ray_eplb.controller.bench.reference import mismatched

    ref, ref_experts = ex.GatedStack(spec).forward(x, dense)
    assert torch.equal(out["experts"], ref_experts)  # [L, N, K]: the replica's gate is the reference's
    assert int(mismatched(out["hidden"], ref).sum()) == 0
    assert len(out["epochs"]) == spec.num_layers


def test_served_moe_matches_the_dense_reference_across_a_forced_rebalance(runtime, served):
    import ray

    from ray_eplb.solver import balancedness
    from ray_eplb.topology import Placement

    ex, spec, handle = served
    ctl, topo = runtime.controller, runtime.topology
    stack = ex.GatedStack(spec)
    # Start from the round-robin map and plan on the traffic below only.
    ray.get(ctl.apply_placement.remote(Placement.identity(topo).phy2log))
    ray.get(ctl.reconfigure.remote(min_gain=0.0, forecast="last"))
    ray.get(ctl.telemetry.remote())
    epoch0 = ray.get(ctl.status.remote()).epoch

    gen = torch.Generator().manual_seed(3)
    hot = torch.tensor([5, 40])
    load = torch.zeros(topo.num_layers, topo.num_experts, dtype=torch.int64)  # [L, E] from the responses
    for _ in range(6):  # token ids, 85% of them two hot tokens; three requests in flight at a time
        batch = [ex.traffic(spec, 48, hot, gen) for _ in range(3)]
        for ids, resp in [(ids, handle.tokens.remote(ids)) for ids in batch]:
            out = resp.result(timeout_s=60)
            check(ex, spec, runtime.dense, out, stack.embed(ids))
            assert out["epochs"] == [epoch0] * spec.num_layers
            load += torch.stack([torch.bincount(e.reshape(-1), minlength=topo.num_experts) for e in out["experts"]])
    x = torch.randn(32, spec.hidden_size, generator=gen)  # hidden states in, not token ids
    check(ex, spec, runtime.dense, handle.forward.remote(x).result(timeout_s=60), x)

    rec = ray.get(ctl.rebalance_now.remote())
    assert rec["action"] == "committed", rec
    assert rec["epoch"] > epoch0 and rec["moved"] > 0
    st = ray.get(ctl.current_map.remote())
    assert st.epoch == rec["epoch"]
    # The rebalance followed the load the deployment served: better balanced on it than the round-robin map.
    old, new = Placement.identity(topo), st
    g = topo.num_gpus
    assert balancedness(new.phy2log, new.logcnt, load, g) > balancedness(old.phy2log, old.logcnt, load, g) + 0.01

    # The replica's router picks the new map up from its subscription; until then it still serves
    # the old epoch (kept until routers ack or release_timeout_s), and every answer stays exact.
    deadline, out = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        ids = ex.traffic(spec, 48, hot, gen)
        out = handle.tokens.remote(ids).result(timeout_s=60)
        check(ex, spec, runtime.dense, out, stack.embed(ids))
        if out["epochs"] == [rec["epoch"]] * spec.num_layers:
            break
        time.sleep(0.1)
    assert out["epochs"] == [rec["epoch"]] * spec.num_layers
    check(ex, spec, runtime.dense, handle.forward.remote(x).result(timeout_s=60), x)
    routers = ray.get(ctl.status.remote()).routers
    assert rec["epoch"] in routers.values()  # the replica's router acked the new map
