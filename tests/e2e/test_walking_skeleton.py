"""The walking skeleton as a user meets it: ``berth up``, the real CLI, the
router, and real containers on the local Docker engine."""
from __future__ import annotations

import json

import pytest

from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


@pytest.fixture
def platform(tmp_path):
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


def body(resp) -> dict[str, str]:
    assert resp.status_code == 200, f"{resp.status_code} {resp.text}"
    return dict(line.split("=", 1) for line in resp.text.splitlines() if "=" in line)


def test_deploy_route_promote_rollback_secrets_and_adoption(platform, tmp_path):
    created = platform.cli_json("projects", "create", "shop")
    assert created["project"]["name"] == "shop" and created["project"]["id"].startswith("prj_")
    key = created["api_key"]
    assert key.startswith("berth_pk_")

    # A project secret, and a staging override of the same name.
    platform.cli("secrets", "set", "--project", "shop", "--name", "API_TOKEN", "--type", "token", "--stdin",
                 api_key=key, input="project-canary\n")
    platform.cli("secrets", "set", "--project", "shop", "--name", "API_TOKEN", "--type", "token", "--stdin",
                 "--environment", "staging", api_key=key, input="staging-canary\n")
    listed = platform.cli_json("secrets", "list", "--project", "shop", "--environment", "staging", api_key=key)
    assert [(s["name"], s["scope"]) for s in listed["secrets"]] == [("API_TOKEN", "environment:staging")]
    assert "canary" not in json.dumps(listed)

    for version in ("v1", "v2"):
        write_worker_context(str(tmp_path / version), version=version)

    v1 = platform.cli_json("deploy", str(tmp_path / "v1"), "--project", "shop", "--var", "SHOW_SECRET=API_TOKEN", api_key=key)
    v1_id = v1["deployment"]["id"]
    assert v1["environment"]["name"] == "preview" and v1["status"] == "running"
    assert v1["deployment"]["image_id"].startswith("sha256:")

    answer = platform.get("shop", "preview")
    assert answer.headers["X-Berth-Deployment"] == v1_id
    assert body(answer)["version"] == "v1" and body(answer)["secret"] == "project-canary"

    platform.cli_json("promote", v1_id, "--to", "staging", "--project", "shop", api_key=key)
    staging = eventually(lambda: body(platform.get("shop", "staging")), what="staging serves v1")
    assert staging["version"] == "v1" and staging["deployment"] == v1_id
    assert staging["secret"] == "staging-canary"  # the environment's own secret wins

    v2 = platform.cli_json("deploy", str(tmp_path / "v2"), "--project", "shop", "--var", "SHOW_SECRET=API_TOKEN", api_key=key)
    v2_id = v2["deployment"]["id"]
    moved = platform.cli_json("promote", v2_id, "--to", "staging", "--project", "shop", api_key=key)
    assert moved["entry"]["previous_deployment_id"] == v1_id
    eventually(lambda: body(platform.get("shop", "staging"))["version"] == "v2", what="staging serves v2")

    images_before = {i.id for i in engine().images.list()}
    back = platform.cli_json("rollback", "--environment", "staging", "--project", "shop", api_key=key)
    assert back["entry"]["deployment_id"] == v1_id and back["entry"]["kind"] == "rollback"
    served = eventually(lambda: (lambda b: b if b["version"] == "v1" else None)(body(platform.get("shop", "staging"))),
                        what="staging serves v1 again")
    assert served["deployment"] == v1_id and served["secret"] == "staging-canary"
    assert {i.id for i in engine().images.list()} == images_before  # nothing was rebuilt

    staging_history = platform.cli_json("history", "--environment", "staging", "--project", "shop", api_key=key)
    assert [(e["kind"], e["deployment_id"]) for e in staging_history["entries"]] == [
        ("promote", v1_id), ("promote", v2_id), ("rollback", v1_id)
    ]
    preview_history = platform.cli_json("history", "--environment", "preview", "--project", "shop", api_key=key)
    assert [(e["kind"], e["deployment_id"]) for e in preview_history["entries"]] == [("deploy", v1_id), ("deploy", v2_id)]

    status = platform.cli_json("deployment", "status", v1_id, "--project", "shop", api_key=key)
    by_env = {b["environment"]: b for b in status["bindings"]}
    assert by_env["staging"]["serving"] and by_env["staging"]["status"] == "running"
    assert [r["state"] for r in by_env["staging"]["replicas"]] == ["ready"]
    human = platform.cli("deployment", "status", v1_id, "--project", "shop", api_key=key).stdout
    assert "staging" in human and "ready" in human and v1_id in human

    # Restarting the platform adopts the running containers.
    before = sorted(c.id for c in platform.containers())
    # v1 and v2 in preview and in staging: a previously serving binding keeps
    # its replicas (for instant rollback) unless scaled to zero.
    assert len(before) == 4
    platform.stop()
    assert sorted(c.id for c in platform.containers()) == before  # replicas outlive the control plane
    platform.start()
    assert body(platform.get("shop", "staging"))["version"] == "v1"
    status = platform.cli_json("deployment", "status", v1_id, "--project", "shop", api_key=key)
    assert all(b["status"] == "running" for b in status["bindings"])
    assert sorted(c.id for c in platform.containers()) == before


