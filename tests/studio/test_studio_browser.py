"""Studio in headless Chromium (Debian's, driven by Playwright) against a
real platform: sign in, environment tabs, promote, rollback, scale,
terminate/start, an image-pull error in the errors panel, the fallback
banner, the promote and rollback dialogs' details, history reasons, toasts,
the secrets view and a 390 px wide screen — with a screenshot of each state
in test-artifacts/studio/. Every page's console errors and uncaught
exceptions are collected; a test fails on any it did not expect."""
from __future__ import annotations

import json
import pathlib
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright import sync_api as playwright_api

from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled
from tests.support.platform import ROOT, RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "studio"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
MISSING_IMAGE = "berth-test-missing.invalid/none:1"
expect = playwright_api.expect
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    p = RunningPlatform(tmp_path_factory.mktemp("studio") / "data")
    p.data_dir.mkdir()
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    docker = engine()
    return build_worker_image(docker, version="s1")[0], build_worker_image(docker, version="s2")[0]


@pytest.fixture(scope="module")
def browser():
    assert pathlib.Path(CHROMIUM).exists(), "Debian's chromium is required (apt-get install chromium)"
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Studio:
    """One browser tab on Studio with everything it logged as an error."""

    page: Any
    errors: list[str] = field(default_factory=list)

    def take_errors(self) -> list[str]:
        taken, self.errors[:] = list(self.errors), []
        return taken

    def assert_no_errors(self) -> None:
        assert self.errors == [], f"console errors or uncaught exceptions: {self.errors}"


@pytest.fixture
def open_studio(browser) -> Iterator[Any]:
    contexts = []

    def opener(width: int = 1280, height: int = 900) -> Studio:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        studio = Studio(page)
        page.on("console", lambda m: studio.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: studio.errors.append(f"pageerror: {exc}"))
        return studio

    yield opener
    for context in contexts:
        context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(studio: Studio, platform: RunningPlatform, key: str, view: str = "") -> None:
    page = studio.page
    page.goto(f"{platform.router}/studio{'#' + view if view else ''}")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("tab").first).to_be_visible()


def rest(platform: RunningPlatform, key: str, path: str) -> Any:
    request = urllib.request.Request(f"{platform.router}/api/v1{path}", headers={"X-API-KEY": key})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def no_sideways_scroll(page) -> None:
    """The page never scrolls sideways, and no badge wraps onto two lines."""
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"page scrolls sideways: scrollWidth {widths[0]} > innerWidth {widths[1]}"
    wrapped = page.evaluate("""() => [...document.querySelectorAll('.badge')].filter((b) => {
        const style = getComputedStyle(b);
        return b.getBoundingClientRect().height > 1.6 * parseFloat(style.fontSize) * 1.45 + 4;
    }).map((b) => b.textContent)""")
    assert wrapped == [], f"badges wrapped: {wrapped}"


def tables_reflowed(page) -> None:
    """On a narrow screen every table fits its box: rows reflow into
    labelled blocks, nothing hides behind a sideways scroll."""
    boxes = page.evaluate("""() => [...document.querySelectorAll('.scroll')].map((b) =>
        [b.querySelector('table').id, b.scrollWidth, b.clientWidth])""")
    assert boxes, "no table on the page"
    assert all(scroll <= client for _, scroll, client in boxes), boxes
    labels = page.evaluate("() => [...document.querySelectorAll('table.reflow td')].map((td) => td.dataset.label)")
    assert labels and all(labels), labels


def in_viewport(page, selector: str) -> bool:
    return page.evaluate("""(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }""", selector)


