"""Studio's live parts in headless Chromium (Debian's, driven by Playwright)
against a real platform: the traffic charts drawn from real requests'
figures, a promote made through the CLI appearing in the open page without
a reload (pushed by the watch's server-sent events: the page's status timer
is stopped first, so nothing but the push can show it), and the feed
reconnecting and resuming (Last-Event-ID) after the router is killed and
restarted. Console errors and uncaught exceptions fail a test, except the
browser's own network lines while the router is down."""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from playwright import sync_api as playwright_api

from berth import local
from tests.studio.test_studio_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Studio, expect, sign_in
from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
REQUESTS = 30


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[RunningPlatform]:
    p = RunningPlatform(tmp_path_factory.mktemp("studio-live") / "data")
    p.data_dir.mkdir()
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def studio(browser) -> Iterator[Studio]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    s = Studio(page)
    page.on("console", lambda m: s.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: s.errors.append(f"pageerror: {exc}"))
    yield s
    context.close()


def rest(platform: RunningPlatform, key: str, path: str) -> Any:
    request = urllib.request.Request(f"{platform.router}/api/v1{path}", headers={"X-API-KEY": key})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def preview_binding(platform: RunningPlatform, key: str, deployment: str) -> dict[str, Any]:
    (binding,) = [b for b in rest(platform, key, f"/deployments/{deployment}/status")["bindings"]
                  if b["environment"] == "preview"]
    return binding


@pytest.fixture(scope="module")
def project(platform) -> tuple[str, str]:
    """A project with a deployment running in preview that served REQUESTS
    requests."""
    key = platform.cli_json("projects", "create", "live")["api_key"]
    first = platform.cli_json("deploy", "--image", build_worker_image(engine(), version="l1")[0], "--project", "live",
                              api_key=key)["deployment"]["id"]
    eventually(lambda: preview_binding(platform, key, first)["status"] == "running", timeout=90,
               what="the deployment running")
    for _ in range(REQUESTS):
        assert platform.get("live", "preview", "/cgi-bin/index.cgi").status_code == 200
    return key, first


def stop_status_polling(studio: Studio) -> None:
    """From here on only the watch's events can change the page. Also notes
    when each deployment first shows as the current one (``__shownAt``)."""
    studio.page.evaluate("""() => {
        clearInterval(state.timer);
        window.__notReloaded = true;
        window.__shownAt = {};
        new MutationObserver(() => {
            const current = document.getElementById("current-deployment");
            if (current && !(current.textContent in window.__shownAt)) window.__shownAt[current.textContent] = Date.now();
        }).observe(document.getElementById("panel"), { childList: true, subtree: true });
    }""")


def print_push_delay(studio: Studio, platform: RunningPlatform, key: str, environment: str, deployment: str) -> None:
    """How long after the move committed (its history entry's time) the page
    showed it: a figure printed, not asserted."""
    entries = rest(platform, key, f"/environments/{environment}/promotions")["entries"]
    committed = datetime.fromisoformat(entries[-1]["created_at"].replace("Z", "+00:00")).timestamp() * 1000
    shown = studio.page.evaluate(f"() => window.__shownAt[{json.dumps(deployment)}]")
    print(f"STUDIO_PUSH move committed -> shown in the page: {shown - committed:.0f} ms")


def test_traffic_charts_render_the_scheduler_figures(platform, project, studio) -> None:
    key, first = project
    def all_reported() -> bool:  # every router worker's report in
        figures = preview_binding(platform, key, first)["requests"]
        return figures is not None and figures["last_five_minutes"]["requests"] == REQUESTS

    eventually(all_reported, timeout=30, what="the requests in the status")
    page = studio.page
    sign_in(studio, platform, key)
    page.get_by_role("tab", name="preview").click()
    expect(page.locator("#current-deployment")).to_have_text(first)
    expect(page.locator("#traffic figure")).to_have_count(3)
    for chart in ("#chart-rps", "#chart-errors", "#chart-p99"):
        expect(page.locator(f"{chart} svg .dot").first).to_be_attached()
        assert int(page.locator(f"{chart} svg").get_attribute("data-points") or 0) >= 1
        assert page.locator(f"{chart} svg polyline").count() == 1
    expect(page.locator("#chart-errors .value")).to_have_text("0.0%")
    expect(page.locator("#traffic-five")).to_contain_text(f"Last 5 minutes: {REQUESTS} requests")
    rps = page.locator("#chart-rps .value").inner_text()
    assert rps.endswith("/s") and float(rps.removesuffix("/s")) > 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-01-traffic.png"), full_page=True)
    studio.assert_no_errors()


def test_a_cli_promote_appears_without_reload_and_the_feed_resumes_after_a_router_restart(
    platform, project, studio
) -> None:
    key, first = project
    second = platform.cli_json("deploy", "--image", build_worker_image(engine(), version="l2")[0],
                               "--project", "live", api_key=key)["deployment"]["id"]
    page = studio.page
    sign_in(studio, platform, key)
    live = page.locator("#live-status")
    expect(live).to_have_attribute("data-state", "live")
    page.get_by_role("tab", name="production").click()
    expect(page.locator("#panel")).to_contain_text("Nothing deployed to production yet.")
    stop_status_polling(studio)

    platform.cli_json("promote", first, "--to", "production", "--yes", "--project", "live", api_key=key)
    expect(page.locator("#current-deployment")).to_have_text(first)
    assert page.evaluate("() => window.__notReloaded === true")
    print_push_delay(studio, platform, key, "production", first)
    revision = int(live.get_attribute("data-revision") or 0)
    assert revision > 0

    # Kill the router (supervisor and workers): the stream breaks; berth up starts a new router.
    records = {r.name: r for r in local.recorded_processes(platform.data_dir / local.RUN_DIR) if r.running()}
    victims = [r for name, r in records.items() if name == "router" or name.startswith("router-worker-")]
    assert any(r.name == "router" for r in victims)
    for victim in victims:
        os.kill(victim.pid, signal.SIGKILL)
    eventually(lambda: not any(v.running() for v in victims), timeout=10, what="the router processes gone")
    eventually(lambda: requests.get(platform.router + "/healthz", timeout=2).status_code == 200, timeout=60,
               what="a new router healthy")
    expect(live).to_have_attribute("data-resumed", "true")  # reconnected with Last-Event-ID: no full snapshot
    expect(live).to_have_attribute("data-state", "live")

    # A move after the reconnect is pushed too, still without a reload.
    platform.cli_json("promote", second, "--to", "production", "--yes", "--project", "live", api_key=key)
    expect(page.locator("#current-deployment")).to_have_text(second)
    assert page.evaluate("() => window.__notReloaded === true")
    print_push_delay(studio, platform, key, "production", second)
    assert int(live.get_attribute("data-revision") or 0) > revision
    page.screenshot(path=str(ARTIFACTS / "live-02-after-router-restart.png"), full_page=True)
    # While the router was down the browser logged its failed requests; nothing else.
    unexpected = [e for e in studio.take_errors() if "Failed to load resource" not in e and "net::ERR_" not in e]
    assert unexpected == []
