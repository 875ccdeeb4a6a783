"""The controller's configuration: one validated pydantic model, passed explicitly (no env reads)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ControllerConfig(BaseModel):
    """How the controller watches load and when it moves experts.

    Fields:
        interval_s: period of the control loop (one telemetry round per step).
        window: telemetry rounds kept for "balancedness now" (the recent-load window).
        ema_alpha: smoothing of the load forecast, ``f = a * round_load + (1 - a) * f`` (1.0: no memory).
        trigger: ``periodic`` (every ``rebalance_period_s``), ``drift`` (when the current placement's
            balancedness on the recent window falls below ``drift_threshold``) or ``both``.
        rebalance_period_s: minimum time between periodic rebalances.
        drift_threshold: balancedness below which the drift trigger fires.
        min_gain: act only when the new placement's predicted balancedness on the forecast beats the
            current one's by at least this much (absolute; a forced rebalance ignores it).
        min_tokens: rounds with fewer routed tokens in the window do not trigger anything.
        collect_timeout_s, prepare_timeout_s, commit_timeout_s, abort_timeout_s: per-call deadlines.
        release_timeout_s: a retired epoch is released on the workers once every router has acked the
            new map, or after this long at the latest (a router that did not ack by then re-routes on
            its next dispatch).
        router_ttl_s: a router that has not polled for this long is no longer waited for.
        solver_policy, solver_method: passed to ``rebalance_experts``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(default=2.0, gt=0)
    window: int = Field(default=5, gt=0)
    ema_alpha: float = Field(default=0.5, gt=0, le=1)
    trigger: Literal["periodic", "drift", "both"] = "both"
    rebalance_period_s: float = Field(default=30.0, gt=0)
    drift_threshold: float = Field(default=0.9, gt=0, le=1)
    min_gain: float = Field(default=0.01, ge=0, lt=1)
    min_tokens: int = Field(default=1, ge=0)
    collect_timeout_s: float = Field(default=1.0, gt=0)
    prepare_timeout_s: float = Field(default=30.0, gt=0)
    commit_timeout_s: float = Field(default=5.0, gt=0)
    abort_timeout_s: float = Field(default=5.0, gt=0)
    release_timeout_s: float = Field(default=10.0, gt=0)
    router_ttl_s: float = Field(default=30.0, gt=0)
    solver_policy: Literal["auto", "hierarchical", "global"] = "auto"
    solver_method: Literal["hybrid_tail", "dhondt"] = "hybrid_tail"

    @model_validator(mode="after")
    def _check(self) -> "ControllerConfig":
        if self.collect_timeout_s >= self.interval_s:
            raise ValueError(
                f"collect_timeout_s={self.collect_timeout_s} must be shorter than interval_s={self.interval_s}: "
                "a round must end before the next one starts"
            )
        if self.trigger in ("periodic", "both") and self.rebalance_period_s < self.interval_s:
            raise ValueError(
                f"rebalance_period_s={self.rebalance_period_s} is shorter than interval_s={self.interval_s}"
            )
        if self.release_timeout_s < self.commit_timeout_s:
            raise ValueError(
                f"release_timeout_s={self.release_timeout_s} must be >= commit_timeout_s={self.commit_timeout_s}"
            )
        return self
