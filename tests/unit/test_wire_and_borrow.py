"""Weights on the wire (pieces under Ray's threaded-copy size, rejoined without a copy) and a worker
serving borrowed replies (kept as received, never pooled, under a byte cap), without Ray."""
import gc
import threading

import numpy as np
import pytest
import torch
from test_actors_worker import SRC, TOPO, swap  # the same 2 x 2 x 3-slot group and its two-phase swap

from ray_eplb.actors import ExpertWorker, SyntheticWeightSource, swiglu
from ray_eplb.actors.protocol import PIECE_BYTES, pack_reply, unpack_reply
from ray_eplb.actors.staging import Staging
from ray_eplb.controller.transfer import transfer_plan
from ray_eplb.topology import Placement


@pytest.mark.parametrize("shape,dtype", [((3, 600, 256), torch.float32), ((3, 24, 16), torch.bfloat16), ((2, 3), torch.float16)])
def test_pack_unpack_round_trips_in_pieces_and_rejoins_without_copy(shape, dtype):
    ts = [torch.randn(shape).to(dtype) for _ in range(3)]
    reply = pack_reply(ts)
    nbytes = ts[0].numel() * ts[0].element_size()
    for pieces in reply["pieces"]:
        assert all(len(p) <= PIECE_BYTES for p in pieces) and sum(len(p) for p in pieces) == nbytes
        assert len(pieces) == -(-nbytes // PIECE_BYTES)
    out = unpack_reply(reply)
    assert all(torch.equal(a, b) and b.dtype == dtype and tuple(b.shape) == shape for a, b in zip(ts, out))
    # The pieces are views of the source's memory lying end to end, so the result is a view too.
    assert all(b.data_ptr() == a.data_ptr() for a, b in zip(ts, out))


def test_unpack_copies_pieces_that_do_not_lie_end_to_end():
    t = torch.randn(3, 600, 256)
    reply = pack_reply([t])
    reply["pieces"][0] = [p.copy() for p in reply["pieces"][0]]  # scattered: each piece its own memory
    (out,) = unpack_reply(reply)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()


def test_pack_refuses_a_reply_of_mixed_shapes():
    with pytest.raises(ValueError, match=r"mixes torch.float32 \(2, 2\)"):
        pack_reply([torch.zeros(3, 3), torch.zeros(2, 2)])
    assert unpack_reply(pack_reply([])) == []


def test_borrow_keeps_replies_under_the_cap_and_never_pools_them():
    st = Staging(torch.device("cpu"), threading.Lock(), borrow_bytes=2 * 96)
    st.prewarm(torch.zeros(3, 4, 2), 1)
    a = [torch.randn(3, 4, 2), torch.randn(3, 4, 2)]  # one reply: 192 bytes
    assert not st.borrow(a, zero_copy=False)  # not an immutable object-store reply: copy it
    assert st.borrow(a, zero_copy=True) and st.borrowed_bytes == 192 and st.borrowed_total == 192
    b = [torch.randn(3, 4, 2)]
    assert not st.borrow(b, zero_copy=True)  # over the cap
    assert st.borrow(b, zero_copy=True, capped=False)  # a benchmark of the path may ignore it
    st.recycle([a[0], a[1], b[0]], live=set())
    assert len(st.pool) == 1 and not any(p is x for p in st.pool for x in a + b)  # borrowed: dropped
    del a[0]
    gc.collect()
    assert st.borrowed_bytes == 192 + 96  # reply a stays pinned while one of its tensors lives
    a.clear(), b.clear()
    gc.collect()
    assert st.borrowed_bytes == 0
    with pytest.raises(ValueError, match="stage_borrow_bytes=-1"):
        Staging(torch.device("cpu"), threading.Lock(), borrow_bytes=-1)




class WireFetcher:
    """In-process peers reached through the wire format, each reply in memory of its own (read
    only), like an object-store reply: what a worker may borrow."""

    zero_copy = True

    def __init__(self, workers):
        self.workers = workers

    def __call__(self, requests, timeout_s):
        out = {}
        for r, items in requests.items():
            reply = pack_reply(self.workers[r].export(items))
            reply["pieces"] = [[np.frombuffer(np.concatenate(ps).tobytes(), np.uint8)] for ps in reply["pieces"]]
            out[r] = unpack_reply(reply)
        return out


def make_workers(borrow_bytes=None, source=SRC):
    workers = {}
    fetch = WireFetcher(workers)
    p = Placement.identity(TOPO)
    for r in range(TOPO.num_gpus):
        workers[r] = ExpertWorker(r, TOPO, p.rank_experts(r), source, fetcher=fetch, device="cpu",
                                  stage_borrow_bytes=borrow_bytes)
    return workers


def rotated(placement, shift):
    return Placement.from_phy2log(TOPO, torch.roll(placement.phy2log, shift, dims=1))


def test_workers_serve_borrowed_weights_and_release_them_with_their_table():
    workers = make_workers()
    old = Placement.identity(TOPO)
    new = swap(workers, old, rotated(old, 3), epoch=1)  # every slot moves to another rank
    states = [w.state() for w in workers.values()]
    assert all(s["borrowed_total"] > 0 and s["borrowed_total"] == s["fetched_bytes"] for s in states)
    assert all(w.verify() == [] for w in workers.values())
    x = torch.randn(4, 16)
    w0 = workers[0]
    y = w0.forward(1, 0, torch.tensor([0, 1, 2, 0]), x)
    assert torch.isfinite(y).all()
    for w in workers.values():
        w.release(0)
    swap(workers, new, rotated(new, 3), epoch=2)
    cap = TOPO.num_layers * TOPO.slots_per_gpu * 3 * 24 * 16 * 4  # default: the bytes of a rank's slots
    pinned = sum(w.staging.borrowed_bytes for w in workers.values())  # epoch 1's replies and epoch 2's
    for w in workers.values():
        w.release(1)
        st = w.state()
        assert st["borrowed_total"] < st["fetched_bytes"]  # the cap made the second swap copy some
        assert st["borrowed_bytes"] <= cap
        assert not any(getattr(b, "_eplb_borrowed", False) for b in w.staging.pool)
        assert w.verify() == []
    # Epoch 1's replies that epoch 2 no longer uses are let go (a reply some kept slot still uses
    # stays pinned as a whole).
    assert sum(w.staging.borrowed_bytes for w in workers.values()) < pinned
    stagings = [w.staging for w in workers.values()]
    workers.clear()
    del w, w0
    gc.collect()
    assert all(st.borrowed_bytes == 0 for st in stagings)  # no table left: every reply is released


def test_a_zero_cap_copies_every_fetched_expert():
    workers = make_workers(borrow_bytes=0)
    old = Placement.identity(TOPO)
    swap(workers, old, rotated(old, 3), epoch=1)
    assert all(w.state()["borrowed_total"] == 0 and w.verify() == [] for w in workers.values())


@pytest.mark.parametrize("borrow_bytes", [None, 0])
def test_bf16_experts_move_as_bf16_and_serve_any_activation_dtype(borrow_bytes):
    src = SyntheticWeightSource(hidden_size=16, ffn_size=24, seed=3, dtype=torch.bfloat16)
    workers = make_workers(borrow_bytes, source=src)
    old = Placement.identity(TOPO)
    new = swap(workers, old, rotated(old, 3), epoch=1)  # every slot crosses the wire
    for w in workers.values():
        assert w.verify() == []  # bit-exact against the bf16 source
        assert all(t.dtype == torch.bfloat16 for row in w._tables[1].weights for t in row)
    remote = sum(t.src_rank != t.dst_rank for t in transfer_plan(old, new))
    assert remote > 0
    assert sum(w.state()["fetched_bytes"] for w in workers.values()) == remote * 3 * 24 * 16 * 2  # 2 bytes each
    x = torch.randn(5, 16)  # float32 activations meet bf16 experts
    slots = torch.tensor([0, 2, 1, 0, 2])
    y = workers[1].forward(1, 1, slots, x)
    assert y.dtype == torch.float32
    for i, j in enumerate(slots.tolist()):
        e = int(new.rank_experts(1)[1, j])
        want = swiglu(x[i : i + 1].to(torch.bfloat16), src.expert(1, e)).float()  # computed in bf16
        assert torch.equal(y[i : i + 1], want)
    assert workers[1].forward(1, 1, slots, x.to(torch.bfloat16)).dtype == torch.bfloat16
