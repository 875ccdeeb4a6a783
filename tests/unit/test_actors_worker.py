"""The worker class and its swap protocol, without Ray (in-process peers)."""
import threading

import pytest
import torch

from ray_eplb.actors import (
    ExpertWorker,
    SafetensorsWeightSource,
    StaleEpochError,
    SyntheticWeightSource,
    Transfer,
    local_fetcher,
    swiglu,
    write_checkpoint,
)
from ray_eplb.controller.bench.reference import DenseMoE, TraceGate, mismatched
from ray_eplb.controller.transfer import split_by_rank, transfer_plan
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_layers=2)
SRC = SyntheticWeightSource(hidden_size=16, ffn_size=24, seed=3)


def make_workers(placement=None, source=SRC):
    placement = placement or Placement.identity(TOPO)
    workers = {}
    fetch = local_fetcher(lambda r: workers[r])
    for r in range(TOPO.num_gpus):
        workers[r] = ExpertWorker(r, TOPO, placement.rank_experts(r), source, fetcher=fetch, device="cpu")
    return workers


def shuffled(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(TOPO.num_layers):
        extra = torch.randint(0, TOPO.num_experts, (TOPO.num_slots - TOPO.num_experts,), generator=gen)
        row = torch.cat([torch.arange(TOPO.num_experts), extra])
        rows.append(row[torch.randperm(TOPO.num_slots, generator=gen)])
    return Placement.from_phy2log(TOPO, torch.stack(rows))


def swap(workers, old, new, epoch):
    new = new.with_epoch(epoch)
    per_rank = split_by_rank(transfer_plan(old, new), TOPO.num_gpus)
    for r, w in workers.items():
        assert w.prepare(epoch, per_rank[r], new.rank_experts(r))["status"] == "prepared"
    for w in workers.values():
        assert w.commit(epoch)["status"] == "committed"
    return new


def test_synthetic_source_is_deterministic_and_distinct():
    a, b = SRC.expert(1, 5), SyntheticWeightSource(16, 24, seed=3).expert(1, 5)
    assert a.shape == (3, 24, 16) and torch.equal(a, b)
    assert not torch.equal(a, SRC.expert(1, 6)) and not torch.equal(a, SRC.expert(0, 5))


def test_safetensors_source_round_trips(tmp_path):
    path = write_checkpoint(tmp_path / "experts.safetensors", SRC, num_layers=2, num_experts=3)
    ckpt = SafetensorsWeightSource(path)
    assert (ckpt.hidden_size, ckpt.ffn_size) == (16, 24)
    assert torch.equal(ckpt.expert(1, 2), SRC.expert(1, 2))
    with pytest.raises(KeyError, match="experts.7"):
        ckpt.expert(0, 7)
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(ckpt)).expert(0, 1), SRC.expert(0, 1))


def test_forward_matches_expert_ffn_and_counts_tokens():
    w = make_workers()[1]  # slots 3,4,5 -> experts 3,4,5
    x = torch.randn(5, 16)
    slots = torch.tensor([2, 0, 2, 1, 2])
    y = w.forward(0, 1, slots, x)
    for i, j in enumerate(slots.tolist()):
        assert torch.allclose(y[i], swiglu(x[i : i + 1], SRC.expert(1, 3 + j))[0], atol=1e-6)
    got = w.collect()
    assert got["epochs"] == [0]
    from ray_eplb.actors.worker import decode_counts

    counts = decode_counts(got)[0]
    assert counts.tolist() == [[0, 0, 0], [1, 1, 3]]


def test_forward_rejects_bad_input():
    w = make_workers()[0]
    with pytest.raises(ValueError, match="local slot"):
        w.forward(0, 0, torch.tensor([3]), torch.randn(1, 16))
    with pytest.raises(ValueError, match="layer"):
        w.forward(0, 5, torch.tensor([0]), torch.randn(1, 16))
    with pytest.raises(StaleEpochError):
        w.forward(7, 0, torch.tensor([0]), torch.randn(1, 16))


def test_swap_moves_weights_so_every_slot_holds_its_expert():
    workers = make_workers()
    old = Placement.identity(TOPO)
    new = swap(workers, old, shuffled(1), epoch=1)
    for r, w in workers.items():
        assert w.epoch == 1
        assert torch.equal(w.state()["experts"], new.rank_experts(r))
        assert w.verify() == []
    moved = sum(w.stats.moved for w in workers.values())
    assert moved == int(old.changed_slots(new).sum()) > 0


def test_old_epoch_keeps_serving_until_released():
    workers = make_workers()
    old = Placement.identity(TOPO)
    x = torch.randn(4, 16)
    slots = torch.tensor([0, 1, 2, 0])
    before = workers[0].forward(0, 0, slots, x)
    swap(workers, old, shuffled(2), epoch=1)
    assert torch.equal(workers[0].forward(0, 0, slots, x), before)  # epoch 0 still served as epoch 0
    assert workers[0].release(0)["freed"] == [0]
    with pytest.raises(StaleEpochError):
        workers[0].forward(0, 0, slots, x)


def test_release_waits_for_in_flight_dispatch():
    workers = make_workers()
    swap(workers, Placement.identity(TOPO), Placement.identity(TOPO), epoch=1)
    w = workers[0]
    table = w._tables[0]
    table.in_flight += 1  # a dispatch of epoch 0 is being computed
    assert w.release(0)["freed"] == []
    assert 0 in w.state()["held"]
    table.in_flight -= 1
    w.forward(1, 0, torch.tensor([0]), torch.randn(1, 16))  # any finishing dispatch frees idle tables
    assert w.state()["held"] == [1]


