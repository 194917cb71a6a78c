"""Every CLI command as a user runs it, against a real `berth up`: the JSON
shapes the design names, the key facts in human output, and one clear line
with the right exit code when something is wrong."""
from __future__ import annotations

import json

import pytest

from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled
from tests.support.platform import RunningPlatform, free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    p = RunningPlatform(tmp_path_factory.mktemp("cli") / "data")
    p.data_dir.mkdir()
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


@pytest.fixture(scope="module")
def project(platform):
    created = platform.cli_json("projects", "create", "clishop")
    assert set(created) == {"project", "api_key"} and set(created["project"]) == {"id", "name"}
    return created["api_key"]


@pytest.fixture(scope="module")
def image(platform):
    tag, image_id = build_worker_image(engine(), version="cli")
    return tag, image_id


def run(platform, key, *args):
    return platform.cli_json(*args, "--project", "clishop", api_key=key)


def test_environments_and_keys(platform, project):
    envs = run(platform, project, "env", "list")["environments"]
    assert {e["name"] for e in envs} == {"preview", "staging", "production"}
    assert all({"id", "name", "deployment_id"} <= set(e) for e in envs)
    created = run(platform, project, "env", "create", "qa")["environment"]
    assert created["name"] == "qa" and created["id"].startswith("env_")
    human = platform.cli("env", "list", "--project", "clishop", api_key=project).stdout
    assert "qa" in human and "production" in human and "yes" in human  # production is protected
    deleted = run(platform, project, "env", "delete", "qa")["environment"]
    assert deleted["id"] == created["id"]
    refused = platform.cli("env", "delete", "production", "--project", "clishop", api_key=project, check=False)
    assert refused.returncode == 5 and "production" in refused.stderr and "Traceback" not in refused.stderr

    key = run(platform, project, "keys", "create", "ci")
    assert key["api_key"].startswith("berth_pk_") and key["key"]["name"] == "ci"
    listed = run(platform, project, "keys", "list")["keys"]
    assert {k["name"] for k in listed} >= {"default", "ci"}
    assert key["api_key"] not in json.dumps(listed)
    assert run(platform, key["api_key"], "env", "list")["environments"]  # the new key works
    revoked = run(platform, project, "keys", "revoke", "ci")["key"]
    assert revoked["revoked_at"]


def test_deploy_status_scale_terminate_start(platform, project, image):
    tag, image_id = image
    deployed = run(platform, project, "deploy", "--image", tag, "--min-replicas", "1", "--max-replicas", "2")
    dep = deployed["deployment"]
    assert {"id", "image", "image_id", "created_at"} <= set(dep) and deployed["environment"]["name"] == "preview"
    assert deployed["status"] == "running" and dep["image"] == tag

    listed = run(platform, project, "deployments")["deployments"]
    assert listed[0]["id"] == dep["id"]

    status = run(platform, project, "deployment", "status", dep["id"])
    (binding,) = status["bindings"]
    assert {"environment", "status", "min_replicas", "max_replicas", "replicas"} <= set(binding)
    assert binding["environment"] == "preview" and binding["status"] == "running"
    assert {"id", "state", "started_at", "restarts"} <= set(binding["replicas"][0])
    latest = run(platform, project, "deployment", "status")  # no id: the latest deployment
    assert latest["id"] == dep["id"]

    scaled = run(platform, project, "deployment", "scale", dep["id"], "--min-replicas", "2", "--max-replicas", "3")["binding"]
    assert (scaled["min_replicas"], scaled["max_replicas"]) == (2, 3)
    up = run(platform, project, "deployment", "scale-up", dep["id"], "--by", "2")["binding"]
    assert (up["min_replicas"], up["max_replicas"]) == (4, 4)  # max widened
    down = run(platform, project, "deployment", "scale-down", dep["id"], "--by", "4")["binding"]
    assert down["min_replicas"] == 0

    terminated = run(platform, project, "deployment", "terminate", dep["id"])["deployment"]
    assert terminated["state"] == "terminated"
    started = run(platform, project, "deployment", "start", dep["id"])["deployment"]
    assert started["state"] == "active"

    errors = run(platform, project, "deployment", "errors", dep["id"])
    assert errors["errors"] == [] and errors["deployment_id"] == dep["id"]


