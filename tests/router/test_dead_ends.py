"""No dead ends that wait (issue 12, item 9): a terminated deployment is
answered at once, and the fallback to a previous deployment that was scaled
to zero wakes it like any activation instead of waiting for a timeout."""
from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from services.router.control import Activator
from services.router.platform import Platform
from services.router.proxy import ProxySettings
from services.router.table import EnvironmentEntry, Route
from tests.router.backends import Backend, RouterHarness, wait_until

HEADERS = {"X-Berth-Project": "shop", "X-Berth-Environment": "production"}


@pytest.fixture
def harness() -> Iterator[RouterHarness]:
    # An activation timeout far above the request timeouts below: a request
    # that waited for it would fail these tests rather than pass slowly.
    r = RouterHarness(ProxySettings(activation_timeout=60.0, upstream_timeout=10.0), Platform())
    r.environment("env-prod", "shop", "production", "dep-a")
    r.binding("env-prod", "dep-a", "shop")
    yield r
    r.close()


def get(harness: RouterHarness, timeout: float = 5.0) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=HEADERS)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def test_terminated_deployment_is_answered_at_once_with_what_to_run(harness: RouterHarness) -> None:
    calls: list[Route] = []

    async def activate(route: Route) -> str:
        calls.append(route)
        return "terminated"

    harness.proxy.activator = Activator(activate, hold=5.0)
    harness.binding("env-prod", "dep-a", "shop", state="terminated")
    resp, body = get(harness)
    error = json.loads(body)["error"]
    assert resp.status == 503 and error["code"] == "deployment_terminated"
    assert "berth deployment start dep-a" in error["message"]
    assert resp.getheader("X-Berth-Deployment") == "dep-a"
    assert calls == []  # nothing to wake: it was terminated on purpose


def test_fallback_to_a_previous_deployment_scaled_to_zero_wakes_it(harness: RouterHarness) -> None:
    previous = Backend("previous")
    calls: list[Route] = []

    async def activate(route: Route) -> str:
        calls.append(route)
        # The scheduler starts a replica of the previous binding.
        harness.state.endpoints.replace(
            [("env-prod", "dep-a", [previous.address]), ("env-prod", "dep-b", [])],
            {("env-prod", "dep-b"): "failed", ("env-prod", "dep-a"): "running"},
        )
        return "deploying"

    try:
        entry = EnvironmentEntry("env-prod", "id-shop", "shop", "production", "dep-b", sequence=2,
                                 previous_deployment_id="dep-a")
        harness.on_loop(lambda: harness.state.table.upsert_environment(entry))
        harness.binding("env-prod", "dep-b", "shop")
        harness.on_loop(lambda: harness.state.endpoints.replace(
            [("env-prod", "dep-a", []), ("env-prod", "dep-b", [])],
            {("env-prod", "dep-b"): "failed", ("env-prod", "dep-a"): "scaled_to_zero"},
        ))
        harness.proxy.activator = Activator(activate, hold=5.0)
        resp, body = get(harness)
        assert resp.status == 200 and json.loads(body)["backend"] == "previous"
        assert resp.getheader("X-Berth-Deployment") == "dep-a" and resp.getheader("X-Berth-Fallback") == "1"
        wait_until(lambda: len(calls) == 1, what="one activation")
        assert (calls[0].deployment_id, calls[0].fallback) == ("dep-a", True)
    finally:
        previous.close()
