"""Studio in headless Chromium (Debian's, driven by Playwright) against a
real platform: sign in, environment tabs, promote, rollback, scale,
terminate/start, an image-pull error in the errors panel — with a
screenshot of each state in test-artifacts/studio/."""
from __future__ import annotations

import pathlib
import shutil

import pytest
from playwright import sync_api as playwright_api

from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled
from tests.support.platform import ROOT, RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "studio"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


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
def browser():
    assert pathlib.Path(CHROMIUM).exists(), "Debian's chromium is required (apt-get install chromium)"
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_studio_deployments_page(platform, browser):
    key = platform.cli_json("projects", "create", "studio")["api_key"]
    docker = engine()
    v1_tag, _ = build_worker_image(docker, version="s1")
    v2_tag, _ = build_worker_image(docker, version="s2")
    v1 = platform.cli_json("deploy", "--image", v1_tag, "--project", "studio", api_key=key)["deployment"]["id"]
    v2 = platform.cli_json("deploy", "--image", v2_tag, "--project", "studio", api_key=key)["deployment"]["id"]

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requests_seen: list[tuple[str, dict[str, str]]] = []
    page.on("request", lambda r: requests_seen.append((r.url, r.headers)))
    expect = playwright_api.expect
    expect.set_options(timeout=30_000)

    page.goto(f"{platform.router}/studio")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    page.get_by_label("API key").fill("berth_pk_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("not valid")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()

    tabs = page.get_by_role("tab")
    expect(tabs).to_have_text(["preview", "staging", "production"])
    expect(page.locator("#current-deployment")).to_have_text(v2)
    expect(page.locator("#binding-status")).to_contain_text("running")
    expect(page.locator("#replicas tbody tr")).to_have_count(1)
    shot(page, "02-preview")

    # Promote v1 from preview to staging.
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-source").select_option(v1)
    page.locator("#promote-target").select_option(label="staging")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#flash")).to_contain_text("Promoted")
    page.get_by_role("tab", name="staging").click()
    expect(page.locator("#current-deployment")).to_have_text(v1)
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#binding-status")).to_contain_text("running")
    shot(page, "03-staging-promoted")

    # v2 to staging, then roll back (previous = v1 by default).
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-source").select_option(v2)
    page.locator("#promote-target").select_option(label="staging")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#flash")).to_contain_text("Promoted")
    page.get_by_role("tab", name="staging").click()
    expect(page.locator("#current-deployment")).to_have_text(v2)
    page.get_by_role("button", name="Rollback…").click()
    expect(page.locator("#rollback-target")).to_have_value(v1)
    page.locator("#dialog-confirm").click()
    expect(page.locator("#current-deployment")).to_have_text(v1)
    expect(page.locator("#history tbody tr").first).to_contain_text("rollback")
    shot(page, "04-staging-rolled-back")

    # Scale staging's binding.
    page.get_by_role("button", name="Scale…").click()
    page.locator("#scale-min").fill("2")
    page.locator("#scale-max").fill("3")
    page.locator("#dialog-confirm").click()
    expect(page.locator("#bounds")).to_have_text("2..3")
    expect(page.locator("#replicas tbody tr")).to_have_count(2)
    shot(page, "05-scaled")

    # Terminate and start.
    page.get_by_role("button", name="Terminate").click()
    page.locator("#dialog-confirm").click()
    expect(page.locator("#binding-status")).to_contain_text("terminated")
    shot(page, "06-terminated")
    page.get_by_role("button", name="Start").click()
    page.locator("#dialog-confirm").click()
    expect(page.locator("#binding-status")).to_contain_text("running")
    shot(page, "07-started")

    # Production needs the name typed before the pointer can move.
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-target").select_option(label="production")
    expect(page.locator("#dialog-confirm")).to_be_disabled()
    page.locator("#confirm-typing").fill("production")
    expect(page.locator("#dialog-confirm")).to_be_enabled()
    page.get_by_role("button", name="Cancel").click()

    # An image that cannot be pulled shows up in the errors panel.
    platform.cli_json("deploy", "--image", "berth-test-missing.invalid/none:1", "--no-wait", "--project", "studio", api_key=key)
    page.get_by_role("tab", name="preview").click()
    expect(page.locator("#errors")).to_contain_text("image pull error")
    expect(page.locator("#errors")).to_contain_text("berth-test-missing.invalid")
    shot(page, "08-pull-error")

    # The key went only into X-API-KEY headers of API calls.
    storage = page.evaluate("() => ({local: JSON.stringify(localStorage), cookies: document.cookie})")
    assert key not in storage["local"] and key not in storage["cookies"]
    assert all(key not in url for url, _ in requests_seen)
    carrying = [url for url, headers in requests_seen if key in " ".join(headers.values())]
    assert carrying and all("/api/v1/" in url for url in carrying)
    for _url, headers in requests_seen:
        if key in headers.values():
            assert headers.get("x-api-key") == key
    context.close()
