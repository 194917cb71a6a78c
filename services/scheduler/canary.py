"""The canary controller: the leader's loop that judges and moves every
running canary (issue 20).

It lives in the scheduler because the scheduler's leader holds the routers'
request windows per binding (``request_metrics.py``); the canary's state
lives in the registry (``Environment.canary``), so the loop is
level-triggered: each pass reads the canaries from the desired table (the
registry's watch), judges each from the last minute's figures, and asks the
registry to move it with ``AdvanceCanary``, a compare-and-swap on the
environment's sequence and the step it read. A controller that restarts (or
a new leader) re-reads and re-judges; a move it repeats is refused by the
swap, never applied twice.

The analysis rule (``analyse``), per pass, on the last minute's windows of
the candidate's and the stable's bindings:

- fewer than ``min_requests`` candidate requests: wait (no verdict);
- candidate 5xx rate > stable 5xx rate + ``max_error_rate_increase``: fail;
- candidate p99 > stable p99 x ``max_latency_ratio`` (judged only when the
  stable has served ``min_requests`` too, and with ``LATENCY_SLACK`` absolute
  slack since the histogram's buckets are coarse at millisecond latencies):
  fail. The routers' histograms give p50/p99; p99 is used (not p95).
- otherwise: pass.

The step machine (``decide``): a failing verdict aborts at once (weight 0,
a ``canary_aborted`` deployment error); a passing verdict after the step's
bake time advances (the last step ends with a promote to 100%); anything
else only records the verdict when it changed.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

import grpc

from berth import enums
from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import common_pb2
from services.common.remote import DEFAULT_DEADLINE, channel, credentials

from .desired import DesiredTable
from .events import EventKind, EventStore
from .request_metrics import RequestMetricsStore, Window

log = logging.getLogger("berth.scheduler.canary")

DEFAULT_INTERVAL = 10.0
LATENCY_SLACK = 0.025  # seconds of p99 difference never judged (coarse histogram buckets)


class Verdict(Enum):
    WAIT = "wait"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    words: str


@dataclass(frozen=True)
class Thresholds:
    max_error_rate_increase: float
    max_latency_ratio: float
    min_requests: int


def analyse(candidate: Window | None, stable: Window | None, thresholds: Thresholds) -> Analysis:
    """The rule in the module's doc, on one window per side."""
    cand = candidate or Window()
    base = stable or Window()
    if cand.requests < thresholds.min_requests:
        return Analysis(Verdict.WAIT, f"candidate served {cand.requests} of the {thresholds.min_requests} requests "
                                      "needed to judge it")
    cand_rate, base_rate = cand.error_rate, base.error_rate
    figures = (f"candidate 5xx {cand_rate * 100:.1f}% over {cand.requests} requests, stable {base_rate * 100:.1f}% "
               f"over {base.requests}")
    if cand_rate > base_rate + thresholds.max_error_rate_increase:
        return Analysis(Verdict.FAIL, f"{figures}: more than {thresholds.max_error_rate_increase * 100:.1f} points "
                                      "above the stable")
    cand_p99, base_p99 = cand.quantile(0.99), base.quantile(0.99)
    latency = f"p99 {cand_p99 * 1000:.1f} ms vs {base_p99 * 1000:.1f} ms"
    if base.requests >= thresholds.min_requests and cand_p99 > max(
        base_p99 * thresholds.max_latency_ratio, base_p99 + LATENCY_SLACK
    ):
        return Analysis(Verdict.FAIL, f"{figures}; {latency}: above {thresholds.max_latency_ratio:g}x the stable")
    return Analysis(Verdict.PASS, f"{figures}; {latency}")


class Action(Enum):
    NONE = "none"
    RECORD = "record"
    ADVANCE = "advance"
    ABORT = "abort"


