"""The canary controller's analysis rule and step machine, table-driven,
with an injected clock (services/scheduler/canary.py and the registry's
services/registry/canary.py)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from berth import enums
from berth.v1 import common_pb2
from services.registry import canary as machine
from services.router.metrics import BUCKETS
from services.scheduler.canary import Action, Analysis, Thresholds, Verdict, analyse, decide
from services.scheduler.request_metrics import Window

T = Thresholds(max_error_rate_increase=0.01, max_latency_ratio=1.2, min_requests=100)
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def window(requests: int, errors: int = 0, latency: float = 0.004) -> Window:
    """``requests`` with ``errors`` 5xx, all in the bucket of ``latency``."""
    buckets = [0] * (len(BUCKETS) + 1)
    index = next((i for i, b in enumerate(BUCKETS) if latency <= b), len(BUCKETS))
    buckets[index] = requests
    return Window(requests=requests, by_class=[requests - errors, 0, 0, errors], latency_sum=latency * requests,
                  bounds=BUCKETS, buckets=buckets)


@pytest.mark.parametrize(("candidate", "stable", "verdict"), [
    (None, window(1000), Verdict.WAIT),                               # no candidate figures yet
    (window(99, errors=99), window(1000), Verdict.WAIT),              # below min_requests: not judged
    (window(100), window(1000), Verdict.PASS),
    (window(100, errors=1), window(1000), Verdict.PASS),              # 1.0% = stable + 1 point: allowed
    (window(100, errors=2), window(1000), Verdict.FAIL),              # 2.0% > 0% + 1 point
    (window(1000, errors=60), window(1000, errors=50), Verdict.PASS),  # 6% <= 5% + 1
    (window(1000, errors=70), window(1000, errors=50), Verdict.FAIL),  # 7% > 5% + 1
    (window(200, errors=60), None, Verdict.FAIL),                     # no stable traffic: against 0%
    (window(200, latency=0.2), window(1000, latency=0.04), Verdict.FAIL),    # p99 ~0.25 > 0.05 x 1.2
    (window(200, latency=0.045), window(1000, latency=0.04), Verdict.PASS),  # same bucket
    (window(200, latency=0.009), window(1000, latency=0.004), Verdict.PASS),  # within the 25 ms slack
    (window(200, latency=0.2), window(50, latency=0.004), Verdict.PASS),     # stable too few to compare latency
])
def test_analysis_rule(candidate: Window | None, stable: Window | None, verdict: Verdict) -> None:
    result = analyse(candidate, stable, T)
    print(verdict.value, "->", result.words)
    assert result.verdict is verdict
    assert result.words


def canary(state: str = "running", step: int = 0, started: datetime = T0, last: str = "") -> common_pb2.Canary:
    ts = Timestamp()
    ts.FromDatetime(started)
    return common_pb2.Canary(
        candidate_deployment_id="dep_c", stable_deployment_id="dep_s", candidate_weight=[10, 50][step],
        steps=[common_pb2.Canary.Step(weight=10, bake_seconds=60), common_pb2.Canary.Step(weight=50, bake_seconds=300)],
        step=step, step_started_at=ts, state=enums.number(common_pb2.Canary.State, state), last_analysis=last,
    )


OK = Analysis(Verdict.PASS, "fine")
BAD = Analysis(Verdict.FAIL, "5xx")
WAIT = Analysis(Verdict.WAIT, "few")


@pytest.mark.parametrize(("state", "step", "analysis", "elapsed", "last", "action"), [
    ("running", 0, OK, 59, "", Action.RECORD),       # baking: records the verdict
    ("running", 0, OK, 59, "fine", Action.NONE),     # the same verdict again: nothing to write
    ("running", 0, OK, 60, "", Action.ADVANCE),      # baked and passing
    ("running", 0, WAIT, 600, "", Action.RECORD),    # baked but not judgeable yet: never advances
    ("running", 0, BAD, 1, "", Action.ABORT),        # fails: aborts at once, whatever the bake time
    ("running", 1, OK, 299, "fine", Action.NONE),
    ("running", 1, OK, 300, "", Action.ADVANCE),     # the last step: the registry promotes to 100%
    ("paused", 0, BAD, 600, "", Action.NONE),        # paused: neither judged nor moved
    ("aborted", 0, OK, 600, "", Action.NONE),
    ("promoted", 1, OK, 600, "", Action.NONE),
])
def test_step_decision(state: str, step: int, analysis: Analysis, elapsed: int, last: str, action: Action) -> None:
    assert decide(canary(state, step, last=last), analysis, T0 + timedelta(seconds=elapsed)) is action


def test_registry_step_machine_with_clock() -> None:
    plan = machine.validate_steps([(10, 60), (50, 300)])
    c = machine.start("dep_s", "dep_c", plan, machine.Thresholds(), now=T0, actor="ci", reason="")
    assert (c.state, c.step, c.candidate_weight) == (machine.State.RUNNING, 0, 10)
    assert not machine.baked(c, T0 + timedelta(seconds=59)) and machine.baked(c, T0 + timedelta(seconds=60))
    c = machine.next_step(c, now=T0 + timedelta(seconds=61), analysis="ok")
    assert (c.step, c.candidate_weight, c.step_started_at) == (1, 50, T0 + timedelta(seconds=61))
    assert machine.is_last_step(c)
    with pytest.raises(Exception) as caught:
        machine.check_step(c, "staging", 0)
    assert getattr(caught.value, "reason", "") == "STEP_CONFLICT"
    paused = machine.pause(c, "staging", reason="")
    resumed = machine.resume(paused, "staging", now=T0 + timedelta(seconds=500), reason="")
    assert resumed.state is machine.State.RUNNING and resumed.step_started_at == T0 + timedelta(seconds=500)
    aborted = machine.abort(resumed, reason="bad")
    assert aborted.candidate_weight == 0 and not aborted.active
    assert machine.Canary.from_json(aborted.to_json()) == aborted
    done = machine.promoted(c, reason="all steps")
    assert done.candidate_weight == 100 and done.state is machine.State.PROMOTED
