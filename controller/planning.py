"""What the controller solves each rebalance: the next placement from the forecast and the current one.

Two ways, chosen by ``ControllerConfig.planning`` (a forced rebalance may ask for ``fresh``):

* ``incremental``: ``rebalance_experts(forecast, old_phy2log=current, max_moves, budget_scope,
  min_gain=min_layer_gain)``: only slots that pay change, within the move budget, and layers whose
  peak would fall by too little keep their placement (hysteresis).
* ``fresh``: solve from scratch, then relabel the result to keep what it can (``align``: every
  GPU keeps its expert set, so the balance is the fresh solve's). What published EPLB solvers do.

Pure functions (no Ray, no I/O): the controller runs :func:`solve` in a thread.
"""
from __future__ import annotations

import torch

from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.transfer import align
from ray_eplb.topology import Placement, Topology, plan


def decide(config: ControllerConfig, force: bool, have_forecast: bool, window_tokens: float,
           balancedness_now: float | None, since_rebalance_s: float) -> str | None:
    """Why to rebalance now (``"forced"``, ``"drift"``, ``"periodic"``), or ``None`` not to: the
    trigger needs a forecast and at least ``min_tokens`` in the window; drift fires below
    ``drift_threshold``, periodic after ``rebalance_period_s``."""
    if force:
        return "forced"
    if not have_forecast or window_tokens < max(config.min_tokens, 1):
        return None
    trig = config.trigger
    if trig in ("drift", "both") and balancedness_now is not None and balancedness_now < config.drift_threshold:
        return "drift"
    if trig in ("periodic", "both") and since_rebalance_s >= config.rebalance_period_s:
        return "periodic"
    return None


def solve(topology: Topology, forecast: torch.Tensor, current: Placement, config: ControllerConfig,
          *, fresh: bool = False, epoch: int = 0) -> Placement:
    """The placement to move to, planned on ``forecast [L, E]`` (float64) from ``current``.

    ``fresh`` (or ``config.planning == "fresh"``): a from-scratch solve aligned to ``current``
    (no budget, no hysteresis); otherwise incremental from ``current`` under the config's budget
    and hysteresis. Returns a placement numbered ``epoch``.
    """
    kw = dict(policy=config.solver_policy, method=config.solver_method)
    if fresh or config.planning == "fresh":
        return align(current, plan(topology, forecast, epoch=epoch, **kw))
    if config.max_moves is not None:
        kw.update(max_moves=config.max_moves, budget_scope=config.budget_scope)
    return plan(topology, forecast, epoch=epoch, old_phy2log=current.phy2log, min_gain=config.min_layer_gain, **kw)


def budget_slots(topology: Topology, config: ControllerConfig, fresh: bool = False) -> int | None:
    """Slots one rebalance may change in all, summed over layers (``None``: no limit).

    An int ``max_moves`` counts slots (per layer, or in total with ``budget_scope="total"``); a
    fraction is of a layer's slots (or of all slots), rounded up as the solver rounds it.
    """
    if fresh or config.planning == "fresh" or config.max_moves is None:
        return None
    from ray_eplb.solver.budgets import budget_per_layer

    per_layer, total = budget_per_layer(config.max_moves, topology.num_layers, topology.num_slots, config.budget_scope)
    if total is not None:
        return min(total, topology.num_layers * topology.num_slots)
    return int(per_layer.clip(max=topology.num_slots).sum())