def decide(canary: common_pb2.Canary, analysis: Analysis, now: datetime) -> Action:
    """What the controller asks of the registry for one running canary."""
    if enums.label(common_pb2.Canary.State, canary.state) != "running":
        return Action.NONE
    if analysis.verdict is Verdict.FAIL:
        return Action.ABORT
    step = canary.steps[canary.step] if 0 <= canary.step < len(canary.steps) else None
    if step is None:
        return Action.NONE
    started = canary.step_started_at.ToDatetime(tzinfo=UTC)
    if analysis.verdict is Verdict.PASS and (now - started).total_seconds() >= step.bake_seconds:
        return Action.ADVANCE
    return Action.RECORD if analysis.words != canary.last_analysis else Action.NONE


def thresholds_of(canary: common_pb2.Canary) -> Thresholds:
    t = canary.thresholds
    return Thresholds(t.max_error_rate_increase or 0.01, t.max_latency_ratio or 1.2, int(t.min_requests or 100))


class CanaryController:
    """Runs while this scheduler leads (``LeaderDuties``); one pass per
    ``interval`` seconds, bounded by the number of canaries."""

    def __init__(
        self, table: DesiredTable, metrics: RequestMetricsStore, events: EventStore, registry_address: str,
        service_token: str, *, interval: float = DEFAULT_INTERVAL, clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._table = table
        self._metrics = metrics
        self._events = events
        self._address = registry_address
        self._token = service_token
        self.interval = interval
        self._clock = clock or (lambda: datetime.now(UTC))
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_internal_pb2_grpc.RegistryInternalStub | None = None

    def _registry(self) -> registry_internal_pb2_grpc.RegistryInternalStub:
        if self._stub is None:
            self._channel = channel(self._address)
            self._stub = registry_internal_pb2_grpc.RegistryInternalStub(self._channel)
        return self._stub

    async def run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next pass re-reads everything (level-triggered)
                log.exception("canary_pass_failed")
            await asyncio.sleep(self.interval)

    async def pass_once(self) -> list[tuple[str, Action]]:
        done: list[tuple[str, Action]] = []
        for env in self._table.environments():
            if not env.HasField("canary"):
                continue
            action = await self._judge(env)
            if action is not Action.NONE:
                done.append((env.id, action))
        return done

    async def _judge(self, env: common_pb2.Environment) -> Action:
        canary = env.canary
        if enums.label(common_pb2.Canary.State, canary.state) != "running":
            return Action.NONE
        cand = self._metrics.figures((env.id, canary.candidate_deployment_id))
        stable = self._metrics.figures((env.id, canary.stable_deployment_id))
        analysis = analyse(cand.last_minute if cand else None, stable.last_minute if stable else None,
                           thresholds_of(canary))
        action = decide(canary, analysis, self._clock())
        if action is Action.NONE:
            return action
        try:
            await self._registry().AdvanceCanary(
                registry_internal_pb2.AdvanceCanaryRequest(
                    project=env.project_id, environment=env.id, expected_sequence=env.sequence, step=canary.step,
                    action=enums.number(registry_internal_pb2.AdvanceCanaryRequest.Action, action.value),
                    analysis=analysis.words,
                ),
                metadata=credentials(self._token), timeout=DEFAULT_DEADLINE,
            )
        except grpc.aio.AioRpcError as exc:
            # ABORTED: someone moved it first (or this move was applied
            # already): the next pass re-reads. Others: retried next pass.
            log.info("canary_move_refused", extra={"environment": env.id, "action": action.value,
                                                   "code": exc.code().name, "detail": exc.details()})
            return Action.NONE
        log.info("canary_moved", extra={"environment": env.id, "action": action.value, "analysis": analysis.words})
        if action is Action.ABORT:
            self._events.record(
                EventKind.CANARY_ABORTED, message=f"canary into {env.name!r} aborted: {analysis.words}",
                project_id=env.project_id, deployment_id=canary.candidate_deployment_id, environment_id=env.id,
                environment=env.name,
            )
        return action

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None
