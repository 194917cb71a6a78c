"""Studio's Promote dialog and gates (issue 17), in headless Chromium
(Debian's, driven by Playwright) against a real platform: the target
environment's gate (experiment, threshold, dataset digest) and each
candidate's latest run of that experiment (pass rate, when, verdict; "no
run" when there is none); a failing candidate is refused with the
registry's 412 in the toast unless "skip gate" is ticked with a reason, and
then it promotes with the reason in the history. Runs are recorded through
the registry's RecordExperimentRun with the project's key, as ``berth
experiments run`` records them."""
from __future__ import annotations

import hashlib
import json
import urllib.request
from typing import Any

import grpc
import pytest

from berth.v1 import registry_pb2, registry_pb2_grpc
from tests.studio import test_studio_browser as studio_browser
from tests.studio.test_studio_browser import expect, shot, sign_in
from tests.support.platform import RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

DIGEST = "sha256:" + hashlib.sha256(b"studio gate cases").hexdigest()
OTHER_DIGEST = "sha256:" + hashlib.sha256(b"another dataset").hexdigest()

# The browser test's fixtures: a real platform, the worker images, Debian's chromium.
platform = studio_browser.platform
images = studio_browser.images
browser = studio_browser.browser
open_studio = studio_browser.open_studio


def rest(platform: RunningPlatform, key: str, method: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{platform.router}/api/v1{path}", data=data, method=method,
                                     headers={"X-API-KEY": key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def record_run(platform: RunningPlatform, key: str, deployment: str, passed: int, total: int,
               digest: str = DIGEST) -> Any:
    cases = [registry_pb2.ExperimentCaseResult(name=f"case-{i}", passed=i < passed, status=200 if i < passed else 404,
                                               latency_ms=3.0, reason="" if i < passed else "status 404, expected 200")
             for i in range(total)]
    with grpc.insecure_channel(f"127.0.0.1:{platform.ports['registry']}") as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        return stub.RecordExperimentRun(registry_pb2.RecordExperimentRunRequest(
            name="smoke", deployment_id=deployment, dataset_digest=digest, cases=cases),
            metadata=(("x-api-key", key),), timeout=30)


def test_promote_dialog_shows_the_gate_and_each_candidates_run(platform, images, open_studio):
    key = platform.cli_json("projects", "create", "gated")["api_key"]
    v1_tag, v2_tag = images
    good = platform.cli_json("deploy", "--image", v1_tag, "--project", "gated", api_key=key)["deployment"]["id"]
    bad = platform.cli_json("deploy", "--image", v2_tag, "--project", "gated", api_key=key)["deployment"]["id"]
    untested = platform.cli_json("deploy", "--image", v1_tag, "--project", "gated", api_key=key)["deployment"]["id"]

    record_run(platform, key, good, 10, 10)
    record_run(platform, key, bad, 10, 10)  # an older passing run: only the latest counts
    bad_run = record_run(platform, key, bad, 7, 10)
    record_run(platform, key, untested, 10, 10, digest=OTHER_DIGEST)  # another dataset: not the gate's
    gate = rest(platform, key, "PUT", "/environments/staging/gate",
                {"experiment": "smoke", "threshold": 0.95, "dataset_digest": DIGEST})["gate"]
    assert (gate["experiment"], gate["threshold"], gate["dataset_digest"]) == ("smoke", 0.95, DIGEST)

    studio = open_studio()
    page = studio.page
    sign_in(studio, platform, key)
    page.get_by_role("button", name="Promote…").click()
    expect(page.locator("#promote-target option:checked")).to_have_text("staging")
    summary = page.locator("#promote-gate-summary")
    expect(summary).to_contain_text("gated on experiment smoke")
    expect(summary).to_contain_text("95.0%")
    expect(summary).to_contain_text(DIGEST[:19])
    rows = page.locator("#promote-gate-results tbody tr")
    expect(rows).to_have_count(3)
    good_row = page.locator(f"#promote-gate-results tr[data-deployment='{good}']")
    bad_row = page.locator(f"#promote-gate-results tr[data-deployment='{bad}']")
    untested_row = page.locator(f"#promote-gate-results tr[data-deployment='{untested}']")
    expect(good_row.locator("td.pass-rate")).to_have_text("100.0% (10/10)")
    expect(good_row.locator("td.verdict")).to_have_text("passes")
    expect(bad_row.locator("td.pass-rate")).to_have_text("70.0% (7/10)")
    expect(bad_row.locator("td.verdict")).to_have_text("fails")
    expect(bad_row).to_have_class("gate-fails")
    expect(untested_row.locator("td.pass-rate")).to_have_text("no run")
    expect(untested_row.locator("td.verdict")).to_have_text("no run")
    when = bad_row.locator("td").nth(2)
    expect(when).to_contain_text("UTC")
    shot(page, "20-promote-gate")

    # A passing candidate offers no skip; the failing one does.
    page.locator("#promote-source").select_option(good)
    expect(page.locator("#promote-skip-gate-row")).to_be_hidden()
    page.locator("#promote-source").select_option(bad)
    expect(page.locator("#promote-skip-gate-row")).to_be_visible()

    # Without skipping: the registry's 412 naming the gate and the run, in the toast; nothing moved.
    page.locator("#dialog-confirm").click()
    toast = page.locator("#toast")
    expect(toast).to_contain_text("gated on experiment 'smoke'")
    expect(toast).to_contain_text(bad_run.id)
    expect(page.locator("#dialog-error")).to_contain_text("gated on experiment 'smoke'")
    assert rest(platform, key, "GET", "/environments/staging/promotions")["entries"] == []
    refused = studio.take_errors()
    assert refused and all("412" in e and "Failed to load resource" in e for e in refused), refused

    # Skipping needs a reason: the confirm stays off until one is given.
    page.locator("#promote-skip-gate").check()
    expect(page.locator("#dialog-confirm")).to_be_disabled()
    page.locator("#promote-reason").fill("hotfix for incident 7")
    expect(page.locator("#dialog-confirm")).to_be_enabled()
    shot(page, "21-promote-skip-gate")
    page.locator("#dialog-confirm").click()
    expect(toast).to_contain_text(f"Promoted {bad} to staging")
    page.get_by_role("tab", name="staging").click()
    expect(page.locator("#current-deployment")).to_have_text(bad)
    expect(page.locator("#history tbody tr").first.locator("td.reason")).to_contain_text("hotfix for incident 7")
    entries = rest(platform, key, "GET", "/environments/staging/promotions")["entries"]
    assert [e["deployment_id"] for e in entries] == [bad]
    assert "skipped" in entries[0]["reason"] and "hotfix for incident 7" in entries[0]["reason"]
    shot(page, "22-promote-gate-history")

    # An environment without a gate shows none.
    page.get_by_role("button", name="Promote…").click()
    page.locator("#promote-target").select_option(label="preview")
    expect(page.locator("#promote-gate")).to_be_hidden()
    expect(page.locator("#promote-skip-gate-row")).to_be_hidden()
    page.locator("#dialog-cancel").click()
    studio.assert_no_errors()
