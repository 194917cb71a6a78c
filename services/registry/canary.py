"""Canaries: the pure part (no storage, no RPC): a canary's record, its plan's
validation and its step machine. The registry stores a canary as JSON on its
environment (``environments.canary``, migration 0006) and moves it only with
a compare-and-swap on the environment's sequence; the controller (the
scheduler's leader, services/scheduler/canary.py) decides, this module says
what each decision does to the record.

States: running -> paused -> running; running|paused -> aborted (weight 0);
running|paused -> promoted (the pointer moves to the candidate, 100%).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from berth.errors import Aborted, FailedPrecondition, InvalidArgument

MAX_STEPS = 20
MAX_BAKE_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_ERROR_RATE_INCREASE = 0.01  # one percentage point of 5xx
DEFAULT_MAX_LATENCY_RATIO = 1.2  # candidate p99 <= stable p99 x 1.2
DEFAULT_MIN_REQUESTS = 100


class State(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    PROMOTED = "promoted"


ACTIVE_STATES = (State.RUNNING, State.PAUSED)


@dataclass(frozen=True)
class Step:
    weight: int
    bake_seconds: int


@dataclass(frozen=True)
class Thresholds:
    max_error_rate_increase: float = DEFAULT_MAX_ERROR_RATE_INCREASE
    max_latency_ratio: float = DEFAULT_MAX_LATENCY_RATIO
    min_requests: int = DEFAULT_MIN_REQUESTS


@dataclass(frozen=True)
class Canary:
    stable_deployment_id: str
    candidate_deployment_id: str
    steps: tuple[Step, ...]
    thresholds: Thresholds
    state: State
    step: int
    candidate_weight: int
    step_started_at: datetime
    actor: str = ""
    reason: str = ""
    last_analysis: str = ""
    last_analysis_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "stable_deployment_id": self.stable_deployment_id,
            "candidate_deployment_id": self.candidate_deployment_id,
            "steps": [[s.weight, s.bake_seconds] for s in self.steps],
            "thresholds": dataclasses.asdict(self.thresholds),
            "state": self.state.value,
            "step": self.step,
            "candidate_weight": self.candidate_weight,
            "step_started_at": self.step_started_at.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
            "last_analysis": self.last_analysis,
            "last_analysis_at": self.last_analysis_at.isoformat() if self.last_analysis_at else "",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Canary:
        return cls(
            stable_deployment_id=data["stable_deployment_id"],
            candidate_deployment_id=data["candidate_deployment_id"],
            steps=tuple(Step(int(w), int(b)) for w, b in data["steps"]),
            thresholds=Thresholds(**data["thresholds"]),
            state=State(data["state"]),
            step=int(data["step"]),
            candidate_weight=int(data["candidate_weight"]),
            step_started_at=_parse_time(data["step_started_at"]),
            actor=data.get("actor", ""),
            reason=data.get("reason", ""),
            last_analysis=data.get("last_analysis", ""),
            last_analysis_at=_parse_time(data["last_analysis_at"]) if data.get("last_analysis_at") else None,
        )


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# ---- validation -----------------------------------------------------------

def validate_steps(steps: list[tuple[int, int]]) -> tuple[Step, ...]:
    if not steps:
        raise InvalidArgument("a canary needs at least one step (weight and bake time)", field="steps")
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"a canary has at most {MAX_STEPS} steps, got {len(steps)}", field="steps")
    previous = 0
    out = []
    for index, (weight, bake) in enumerate(steps):
        if not 1 <= weight <= 99:
            raise InvalidArgument(
                f"step {index + 1}: weight {weight} is outside 1-99 (100% is the promotion that ends the canary)",
                field="steps",
            )
        if weight <= previous:
            raise InvalidArgument(
                f"step {index + 1}: weight {weight} does not increase on the step before ({previous})", field="steps"
            )
        if not 1 <= bake <= MAX_BAKE_SECONDS:
            raise InvalidArgument(
                f"step {index + 1}: bake time {bake} s is outside 1 s-{MAX_BAKE_SECONDS} s", field="steps"
            )
        previous = weight
        out.append(Step(weight, bake))
    return tuple(out)


def validate_thresholds(
    max_error_rate_increase: float, max_latency_ratio: float, min_requests: int
) -> Thresholds:
    """0 (unset) takes the default."""
    rate = max_error_rate_increase or DEFAULT_MAX_ERROR_RATE_INCREASE
    ratio = max_latency_ratio or DEFAULT_MAX_LATENCY_RATIO
    minimum = min_requests or DEFAULT_MIN_REQUESTS
    if not 0 < rate <= 1:
        raise InvalidArgument(f"max_error_rate_increase {rate} is outside (0, 1]", field="thresholds.max_error_rate_increase")
    if not 1 <= ratio <= 100:
        raise InvalidArgument(f"max_latency_ratio {ratio} is outside [1, 100]", field="thresholds.max_latency_ratio")
    if not 1 <= minimum <= 10_000_000:
        raise InvalidArgument(f"min_requests {minimum} is outside 1-10000000", field="thresholds.min_requests")
    return Thresholds(rate, ratio, minimum)


# ---- the step machine -----------------------------------------------------

def start(
    stable: str, candidate: str, steps: tuple[Step, ...], thresholds: Thresholds, *, now: datetime, actor: str,
    reason: str,
) -> Canary:
    return Canary(
        stable_deployment_id=stable, candidate_deployment_id=candidate, steps=steps, thresholds=thresholds,
        state=State.RUNNING, step=0, candidate_weight=steps[0].weight, step_started_at=now, actor=actor,
        reason=reason,
    )


def _require(canary: Canary | None, environment: str) -> Canary:
    if canary is None:
        raise FailedPrecondition(
            f"environment {environment!r} has no canary", reason="NO_CANARY", resource_name=environment,
            hint=f"start one: berth promote ID --to {environment} --canary 10:5m,50:10m",
        )
    return canary


def pause(canary: Canary | None, environment: str, *, reason: str) -> Canary:
    canary = _require(canary, environment)
    if canary.state != State.RUNNING:
        raise FailedPrecondition(
            f"the canary of {environment!r} is {canary.state.value}, not running", reason="CANARY_NOT_RUNNING",
            resource_name=environment,
        )
    return dataclasses.replace(canary, state=State.PAUSED, reason=reason or "paused")


def resume(canary: Canary | None, environment: str, *, now: datetime, reason: str) -> Canary:
    canary = _require(canary, environment)
    if canary.state != State.PAUSED:
        raise FailedPrecondition(
            f"the canary of {environment!r} is {canary.state.value}, not paused", reason="CANARY_NOT_PAUSED",
            resource_name=environment,
        )
    # The step bakes again in full: what it saw before the pause is not
    # what it will see after.
    return dataclasses.replace(canary, state=State.RUNNING, step_started_at=now, reason=reason or "resumed")


def require_active(canary: Canary | None, environment: str) -> Canary:
    canary = _require(canary, environment)
    if not canary.active:
        raise FailedPrecondition(
            f"the canary of {environment!r} already ended ({canary.state.value})", reason="CANARY_ENDED",
            resource_name=environment,
        )
    return canary


def abort(canary: Canary, *, reason: str, analysis: str = "", now: datetime | None = None) -> Canary:
    return dataclasses.replace(
        canary, state=State.ABORTED, candidate_weight=0, reason=reason,
        last_analysis=analysis or canary.last_analysis, last_analysis_at=now or canary.last_analysis_at,
    )


def promoted(canary: Canary, *, reason: str, analysis: str = "", now: datetime | None = None) -> Canary:
    return dataclasses.replace(
        canary, state=State.PROMOTED, candidate_weight=100, reason=reason,
        last_analysis=analysis or canary.last_analysis, last_analysis_at=now or canary.last_analysis_at,
    )


def baked(canary: Canary, now: datetime) -> bool:
    """The current step has baked its full time."""
    return (now - canary.step_started_at).total_seconds() >= canary.steps[canary.step].bake_seconds


def is_last_step(canary: Canary) -> bool:
    return canary.step >= len(canary.steps) - 1


def next_step(canary: Canary, *, now: datetime, analysis: str) -> Canary:
    """The next step of a canary not at its last step."""
    index = canary.step + 1
    return dataclasses.replace(
        canary, step=index, candidate_weight=canary.steps[index].weight, step_started_at=now,
        last_analysis=analysis, last_analysis_at=now,
    )


def check_step(canary: Canary, environment: str, expected_step: int) -> None:
    """The controller's compare-and-swap on the step it read."""
    if canary.step != expected_step:
        raise Aborted(
            f"the canary of {environment!r} is at step {canary.step + 1}, not {expected_step + 1}",
            reason="STEP_CONFLICT", metadata={"step": str(canary.step)},
        )