def test_promote_rollback_history_shapes(platform, project, image):
    tag, _ = image
    v1 = run(platform, project, "deploy", "--image", tag, "--no-wait")["deployment"]["id"]
    v2 = run(platform, project, "deploy", "--image", tag, "--no-wait")["deployment"]["id"]
    moved = run(platform, project, "promote", v1, "--to", "staging", "--no-wait")
    assert moved["environment"]["deployment_id"] == v1 and moved["entry"]["kind"] == "promote"
    run(platform, project, "promote", v2, "--to", "staging", "--no-wait")
    human = platform.cli("rollback", "--environment", "staging", "--no-wait", "--project", "clishop", api_key=project).stdout
    assert f"{v2} -> {v1}" in human and "secrets are not rolled back" in human
    entries = run(platform, project, "history", "--environment", "staging")["entries"]
    assert [e["kind"] for e in entries] == ["promote", "promote", "rollback"]
    assert all({"sequence", "kind", "deployment_id", "previous_deployment_id", "actor", "created_at"} <= set(e) for e in entries)

    unconfirmed = platform.cli("promote", v1, "--to", "production", "--project", "clishop", "--output", "json",
                               api_key=project, check=False)
    assert unconfirmed.returncode == 5
    error = json.loads(unconfirmed.stderr)["error"]
    assert error["code"] == "failed_precondition"
    # The google.rpc.Status details the registry sent, read back by the client;
    # the hint comes from ErrorInfo.metadata, not the message.
    assert error["reason"] == "PROTECTED_ENVIRONMENT" and "--yes" in error["hint"] and "--yes" not in error["message"]
    assert error["resource"] == {"type": "", "name": "production"}
    bad = platform.cli("deployment", "scale", v1, "--min-replicas", "3", "--max-replicas", "1", "--environment", "staging",
                       "--project", "clishop", "--output", "json", api_key=project, check=False)
    bad_error = json.loads(bad.stderr)["error"]
    assert bad_error["code"] == "invalid_argument" and bad_error["field"] == "min_replicas", bad.stderr


def test_secrets_commands(platform, project):
    for value in ("first", "second"):
        s = platform.cli_json("secrets", "set", "--name", "DB_PASSWORD", "--type", "password", "--stdin",
                              "--project", "clishop", api_key=project, input=value)["secret"]
    assert s["version"] == 2 and set(s) >= {"name", "type", "scope", "version", "updated_at"}
    listed = run(platform, project, "secrets", "list")["secrets"]
    assert [(x["name"], x["type"], x["scope"], x["version"]) for x in listed] == [("DB_PASSWORD", "password", "project", 2)]
    versions = run(platform, project, "secrets", "versions", "--name", "DB_PASSWORD")["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    restored = run(platform, project, "secrets", "rollback", "--name", "DB_PASSWORD", "--to-version", "1")["secret"]
    assert restored["version"] == 3
    deleted = run(platform, project, "secrets", "delete", "--name", "DB_PASSWORD")["secret"]
    assert deleted["name"] == "DB_PASSWORD"
    assert run(platform, project, "secrets", "list")["secrets"] == []
    rotated = platform.cli_json("secrets", "rotate-key")
    assert rotated["data_keys_rewrapped"] >= 1 and rotated["key_fingerprint"]
    everything = platform.output()
    assert "first" not in everything and "second" not in everything


def test_errors_are_one_clear_line(platform, project):
    wrong_project = platform.cli("deployments", "--project", "not-mine", api_key=project, check=False)
    assert wrong_project.returncode == 4 and len(wrong_project.stderr.strip().splitlines()) <= 2
    assert "belongs to project 'clishop'" in wrong_project.stderr

    missing_key = platform.cli("deployments", "--project", "clishop", check=False)
    assert missing_key.returncode == 4 and "BERTH_API_KEY" in missing_key.stderr

    closed = free_port()
    unreachable = platform.cli("deployments", "--project", "clishop", api_key=project, check=False,
                               env_extra={"BERTH_REGISTRY_ADDR": f"127.0.0.1:{closed}"})
    assert unreachable.returncode == 8 and "berth up" in unreachable.stderr
    for result in (wrong_project, missing_key, unreachable):
        assert "Traceback" not in result.stderr

    no_path = platform.cli("deploy", "--project", "clishop", api_key=project, check=False)
    assert no_path.returncode == 2 and "PATH" in no_path.stderr
