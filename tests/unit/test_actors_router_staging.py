"""Routing arithmetic and the staging area, without Ray."""
import threading
import time

import pytest
import torch

from ray_eplb.actors.protocol import Transfer
from ray_eplb.actors.router import route
from ray_eplb.actors.staging import Staging
from ray_eplb.topology import Placement, Topology

TOPO = Topology(num_nodes=1, gpus_per_node=4, slots_per_gpu=3, num_experts=8, num_layers=1)


def test_route_spreads_an_expert_evenly_over_its_replicas():
    phy = torch.tensor([[0, 1, 2, 0, 3, 4, 0, 5, 6, 1, 7, 2]])  # expert 0 x3, 1 x2, 2 x2
    p = Placement.from_phy2log(TOPO, phy)
    ids = torch.zeros(30, 1, dtype=torch.int64)  # 30 tokens all to expert 0
    slots = route(p, 0, ids)
    assert torch.bincount(slots, minlength=12)[[0, 3, 6]].tolist() == [10, 10, 10]
    mixed = torch.tensor([[1, 2], [1, 2], [1, 7], [3, 2]])
    got = route(p, 0, mixed, offset=1)
    assert all(int(phy[0, s]) == int(e) for s, e in zip(got, mixed.reshape(-1)))  # never the wrong expert
    with pytest.raises(ValueError, match="expert ids"):
        route(p, 0, torch.tensor([[8]]))


def test_staging_reuses_pooled_buffers_and_recycles_once():
    st = Staging(torch.device("cpu"), threading.Lock())
    like = torch.zeros(3, 4, 2)
    st.prewarm(like, 2)
    buf_ids = {id(b) for b in st.pool}
    w = torch.randn(3, 4, 2)
    own = st.own(w, copy=True)
    assert id(own) in buf_ids and torch.equal(own, w) and own.data_ptr() != w.data_ptr()
    assert st.own(w) is w  # a tensor we may keep is not copied
    st.recycle([own, own, w], live={id(w)})
    assert len(st.pool) == 2 and sum(b is own for b in st.pool) == 1
    with pytest.raises(ValueError, match="stage_duty"):
        Staging(torch.device("cpu"), threading.Lock(), duty=0)


def test_paced_fetch_rests_between_chunks_and_stops_on_abort():
    st = Staging(torch.device("cpu"), threading.Lock(), duty=0.5, chunk_bytes=2 * 96)  # 2 experts a chunk
    calls = []

    def fetcher(requests, timeout_s):
        calls.append(sum(len(v) for v in requests.values()))
        time.sleep(0.05)
        return {r: [torch.full((3, 4, 2), float(e)) for _, e in items] for r, items in requests.items()}

    placed = {}
    moves = [Transfer(0, e, 1 + e % 2, 0, e) for e in range(5)]
    t0 = time.monotonic()
    assert st.fetch_paced(fetcher, moves, lambda t, w: placed.__setitem__(t.dst_slot, w), lambda: False, 5.0, 96)
    assert calls == [2, 2, 1] and all(float(placed[e][0, 0, 0]) == e for e in range(5))
    assert time.monotonic() - t0 >= 3 * 0.05 + 2 * 0.05 * 0.9  # busy half the time: a rest after each chunk but the last
    calls.clear()
    assert not st.fetch_paced(fetcher, moves, lambda t, w: None, lambda: True, 5.0, 96)
    assert calls == [2]  # aborted after the first chunk