def test_clear_errors_for_bad_input(platform):
    key = platform.cli_json("projects", "create", "shop")["api_key"]

    unknown_project = platform.get("nope", "preview")
    assert unknown_project.status_code == 404
    assert unknown_project.json()["error"]["code"] and "nope" in unknown_project.json()["error"]["message"]
    unknown_env = platform.get("shop", "qa")
    assert unknown_env.status_code == 404 and "qa" in unknown_env.json()["error"]["message"]
    nothing_yet = platform.get("shop", "preview")
    assert nothing_yet.status_code == 404

    bad_image = platform.cli("deploy", "--image", "Not A/Valid:Ref!", "--project", "shop", api_key=key, check=False)
    assert bad_image.returncode == 2
    assert "not a valid image reference" in bad_image.stderr and "Traceback" not in bad_image.stderr

    no_key = platform.cli("env", "list", "--project", "shop", check=False)
    assert no_key.returncode == 4 and "BERTH_API_KEY" in no_key.stderr and "Traceback" not in no_key.stderr
    wrong_key = platform.cli("env", "list", "--project", "shop", api_key="berth_pk_wrong", check=False, )
    assert wrong_key.returncode == 4 and "not valid" in wrong_key.stderr
    as_json = platform.cli("env", "list", "--project", "shop", "--output", "json", api_key="berth_pk_wrong", check=False)
    assert json.loads(as_json.stderr)["error"]["code"] == "unauthenticated"

    other = platform.cli("env", "list", "--project", "someone-else", api_key=key, check=False)
    assert other.returncode == 4 and "belongs to project 'shop'" in other.stderr

    unknown_env_cli = platform.cli("history", "--environment", "qa", "--project", "shop", api_key=key, check=False)
    assert unknown_env_cli.returncode == 3 and "environment 'qa' not found" in unknown_env_cli.stderr


def test_pull_failure_is_reported_as_an_event(platform, tmp_path):
    key = platform.cli_json("projects", "create", "shop")["api_key"]
    write_worker_context(str(tmp_path / "v1"), version="v1")
    good = platform.cli_json("deploy", str(tmp_path / "v1"), "--project", "shop", api_key=key)["deployment"]["id"]

    bad = platform.cli("deploy", "--image", "berth-test-missing.invalid/none:1", "--project", "shop", "--output", "json",
                       "--timeout", "60", api_key=key, check=False)
    assert bad.returncode == 5, bad.stderr
    bad_id = json.loads(bad.stdout)["data"]["deployment"]["id"]
    errors = platform.cli_json("deployment", "errors", bad_id, "--project", "shop", api_key=key)["errors"]
    assert [e["kind"] for e in errors] == ["image_pull_error"]
    assert "berth-test-missing.invalid" in errors[0]["message"]

    # preview's pointer moved to the broken deployment; pinning still reaches the good one
    pinned = platform.get("shop", "preview", **{"X-Berth-Deployment": good})
    assert pinned.status_code == 200 and pinned.headers["X-Berth-Deployment"] == good
