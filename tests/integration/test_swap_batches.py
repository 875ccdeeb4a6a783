"""A budgeted rebalance on the real runtime: exactly the planned slots move, in several batches, and
every other slot keeps its weights."""
import pytest
import torch

pytestmark = pytest.mark.timeout(120)


def test_a_budgeted_rebalance_moves_exactly_the_planned_slots_in_batches(runtime):
    import ray

    from ray_eplb.controller.bench.reference import mismatched
    from ray_eplb.topology import Placement

    ctl, topo = runtime.controller, runtime.topology
    s = topo.slots_per_gpu
    before_cfg = ray.get(ctl.status.remote()).config
    # Start from the round-robin placement, so the plan below does not depend on earlier tests.
    ray.get(ctl.apply_placement.remote(Placement.identity(topo).phy2log))
    ray.get(ctl.reconfigure.remote(max_moves=3, min_gain=0.0, forecast="last", transfer_batch_bytes=1))
    try:
        ray.get(ctl.telemetry.remote())  # drain: plan on the load below only
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):  # expert 0 carries most tokens, expert 5 some, in both layers
            ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(64)])  # [N, 2]
            ids[:48, 0] = 0
            ids[:16, 1] = 5
            x, w = torch.randn(64, 16, generator=gen), torch.full((64, 2), 0.5)
            for layer in range(topo.num_layers):
                assert int(mismatched(runtime.router.dispatch(layer, x, ids, w), runtime.dense(layer, x, ids, w)).sum()) == 0
        old = ray.get(ctl.current_map.remote()).phy2log  # [L, R]
        before = ray.get([h.state.remote() for h in runtime.workers])
        rec = ray.get(ctl.rebalance_now.remote())
        after = ray.get([h.state.remote() for h in runtime.workers])
        new = ray.get(ctl.current_map.remote()).phy2log
    finally:
        ray.get(ctl.reconfigure.remote(**{k: before_cfg[k] for k in ("max_moves", "min_gain", "forecast", "transfer_batch_bytes")}))
    assert rec["action"] == "committed", rec
    changed = old != new  # [L, R]
    assert int(changed.sum()) == rec["moved"] and changed.sum(1).max() <= 3  # the budget per layer
    assert rec["budget_slots"] == 3 * topo.num_layers and rec["budget_used"] <= 1
    assert rec["batches"] >= 2, rec  # at least one rank sent or received more than one expert
    assert torch.equal(torch.cat([st["experts"] for st in after], 1), new)
    expert_bytes = runtime.source.expert(0, 0).numel() * 4
    for r, (b, a) in enumerate(zip(before, after)):
        # Each rank staged exactly its changed slots; all other slots share the old tensors.
        assert a["moved"] - b["moved"] == int(changed[:, r * s : (r + 1) * s].sum())
        assert a["fetched_bytes"] - b["fetched_bytes"] <= (a["moved"] - b["moved"]) * expert_bytes
    assert sum(a["fetched_bytes"] - b["fetched_bytes"] for b, a in zip(before, after)) == rec["bytes_moved"]
    # Identity: every slot, moved or not, computes with the weights of the expert the map names.
    assert ray.get([h.verify.remote() for h in runtime.workers]) == [[]] * topo.num_gpus
    hist = ray.get(ctl.history.remote())[-1]
    assert (hist["epoch"], hist["moved"], hist["batches"], hist["bytes_moved"]) == \
        (rec["epoch"], rec["moved"], rec["batches"], rec["bytes_moved"])
