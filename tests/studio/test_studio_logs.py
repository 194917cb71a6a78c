"""Studio's logs panel (issue 16) in headless Chromium against a real
platform: a line a replica prints after the page opened shows up in the
open page (the live tail over server-sent events), with its stream; the
replica and text filters narrow what is shown, and pause stops the redraw
until resumed. Console errors and uncaught exceptions fail the test."""
from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright import sync_api as playwright_api

from berth import local
from tests.cli.test_logs_cli import worker_dir
from tests.studio.test_studio_browser import CHROMIUM, CHROMIUM_ARGS, Studio, expect, sign_in
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled
from tests.support.platform import RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[RunningPlatform]:
    p = RunningPlatform(tmp_path_factory.mktemp("studio-logs") / "data")
    p.data_dir.mkdir()
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


@pytest.fixture
def studio() -> Iterator[Studio]:
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        s = Studio(page)
        page.on("console", lambda m: s.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: s.errors.append(f"pageerror: {exc}"))
        yield s
        browser.close()


def test_logs_panel_tails_a_line_printed_after_the_page_opened(platform, studio, tmp_path: pathlib.Path) -> None:
    project = f"s{uuid.uuid4().hex[:8]}"
    key = platform.cli_json("projects", "create", project)["api_key"]
    platform.cli_json("deploy", str(worker_dir(tmp_path / "w", project)), "--project", project, api_key=key)

    sign_in(studio, platform, key)
    page: Any = studio.page
    page.get_by_role("tab", name="preview").click()
    lines = page.locator("#logs-lines")
    expect(lines).to_contain_text("worker starting on port 8080")  # the backlog (tail)
    expect(page.locator("#logs-status")).to_have_text("live")
    assert "query=opened" not in lines.inner_text()

    # Printed after the page opened: one line per request, on stderr.
    assert platform.get(project, "preview", "/cgi-bin/index.cgi?opened").status_code == 200
    served = lines.locator(".log-line.stderr", has_text="query=opened")
    expect(served).to_have_count(1)

    # Filters: by text, then by the replica.
    page.locator("#logs-filter").fill("query=opened")
    expect(lines.locator(".log-line")).to_have_count(1)
    page.locator("#logs-filter").fill("")
    options = page.locator("#logs-replica option")
    expect(options).to_have_count(2)  # all, and the one replica
    page.locator("#logs-replica").select_option(index=1)
    expect(lines).to_contain_text("worker starting")

    # Pause: a new line is collected but not drawn until resumed.
    page.locator("#logs-pause").click()
    assert platform.get(project, "preview", "/cgi-bin/index.cgi?paused").status_code == 200
    page.wait_for_function("() => logs.lines.some((l) => l.text.endsWith('query=paused'))")
    paused = lines.locator(".log-line", has_text="query=paused")
    expect(paused).to_have_count(0)
    page.locator("#logs-pause").click()
    expect(paused).to_have_count(1)
    assert studio.take_errors() == []
