"""The Node.js example client (examples/clients/node) as a CI pipeline runs
it: against a real ``berth up`` on free ports, through the public gRPC API
only, with @grpc/grpc-js installed from the committed package-lock.json.

Node and npm are installed here when the machine lacks them (Debian's
``nodejs``/``npm``), so the test runs on a clean CI machine; it fails, never
skips, when they cannot be had."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator

import docker
import pytest

from tests.support.docker_engine import build_worker_image, engine
from tests.support.platform import ROOT, RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CLIENT_DIR = ROOT / "examples" / "clients" / "node"
CLIENT_FILES = ("package.json", "package-lock.json", "berth-client.mjs")
MIN_NODE_MAJOR = 18
CLIENT_TIMEOUT = 240  # seconds; the run itself takes a few
BROKEN_IMAGE = "berth-ci-missing.invalid/none:1"  # .invalid never resolves: a fast, certain pull failure

EXPECTED_CHECKS = [
    "create_project", "watch_open", "list_environments", "set_secret", "deploy_v1", "deploy_v2",
    "promote_v1_staging", "promote_v1_production", "promote_v2_staging", "promote_v2_production",
    "rollback_production", "watch_moves", "watch_resume", "history_preview", "history_staging", "history_production",
    "image_resolved", "status_v1_running_in_production", "errors_v1_none", "errors_broken_image_pull",
    "router_serves_v1_in_production",
    "unknown_deployment_registry", "unknown_deployment_scheduler", "promote_production_unconfirmed",
    "production_unchanged_after_refusal", "deploy_empty_image",
    "wrong_key_registry", "wrong_key_secrets", "wrong_key_scheduler", "no_key_registry",
    "watch_bad_revision", "watch_wrong_key",
]


def _run(cmd: list[str], *, what: str, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: `{' '.join(cmd)}` did not finish within {timeout:g} s")
    except OSError as exc:
        pytest.fail(f"{what}: cannot run `{cmd[0]}`: {exc}")
    if result.returncode != 0:
        pytest.fail(f"{what}: `{' '.join(cmd)}` exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _ensure_node() -> tuple[str, str]:
    """node and npm, installed from Debian's packages when missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.fail(
                "Node.js and npm are needed for the Node client test and are not installed; this test installs "
                "them with apt-get (as root) on a Debian machine. Install them yourself: apt-get install nodejs npm"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
        _run([*apt, "update", "-qq"], what="installing Node.js (apt-get update)", timeout=600, env=env)
        _run([*apt, "install", "-y", "-qq", "nodejs", "npm"], what="installing Node.js (apt-get install nodejs npm)",
             timeout=900, env=env)
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"after apt-get install nodejs npm: node={node} npm={npm}; the Node client cannot run")
    version = _run([node, "--version"], what="node --version", timeout=30).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < MIN_NODE_MAJOR:
        pytest.fail(f"node {version} is too old for the Node client (needs {MIN_NODE_MAJOR} or newer)")
    return node, npm


@pytest.fixture(scope="session")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pathlib.Path]:
    """(node, the client script) with its dependencies installed by ``npm ci``
    from the committed lock file, in a directory of this session's own (so
    concurrent runs never share a node_modules being rewritten)."""
    node, npm = _ensure_node()
    workdir = tmp_path_factory.mktemp("node-client")
    for name in CLIENT_FILES:
        shutil.copy2(CLIENT_DIR / name, workdir / name)
    # One npm at a time on this machine: they share the package cache.
    with open(tmp_path_factory.getbasetemp().parent / "berth-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
             what="installing the Node client's dependencies (npm ci)", timeout=600, cwd=workdir)
    lock_data = json.loads((workdir / "package-lock.json").read_text())
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        installed = json.loads((workdir / "node_modules" / package / "package.json").read_text())["version"]
        assert installed == lock_data["packages"][f"node_modules/{package}"]["version"], package
    return node, workdir / "berth-client.mjs"


@pytest.fixture
def platform_with_image(tmp_path: pathlib.Path) -> Iterator[tuple[RunningPlatform, str, str]]:
    """A running ``berth up`` and a locally built worker image (tag, id);
    replicas, the image and the platform are gone afterwards, also on failure."""
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    client = engine()
    image_id = ""
    try:
        tag, image_id = build_worker_image(client, version="node-client")
        p.start()
        yield p, tag, image_id
    finally:
        p.stop()
        p.remove_containers()
        if image_id:
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(image_id, force=True)