def test_studio_deployments_page(platform, images, open_studio):
    key = platform.cli_json("projects", "create", "studio")["api_key"]
    v1_tag, v2_tag = images
    v1 = platform.cli_json("deploy", "--image", v1_tag, "--project", "studio", api_key=key)["deployment"]["id"]
    v2 = platform.cli_json("deploy", "--image", v2_tag, "--project", "studio", api_key=key)["deployment"]["id"]

    studio = open_studio()
    page = studio.page
    requests_seen: list[tuple[str, dict[str, str]]] = []
    page.on("request", lambda r: requests_seen.append((r.url, r.headers)))

    page.goto(f"{platform.router}/studio")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    page.get_by_label("API key").fill("berth_pk_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("not valid")
    # The refused key's 401 is the browser's own network log line; nothing else.
    assert all("401" in e and "Failed to load resource" in e for e in studio.take_errors())
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()

    tabs = page.get_by_role("tab")
    expect(tabs).to_have_text(["preview", "staging", "production"])
    expect(page.locator("#current-deployment")).to_have_text(v2)
    expect(page.locator("#binding-status")).to_contain_text("running")
    expect(page.locator("#replicas tbody tr")).to_have_count(1)
    expect(page.locator("#fallback-banner")).to_have_count(0)
    shot(page, "02-preview")

    # Promote v1 from preview to staging, with a reason; the confirmation is
    # a toast next to the button, on screen.
    page.get_by_role("button", name="Promote…").click()
    expect(page.locator("#promote-target option:checked")).to_have_text("staging")
    page.locator("#promote-source").select_option(v1)
    page.locator("#promote-reason").fill("first build for QA")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#toast")).to_contain_text(f"Promoted {v1} to staging")
    assert in_viewport(page, "#toast")
    page.get_by_role("tab", name="staging").click()
    expect(page.locator("#current-deployment")).to_have_text(v1)
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#history thead")).to_contain_text("Reason")
    expect(page.locator("#history tbody tr").first.locator("td.reason")).to_have_text("first build for QA")
    expect(page.locator("#binding-status")).to_contain_text("running")
    shot(page, "03-staging-promoted")

    # v2 to staging, then roll back: the dialog lists v1 with its image, when
    # it served and who put it there (from the history), v1 chosen.
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-source").select_option(v2)
    page.locator("#promote-target").select_option(label="staging")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#toast")).to_contain_text("Promoted")
    expect(page.locator("#current-deployment")).to_have_text(v2)
    history = rest(platform, key, "/environments/staging/promotions")["entries"]
    assert [h["deployment_id"] for h in history] == [v1, v2]
    page.get_by_role("button", name="Rollback…").click()
    candidate = page.locator(f".candidate[data-deployment='{v1}']")
    expect(page.locator(".candidate")).to_have_count(1)
    expect(candidate.locator("input[type=radio]")).to_be_checked()
    expect(candidate.locator(".image")).to_have_text(v1_tag)
    expect(candidate.locator(".served")).to_contain_text(history[0]["created_at"].replace("T", " ")[:19])
    expect(candidate.locator(".served")).to_contain_text(history[1]["created_at"].replace("T", " ")[:19])
    expect(candidate.locator(".by")).to_contain_text(f"by {history[0]['actor']}")
    expect(candidate.locator(".by")).to_contain_text("first build for QA")
    shot(page, "04-rollback-dialog")
    page.locator("#rollback-reason").fill("v2 breaks checkout")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#toast")).to_contain_text(f"Rolled staging back to {v1}")
    assert in_viewport(page, "#toast")
    expect(page.locator("#current-deployment")).to_have_text(v1)
    expect(page.locator("#history tbody tr").first).to_contain_text("rollback")
    expect(page.locator("#history tbody tr").first.locator("td.reason")).to_have_text("v2 breaks checkout")
    shot(page, "05-staging-rolled-back")

    # Scale staging's binding.
    page.get_by_role("button", name="Scale…").click()
    page.locator("#scale-min").fill("2")
    page.locator("#scale-max").fill("3")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#bounds")).to_have_text("2..3")
    expect(page.locator("#replicas tbody tr")).to_have_count(2)
    shot(page, "06-scaled")

    # Terminate: the replicas being stopped read "stopping", never "unhealthy".
    page.evaluate("""() => {
        window.replicaBadges = new Set();
        const seen = () => document.querySelectorAll('#replicas .badge').forEach((b) => window.replicaBadges.add(b.textContent));
        new MutationObserver(seen).observe(document.getElementById('panel'), { childList: true, subtree: true });
    }""")
    page.get_by_role("button", name="Terminate").click()
    page.locator("#dialog-confirm").click()
    expect(page.locator("#binding-status")).to_contain_text("terminated")
    expect(page.locator("#replicas .badge").first).to_have_text("stopping")
    shot(page, "07-terminated-stopping")
    expect(page.locator("#replicas")).to_have_text("No replicas running.", timeout=60_000)
    seen_states = set(page.evaluate("() => [...window.replicaBadges]"))
    assert "stopping" in seen_states and "unhealthy" not in seen_states, seen_states
    page.get_by_role("button", name="Start").click()
    page.locator("#dialog-confirm").click()
    expect(page.locator("#binding-status")).to_contain_text("running")
    shot(page, "08-started")

    # Production needs the name typed before the pointer can move.
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-target").select_option(label="production")
    expect(page.locator("#dialog-confirm")).to_be_disabled()
    page.locator("#confirm-typing").fill("production")
    expect(page.locator("#dialog-confirm")).to_be_enabled()
    page.get_by_role("button", name="Cancel").click()

    # An image that cannot be pulled shows up in the errors panel.
    platform.cli_json("deploy", "--image", MISSING_IMAGE, "--no-wait", "--project", "studio", api_key=key)
    page.get_by_role("tab", name="preview").click()
    expect(page.locator("#errors")).to_contain_text("image pull error")
    expect(page.locator("#errors")).to_contain_text("berth-test-missing.invalid")
    shot(page, "09-pull-error")

    # The environment-name field checks the registry's rule in the browser.
    page.get_by_role("button", name="+ Environment").click()
    name = page.locator("#new-env-name")
    name.fill("Bad_Name")
    page.locator("#dialog-confirm").click()
    assert name.evaluate("(e) => e.validity.patternMismatch") is True
    expect(page.locator("#dialog")).to_be_visible()
    name.fill("qa-1")
    assert name.evaluate("(e) => e.validity.valid") is True
    page.locator("#dialog-confirm").click()
    expect(page.get_by_role("tab", name="qa-1")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#toast")).to_contain_text("Created qa-1")
    studio.assert_no_errors()

    # The key went only into X-API-KEY headers of API calls.
    storage = page.evaluate("() => ({local: JSON.stringify(localStorage), cookies: document.cookie})")
    assert key not in storage["local"] and key not in storage["cookies"]
    assert all(key not in url for url, _ in requests_seen)
    carrying = [url for url, headers in requests_seen if key in " ".join(headers.values())]
    assert carrying and all("/api/v1/" in url for url in carrying)
    for _url, headers in requests_seen:
        if key in headers.values():
            assert headers.get("x-api-key") == key


def test_fallback_banner_and_promote_dialog_defaults(platform, images, open_studio):
    key = platform.cli_json("projects", "create", "falls")["api_key"]
    v1_tag, v2_tag = images
    v1 = platform.cli_json("deploy", "--image", v1_tag, "--project", "falls", api_key=key)["deployment"]["id"]
    platform.cli_json("promote", v1, "--to", "staging", "--min-replicas", "2", "--max-replicas", "4",
                      "--project", "falls", api_key=key)
    v2 = platform.cli_json("deploy", "--image", v2_tag, "--project", "falls", api_key=key)["deployment"]["id"]
    bad = platform.cli_json("deploy", "--image", MISSING_IMAGE, "--no-wait", "--project", "falls",
                            api_key=key)["deployment"]["id"]

    # The router falls back to v2 once the scheduler reports the new binding failed.
    def falls_back() -> bool:
        r = platform.get("falls", "preview", "/cgi-bin/index.cgi")
        return r.status_code == 200 and r.headers.get("X-Berth-Fallback") == "1" and \
            r.headers.get("X-Berth-Deployment") == v2
    eventually(falls_back, timeout=60, what="preview served by the fallback")
    environments = {e["name"]: e for e in rest(platform, key, "/environments")["environments"]}
    assert environments["preview"]["deployment_id"] == bad
    fallback = environments["preview"]["fallback"]
    assert fallback["deployment_id"] == v2 and fallback["since"].endswith("Z")
    assert environments["staging"]["fallback"] is None

    studio = open_studio()
    page = studio.page
    sign_in(studio, platform, key)
    banner = page.locator("#fallback-banner")
    expect(banner).to_contain_text("Traffic is served by the fallback")
    expect(page.locator("#fallback-deployment")).to_have_text(v2)
    expect(banner).to_contain_text(v2_tag)
    expect(banner).to_contain_text(f"current deployment {bad} failed")
    expect(page.locator("#fallback-since")).to_have_text(fallback["since"].replace("T", " ")[:19] + " UTC")
    expect(page.locator("#binding-status")).to_contain_text("failed")
    shot(page, "10-fallback-banner")

    # Promote from preview: staging is the default target; offered first are
    # the deployments running in preview (v2), never the failed build; the
    # bounds default to staging's (2..4).
    page.get_by_role("button", name="Promote…").click()
    expect(page.locator("#promote-target option:checked")).to_have_text("staging")
    source = page.locator("#promote-source")
    expect(source).to_have_value(v2)
    proven = page.locator("#promote-source optgroup").first
    expect(proven).to_have_attribute("label", "Ready in an environment before staging")
    expect(proven.locator("option")).to_have_count(1)
    expect(proven.locator("option")).to_contain_text("running in preview")
    expect(proven.locator("option")).to_contain_text("serving preview")
    assert source.evaluate(f"(s) => [...s.options].find((o) => o.value === '{bad}').selected") is False
    expect(page.locator(f"#promote-source option[value='{bad}']")).to_contain_text("failed in preview")
    expect(page.locator("#promote-where")).to_contain_text(v2_tag)
    expect(page.locator("#promote-min")).to_have_value("2")
    expect(page.locator("#promote-max")).to_have_value("4")
    shot(page, "11-promote-dialog")
    # To production (nothing there yet): the platform's defaults, and what is
    # running in preview or staging is offered; still not the failed build.
    page.locator("#promote-target").select_option(label="production")
    expect(page.locator("#promote-min")).to_have_value("1")
    expect(page.locator("#promote-max")).to_have_value("3")
    assert source.input_value() in (v1, v2)
    expect(page.locator("#promote-source optgroup").first.locator("option")).to_have_count(2)
    # To preview itself: nothing is proven before the first environment.
    page.locator("#promote-target").select_option(label="preview")
    expect(source).to_have_value("")
    expect(page.locator("#dialog-confirm")).to_be_disabled()
    page.get_by_role("button", name="Cancel").click()
    studio.assert_no_errors()


def test_secrets_view(platform, open_studio):
    key = platform.cli_json("projects", "create", "vault")["api_key"]
    platform.cli_json("secrets", "set", "--stdin", "--name", "SHARED_TOKEN", "--type", "token", "--project", "vault",
                      api_key=key, input="project-wide-value\n")
    studio = open_studio()
    page = studio.page
    bodies: list[str] = []
    page.on("response", lambda r: bodies.append(r.text()) if "/api/v1/" in r.url else None)
    sign_in(studio, platform, key, view="secrets")
    expect(page.locator("#view-title")).to_have_text("Secrets")
    expect(page.locator("#view-secrets")).to_have_attribute("aria-current", "page")
    row = page.locator("#secrets tr[data-secret=SHARED_TOKEN]")
    expect(row).to_contain_text("token")
    expect(row).to_contain_text("project")

    # Set a secret for staging from the page (twice: two versions).
    page.get_by_role("tab", name="staging").click()
    for value in ("first-value-s3cr3t", "second-value-s3cr3t"):
        page.get_by_role("button", name="Set secret…").click()
        page.locator("#secret-name").fill("DATABASE_URL")
        page.locator("#secret-type").select_option("password")
        expect(page.locator("#secret-scope option:checked")).to_have_text("staging only")
        page.locator("#secret-value").fill(value)
        page.locator("#dialog-confirm").click()
        expect(page.locator("#toast")).to_contain_text("Set DATABASE_URL (password, environment:staging)")
        assert in_viewport(page, "#toast")
    row = page.locator("#secrets tr[data-secret=DATABASE_URL]")
    expect(row.locator("td.version")).to_have_text("2")
    expect(row).to_contain_text("environment:staging")
    expect(page.locator("#secrets tr[data-secret=SHARED_TOKEN]")).to_contain_text("project")
    shot(page, "12-secrets")

    # Roll back to the previous version (a new version 3 with version 1's value).
    page.locator("#secret-rollback-DATABASE_URL").click()
    expect(page.locator("#secret-rollback-summary")).to_contain_text("value of version 1")
    expect(page.locator("#secret-rollback-summary")).to_contain_text("as version 3")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#toast")).to_contain_text("Restored DATABASE_URL to the value of version 1 as version 3")
    expect(row.locator("td.version")).to_have_text("3")
    versions = rest(platform, key, "/secrets/DATABASE_URL/versions?environment_id=staging")["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    # Preview does not resolve staging's secret.
    page.get_by_role("tab", name="preview").click()
    expect(page.locator("#secrets tr[data-secret=SHARED_TOKEN]")).to_be_visible()
    expect(page.locator("#secrets tr[data-secret=DATABASE_URL]")).to_have_count(0)

    # Values never come back: not on the page, not in any API answer.
    for secret in ("first-value-s3cr3t", "second-value-s3cr3t", "project-wide-value"):
        assert secret not in page.content()
        assert not any(secret in body for body in bodies)
    page.get_by_role("link", name="Deployments").click()
    expect(page.locator("#view-title")).to_have_text("Deployments")
    expect(page.locator("#panel")).to_contain_text("Nothing deployed to preview yet.")
    studio.assert_no_errors()


def test_narrow_screen(platform, images, open_studio):
    key = platform.cli_json("projects", "create", "narrow")["api_key"]
    v1_tag, _ = images
    v1 = platform.cli_json("deploy", "--image", v1_tag, "--project", "narrow", api_key=key)["deployment"]["id"]
    platform.cli_json("promote", v1, "--to", "staging", "--reason", "a long reason " * 6, "--project", "narrow",
                      api_key=key)
    platform.cli_json("deploy", "--image", MISSING_IMAGE, "--no-wait", "--project", "narrow", api_key=key)
    platform.cli_json("secrets", "set", "--stdin", "--name", "A_RATHER_LONG_SECRET_NAME_FOR_A_NARROW_SCREEN", "--type",
                      "certificate", "--project", "narrow", api_key=key, input="x\n")

    studio = open_studio(width=390, height=780)
    page = studio.page
    page.goto(f"{platform.router}/studio")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    no_sideways_scroll(page)
    sign_in(studio, platform, key)
    # Preview: a failed build with an image pull error (long message, badges).
    expect(page.locator("#errors")).to_contain_text("image pull error")
    expect(page.locator("#errors").locator("xpath=..")).to_have_class("scroll")
    no_sideways_scroll(page)
    tables_reflowed(page)
    shot(page, "13-narrow-preview")
    page.get_by_role("tab", name="staging").click()
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#binding-status")).to_contain_text("running")
    expect(page.locator("#replicas tbody tr")).to_have_count(1)
    no_sideways_scroll(page)
    tables_reflowed(page)
    shot(page, "14-narrow-staging")
    for button, name in (("Promote…", "promote"), ("Rollback…", "rollback")):
        page.get_by_role("button", name=button).click()
        expect(page.locator("#dialog")).to_be_visible()
        no_sideways_scroll(page)
        shot(page, f"15-narrow-{name}-dialog")
        page.get_by_role("button", name="Cancel").click()
    # A long page: the confirmation still shows where the action was.
    page.get_by_role("button", name="Scale…").click()
    page.locator("#scale-max").fill("4")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#toast")).to_contain_text("Replicas 1..4 in staging")
    assert in_viewport(page, "#toast")
    assert page.evaluate("() => document.documentElement.scrollHeight > innerHeight")
    no_sideways_scroll(page)
    page.get_by_role("link", name="Secrets").click()
    expect(page.locator("#secrets")).to_contain_text("A_RATHER_LONG_SECRET_NAME_FOR_A_NARROW_SCREEN")
    no_sideways_scroll(page)
    tables_reflowed(page)
    shot(page, "16-narrow-secrets")
    page.get_by_role("button", name="+ Environment").click()
    no_sideways_scroll(page)
    page.get_by_role("button", name="Cancel").click()
    studio.assert_no_errors()
