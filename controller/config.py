"""The controller's configuration: one validated pydantic model, passed explicitly (no env reads)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from ray_eplb.controller.forecast import DEFAULT_SPEC, Forecaster


class ControllerConfig(BaseModel):
    """How the controller watches load and when it moves experts.

    Fields:
        interval_s: period of the control loop (one telemetry round per step).
        window: telemetry rounds kept for "balancedness now" (the recent-load window).
        forecast: what the controller plans on, a :class:`~ray_eplb.controller.forecast.Forecaster`
            spec over the per-round load: ``"ema:ALPHA"`` (default ``forecast.DEFAULT_SPEC``),
            ``"window:W"`` (mean of the last W rounds; ``"window:W:sum"`` their sum) or ``"last"``.
            Rounds that routed no token are not fed to it.
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
        planning: ``incremental`` (default): solve with the current placement as ``old_phy2log``,
            so only slots that pay change, under ``max_moves`` and ``min_layer_gain``; ``fresh``:
            solve from scratch and relabel the result to keep what it can (``align``), every
            rebalance (what published EPLB solvers do; no budget, no hysteresis).
        max_moves: move budget per rebalance: ``None`` (no limit), an int (slots) or a float in
            ``(0, 1]`` (fraction of the slots, rounded up), per layer or in total (``budget_scope``).
            Incremental planning only; not with ``solver_policy="hierarchical"`` (whose plans move
            whole groups).
        budget_scope: ``layer`` (the budget holds for every layer) or ``total`` (summed over layers,
            spent where peak reduction per moved slot is highest).
        min_layer_gain: hysteresis per layer: a layer keeps its placement unless its max GPU load on
            the forecast falls by more than this fraction (``rebalance_experts``' ``min_gain``).
            Incremental planning only.
        transfer_batch_bytes: the swap moves weights in batches in which no rank sends, and none
            receives, more than this many bytes of expert weights (but at least one expert; local
            copies are free and ride in the first batch). All experts of a model have one size, so
            this is ``max(1, transfer_batch_bytes // expert bytes)`` experts per rank and batch
            (``1``: one expert at a time). The default, 64 MiB, is one expert of a large MoE
            (DeepSeek-V3: 3 x 7168 x 2048 bytes in fp8 = 42 MiB) and many of a small one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(default=2.0, gt=0)
    window: int = Field(default=5, gt=0)
    forecast: str = DEFAULT_SPEC
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
    planning: Literal["incremental", "fresh"] = "incremental"
    # Strict: 1 stays a slot count and 1.0 stays a fraction (lax coercion would blur the two).
    max_moves: Union[StrictInt, StrictFloat, None] = None
    budget_scope: Literal["layer", "total"] = "layer"
    min_layer_gain: float = Field(default=0.0, ge=0, lt=1)
    transfer_batch_bytes: int = Field(default=64 * 2**20, gt=0)

    @field_validator("forecast")
    @classmethod
    def _check_forecast(cls, spec: str) -> str:
        return Forecaster.from_spec(spec).spec  # raises ValueError naming a bad spec; normalised

    @field_validator("max_moves")
    @classmethod
    def _check_max_moves(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"max_moves={v} must be >= 1 slot (or None for no limit)")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"max_moves={v} is a fraction of the slots and must lie in (0, 1]")
        return v

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
        if self.planning == "fresh" and (self.max_moves is not None or self.min_layer_gain > 0):
            raise ValueError(
                f"max_moves={self.max_moves} / min_layer_gain={self.min_layer_gain} need planning='incremental' "
                "(a fresh solve has no budget or hysteresis)"
            )
        if self.max_moves is not None and self.solver_policy == "hierarchical":
            raise ValueError(
                f"max_moves={self.max_moves} needs solver_policy 'auto' or 'global': hierarchical plans move whole groups"
            )
        return self
