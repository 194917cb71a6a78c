"""What Studio's fallback banner reads: ``fallback`` of each environment in
GET /api/v1/environments, decided by the router's own routing rule
(``RoutingTable.resolve`` with the scheduler's binding statuses), with the
time this router first saw the current binding failed. Pure: a routing
state built by hand, the clock patched."""
from __future__ import annotations

import pytest

from services.router import api, table
from services.router.table import BindingEntry, EnvironmentEntry, RoutingState

ENV = "env-stg"
NEW, OLD = "dep_00000000000b", "dep_00000000000a"


@pytest.fixture
def state() -> RoutingState:
    s = RoutingState()
    s.table.upsert_environment(EnvironmentEntry(ENV, "prj-1", "shop", "staging", NEW, sequence=2,
                                                previous_deployment_id=OLD))
    s.table.upsert_binding(BindingEntry("prj-1", ENV, NEW, "active", True), "shop")
    s.table.upsert_binding(BindingEntry("prj-1", ENV, OLD, "active", False), "shop")
    return s


def report(state: RoutingState, **statuses: str) -> None:
    """One scheduler snapshot: binding statuses by deployment id."""
    state.endpoints.replace(
        [(ENV, dep, ["10.0.0.1:8080"] if status == "running" else []) for dep, status in statuses.items()],
        {(ENV, dep): status for dep, status in statuses.items()},
    )


def fallback(state: RoutingState) -> dict[str, str] | None:
    return api.RestApi(services=None, state=state).fallback(ENV)  # type: ignore[arg-type]


def test_fallback_names_the_previous_deployment_and_when_the_failure_was_first_seen(state, monkeypatch) -> None:
    clock = iter([1_800_000_000.0, 1_800_000_060.5, 1_800_000_120.0, 1_800_000_180.0, 1_800_000_240.0])
    monkeypatch.setattr(table.time, "time", lambda: next(clock))
    report(state, **{NEW: "deploying", OLD: "running"})
    assert fallback(state) is None  # not failed (yet): the pointer's deployment serves
    report(state, **{NEW: "failed", OLD: "running"})
    assert fallback(state) == {"deployment_id": OLD, "since": "2027-01-15T08:01:00.500Z"}
    report(state, **{NEW: "failed", OLD: "running"})  # still failed: the time stays the first one seen
    assert fallback(state) == {"deployment_id": OLD, "since": "2027-01-15T08:01:00.500Z"}
    report(state, **{NEW: "running", OLD: "running"})  # recovered
    assert fallback(state) is None
    report(state, **{NEW: "failed", OLD: "running"})  # failed again: a new "since"
    assert fallback(state) == {"deployment_id": OLD, "since": "2027-01-15T08:04:00.000Z"}


def test_no_fallback_without_an_active_previous_binding(state) -> None:
    state.table.upsert_binding(BindingEntry("prj-1", ENV, OLD, "terminated", False), "shop")
    report(state, **{NEW: "failed"})
    assert fallback(state) is None  # the router answers from the failed pointer, so the banner says nothing


def test_no_fallback_for_unknown_or_empty_environments(state) -> None:
    report(state, **{NEW: "failed", OLD: "running"})
    assert api.RestApi(services=None, state=state).fallback("env-unknown") is None  # type: ignore[arg-type]
    state.table.upsert_environment(EnvironmentEntry("env-new", "prj-1", "shop", "qa", ""))
    assert api.RestApi(services=None, state=state).fallback("env-new") is None  # type: ignore[arg-type]
