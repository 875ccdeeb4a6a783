"""The controller's recorded loads for export (``recorded_loads``, behind ``ray-eplb loads``): the
window's rounds one row each, the total since start past the window's end, the placement in force."""
import asyncio

import torch
from fakes import TOPO, make, serve

from ray_eplb.controller.config import ControllerConfig
from ray_eplb.topology import Placement

QUIET = ControllerConfig(interval_s=0.5, collect_timeout_s=0.2, window=2, trigger="periodic", rebalance_period_s=600)


def test_rounds_window_and_total_follow_what_the_workers_served():
    ctl, workers, _ = make(QUIET)
    p0 = Placement.identity(TOPO)

    async def go():
        empty = await ctl.recorded_loads()
        for n in (5, 7, 11):  # three rounds; the window keeps the last two
            serve(workers, p0, 0, 2, n)
            serve(workers, p0, 1, 4, 2 * n)
            await ctl.step()
        return empty, await ctl.recorded_loads()

    empty, rec = asyncio.run(go())
    assert empty["window"] == [] and torch.tensor(empty["total"]).sum() == 0
    window = torch.tensor(rec["window"])  # [T, L, E]
    assert window.shape == (2, TOPO.num_layers, TOPO.num_experts)
    assert window[:, 0, 2].tolist() == [7, 11] and window[:, 1, 4].tolist() == [14, 22]
    assert window.sum() == 7 + 11 + 14 + 22  # nothing else counted
    total = torch.tensor(rec["total"])  # [L, E], past the window
    assert total[0, 2] == 23 and total[1, 4] == 46 and total.sum() == 69
    assert rec["rounds"] == 3 and rec["epoch"] == 0
    assert torch.equal(torch.tensor(rec["phy2log"]), p0.phy2log) and rec["topology"] == TOPO.model_dump()