def test_prepare_commit_are_idempotent_and_stale_epochs_ignored():
    workers = make_workers()
    w = workers[0]
    new = shuffled(3).with_epoch(2)
    mine = split_by_rank(transfer_plan(Placement.identity(TOPO), new), TOPO.num_gpus)[0]
    assert w.prepare(2, mine, new.rank_experts(0))["status"] == "prepared"
    assert w.prepare(2, mine, new.rank_experts(0)).get("duplicate")
    assert w.commit(2)["status"] == "committed"
    assert w.commit(2).get("duplicate")
    assert w.prepare(1, [], Placement.identity(TOPO).rank_experts(0))["status"] == "stale"
    assert w.commit(1)["status"] == "stale"
    assert w.commit(9)["status"] == "not_prepared"
    assert w.epoch == 2 and w.verify() == []


def test_abort_drops_staging_and_blocks_late_prepare():
    workers = make_workers()
    w = workers[2]
    new = shuffled(4).with_epoch(1)
    mine = split_by_rank(transfer_plan(Placement.identity(TOPO), new), TOPO.num_gpus)[2]
    assert w.prepare(1, mine, new.rank_experts(2))["status"] == "prepared"
    assert w.abort(1)["status"] == "aborted"
    assert w.commit(1)["status"] == "stale"
    assert w.prepare(1, mine, new.rank_experts(2))["status"] == "stale"  # a late prepare after abort
    assert w.epoch == 0 and w.state()["staged"] is None


def test_abort_after_commit_rolls_back():
    workers = make_workers()
    new = swap(workers, Placement.identity(TOPO), shuffled(5), epoch=1)
    assert workers[1].abort(1)["status"] == "rolled_back"
    assert workers[1].epoch == 0 and workers[1].verify() == []
    assert torch.equal(workers[1].state()["experts"], Placement.identity(TOPO).rank_experts(1))
    assert workers[1].commit(1)["status"] == "stale"  # the rolled-back epoch cannot come back
    assert new.epoch == 1


def test_prepare_rejects_inconsistent_plans():
    w = make_workers()[0]
    new = shuffled(6).with_epoch(1)
    with pytest.raises(ValueError, match="no transfer"):
        w.prepare(1, [], new.rank_experts(0))
    with pytest.raises(ValueError, match="not for rank"):
        w.prepare(1, [Transfer(0, 1, -1, 1, 4)], new.rank_experts(0))


def test_prepare_uses_source_when_no_fetcher():
    w = ExpertWorker(0, TOPO, Placement.identity(TOPO).rank_experts(0), SRC, device="cpu")
    experts = torch.tensor([[7, 6, 5], [1, 1, 2]])
    moves = [Transfer(0, 7, 3, 0, 0), Transfer(0, 6, 2, 0, 1), Transfer(0, 5, 1, 0, 2), Transfer(1, 1, 0, 0, 0)]
    assert w.prepare(1, moves, experts)["status"] == "prepared"
    w.commit(1)
    assert w.verify() == []


def test_dispatch_during_swap_matches_dense_reference():
    """A thread keeps dispatching epoch 0 while the swap to epoch 1 runs; every output must match."""
    workers = make_workers()
    old = Placement.identity(TOPO)
    dense = DenseMoE(SRC, TOPO.num_layers, TOPO.num_experts)
    bad, done = [], threading.Event()

    def serve():
        gen = torch.Generator().manual_seed(0)
        while not done.is_set():
            x = torch.randn(6, 16, generator=gen)
            slots = torch.randint(0, 3, (6,), generator=gen)
            for r, w in workers.items():
                experts = old.rank_experts(r)[1, slots]
                y = w.forward(0, 1, slots, x)
                ref = torch.stack([swiglu(x[i : i + 1], dense.experts[1][int(e)])[0] for i, e in enumerate(experts)])
                bad.append(int(mismatched(y, ref).sum()))

    t = threading.Thread(target=serve)
    t.start()
    try:
        swap(workers, old, shuffled(7), epoch=1)
    finally:
        done.set()
        t.join()
    assert bad and sum(bad) == 0


def test_gate_follows_popularity_and_dense_reference_is_linear_in_weights():
    gate = TraceGate(num_layers=1, hidden_size=16, num_experts=8, top_k=2)
    pop = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 100])
    ids, w = gate(0, torch.randn(400, 16), pop, torch.Generator().manual_seed(0))
    hits = torch.bincount(ids.reshape(-1), minlength=8)
    assert hits[0] > 300 and hits[7] > 300 and torch.allclose(w.sum(-1), torch.ones(400))
    with pytest.raises(ValueError, match="top_k"):
        TraceGate(1, 16, 8, top_k=9)


def test_staging_buffers_are_pooled_and_recycled():
    workers = make_workers()
    w = workers[0]
    start = w.state()["free_buffers"]
    assert start == int(0.25 * TOPO.num_layers * TOPO.slots_per_gpu)
    old = Placement.identity(TOPO)
    new = swap(workers, old, shuffled(8), epoch=1)
    fetched = sum(1 for t in transfer_plan(old, new) if t.dst_rank == 0 and t.src_rank not in (0, -1))
    assert w.state()["free_buffers"] == max(0, start - fetched)
    ids = lambda t: {id(x) for row in t.weights for x in row}  # noqa: E731
    unused = len(ids(w._tables[0]) - ids(w._tables[1]))  # buffers only the retired table uses
    assert fetched > 0 and unused > 0
    before = w.state()["free_buffers"]
    w.release(0)
    assert w.state()["free_buffers"] == min(start, before + unused)  # the pool keeps what was pre-touched
    assert w.verify() == []