@pytest.mark.timeout(1200)  # a first run on a clean machine installs Node.js
def test_node_client_runs_a_ci_pipeline(node_client, platform_with_image):
    node, script = node_client
    platform, tag, image_id = platform_with_image
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("BERTH_")
    } | {
        "BERTH_REGISTRY_ADDR": f"127.0.0.1:{platform.ports['registry']}",
        "BERTH_SECRETS_ADDR": f"127.0.0.1:{platform.ports['secrets']}",
        "BERTH_SCHEDULER_ADDR": f"127.0.0.1:{platform.ports['scheduler']}",
        "BERTH_ADMIN_KEY": (platform.data_dir / "admin.key").read_text().strip(),
        "BERTH_IMAGE": tag,
        "BERTH_PROJECT_NAME": "node-ci",
        "BERTH_ROUTER_URL": platform.router,
        "BERTH_ROUTER_PATH": "/cgi-bin/index.cgi",
        "BERTH_BROKEN_IMAGE": BROKEN_IMAGE,
        "BERTH_PROTOS_DIR": str(ROOT / "protos"),
        "BERTH_WAIT_SECONDS": "90",
    }
    try:
        run = subprocess.run([node, str(script)], env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the Node client did not finish within {CLIENT_TIMEOUT} s\n{exc.stderr}\n{platform.output()}")
    lines = run.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"no JSON summary from the Node client (exit {run.returncode})\nstdout: {run.stdout[-3000:]}\n"
                    f"stderr: {run.stderr[-3000:]}\n{platform.output()}")
    context = f"{run.stderr}\n{json.dumps(summary, indent=1)[:6000]}"
    assert run.returncode == 0 and summary["ok"] is True, f"Node client failed: {summary.get('failures')}\n{context}"
    assert summary["failures"] == []

    # Every check ran and passed; nothing silently left out.
    assert [c["name"] for c in summary["checks"]] == EXPECTED_CHECKS, context
    assert all(c["ok"] for c in summary["checks"]), context
    assert summary["skipped"] == [], context
    # Only the public package was loaded (plus the google.* types it imports).
    packages = summary["loaded_packages"]
    assert "berth.v1" in packages and [p for p in packages if p.startswith("berth.")] == ["berth.v1"], context

    assert summary["project"]["name"] == "node-ci" and summary["project"]["id"].startswith("prj_")
    v1, v2 = summary["deployments"]["v1"], summary["deployments"]["v2"]
    assert summary["image"] == tag and summary["image_id"] == image_id  # registered by reference, resolved by the scheduler

    history = {env_name: [(e["kind"], e["deployment_id"]) for e in entries] for env_name, entries in summary["history"].items()}
    assert history == {
        "preview": [("deploy", v1), ("deploy", v2)],
        "staging": [("promote", v1), ("promote", v2)],
        "production": [("promote", v1), ("promote", v2), ("rollback", v1)],
    }, context
    assert [e["sequence"] for e in summary["history"]["production"]] == [1, 2, 3]

    # The moves, as the project's own watch (WatchEnvironments, project key) saw them: every one, in commit order.
    moves = [tuple(m) for m in summary["watch"]["moves"]]
    assert moves == [
        ("preview", "deploy", 1, v1), ("preview", "deploy", 2, v2),
        ("staging", "promote", 1, v1), ("production", "promote", 1, v1),
        ("staging", "promote", 2, v2), ("production", "promote", 2, v2),
        ("production", "rollback", 3, v1),
    ], context
    for env_name, entries in summary["history"].items():  # the same moves the history holds
        assert [(kind, seq, dep) for name, kind, seq, dep in moves if name == env_name] == [
            (e["kind"], e["sequence"], e["deployment_id"]) for e in entries], context
    revisions = [int(r) for r in summary["watch"]["revisions"]]
    assert revisions == sorted(set(revisions))
    # Resumed from the fourth move's revision: exactly the three after it.
    assert [tuple(m) for m in summary["watch"]["resumed"]] == moves[4:], context

    bindings = {b["environment"]: b for b in summary["status"]["bindings"]}
    assert summary["status"]["deployment_id"] == v1 and set(bindings) == {"preview", "staging", "production"}
    assert bindings["production"]["serving"] and bindings["production"]["status"] == "running"
    assert bindings["production"]["replicas"] == ["ready"]
    assert summary["router"] == {"status": 200, "deployment": v1}

    assert summary["errors"]["v1"] == []
    broken = summary["errors"]["broken"]
    assert [e["kind"] for e in broken] == ["image_pull_error"] and broken[0]["environment"] == "ci-broken", context
    assert "berth-ci-missing.invalid" in broken[0]["message"]

    codes = {name: answer["code"] for name, answer in summary["bad_input"].items()}
    assert codes == {
        "unknown_deployment_registry": "NOT_FOUND",
        "unknown_deployment_scheduler": "NOT_FOUND",
        "promote_production_unconfirmed": "FAILED_PRECONDITION",
        "deploy_empty_image": "INVALID_ARGUMENT",
        "wrong_key_registry": "UNAUTHENTICATED",
        "wrong_key_secrets": "UNAUTHENTICATED",
        "wrong_key_scheduler": "UNAUTHENTICATED",
        "no_key_registry": "UNAUTHENTICATED",
        "watch_bad_revision": "INVALID_ARGUMENT",
        "watch_wrong_key": "UNAUTHENTICATED",
    }, context
    messages = {name: answer["message"] for name, answer in summary["bad_input"].items()}
    assert "dep_000000000000" in messages["unknown_deployment_registry"]
    assert "production" in messages["promote_production_unconfirmed"]
    assert "image" in messages["deploy_empty_image"]
    # The google.rpc.Status details, decoded by the Node client from grpc-status-details-bin.
    reasons = {name: answer["reason"] for name, answer in summary["bad_input"].items()}
    assert all(reasons.values()), reasons
    assert reasons["promote_production_unconfirmed"] == "PROTECTED_ENVIRONMENT"
    assert "--yes" in summary["bad_input"]["promote_production_unconfirmed"]["metadata"]["hint"]
    assert summary["bad_input"]["deploy_empty_image"]["fields"] == ["image"]
    assert summary["bad_input"]["watch_bad_revision"]["fields"] == ["since_revision"]
    assert summary["bad_input"]["unknown_deployment_registry"]["details"] == [
        "type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.ResourceInfo"]

    # The secret's value went in and never came back out.
    assert "ci-canary-" not in run.stdout + run.stderr
    # The replicas are real containers of this platform.
    assert len(platform.containers()) >= 5
