"""The Go example client (examples/clients/go) as a CI pipeline runs it:
stubs generated from protos/berth/v1 at test time with Debian's
protoc-gen-go and protoc-gen-go-grpc into a temporary GOPATH, built offline
against Debian's Go packages (/usr/share/gocode: grpc-go, protobuf-go,
genproto), then run against a real ``berth up`` on free ports through the
public gRPC API only.

The Go toolchain and packages are installed here from Debian when missing
(as the Node test installs Node); the test fails, never skips, when they
cannot be had."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import docker
import pytest

from tests.clients.test_node_client import _run
from tests.support.docker_engine import build_worker_image, engine
from tests.support.platform import ROOT, RunningPlatform

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

CLIENT = ROOT / "examples" / "clients" / "go" / "main.go"
GOCODE = pathlib.Path("/usr/share/gocode")
# Debian packages the offline build needs (the same list as scripts/setup.sh).
GO_PACKAGES = ("golang-go", "golang-google-grpc-dev", "golang-google-protobuf-dev",
               "golang-github-golang-protobuf-1-5-dev", "golang-google-genproto-dev", "protoc-gen-go",
               "protoc-gen-go-grpc", "protobuf-compiler", "libprotobuf-dev")
NEEDED = {
    "go": "golang-go",
    "protoc": "protobuf-compiler",
    "protoc-gen-go": "protoc-gen-go",
    "protoc-gen-go-grpc": "protoc-gen-go-grpc",
}
SOURCES = ("google.golang.org/grpc", "google.golang.org/protobuf", "google.golang.org/genproto/googleapis/rpc/errdetails",
           "github.com/golang/protobuf")
GO_MODULE_PREFIX = "github.com/berth-dev/berth/gen/go"  # protos' go_package
CLIENT_TIMEOUT = 180


def _missing() -> list[str]:
    missing = [package for tool, package in NEEDED.items() if shutil.which(tool) is None]
    missing += [f"{source} (in {GOCODE})" for source in SOURCES if not (GOCODE / "src" / source).is_dir()]
    if not pathlib.Path("/usr/include/google/protobuf/timestamp.proto").is_file():
        missing.append("libprotobuf-dev")
    return missing


def _ensure_go() -> None:
    if not _missing():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"the Go client needs {_missing()}; install them: apt-get install {' '.join(GO_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    _run([*apt, "update", "-qq"], what="installing Go (apt-get update)", timeout=600, env=env)
    _run([*apt, "install", "-y", "-qq", *GO_PACKAGES], what="installing Go packages", timeout=900, env=env)
    if _missing():
        pytest.fail(f"after apt-get install, still missing: {_missing()}")


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The client binary: stubs generated now from the protos on disk into a
    GOPATH of this session's own, then ``go build`` offline: GOPATH mode
    (GO111MODULE=off, GOPROXY=off) over Debian's /usr/share/gocode, so no
    module is resolved and nothing is downloaded."""
    _ensure_go()
    gopath = tmp_path_factory.mktemp("gopath")
    src = gopath / "src"
    (src / "berthclient").mkdir(parents=True)
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos" / "berth" / "v1").glob("*.proto"))
    _run(["protoc", f"-I{ROOT / 'protos'}", "-I/usr/include", f"--go_out={src}", f"--go-grpc_out={src}", *protos],
         what="generating the Go stubs (protoc-gen-go, protoc-gen-go-grpc)", timeout=120)
    generated = sorted(p.name for p in (src / GO_MODULE_PREFIX / "berth" / "v1").glob("*.go"))
    assert generated == ["common.pb.go", "registry.pb.go", "registry_grpc.pb.go", "scheduler.pb.go",
                         "scheduler_grpc.pb.go", "secrets.pb.go", "secrets_grpc.pb.go"], generated
    assert not (src / GO_MODULE_PREFIX / "berth" / "internal").exists()  # the public package only
    shutil.copy2(CLIENT, src / "berthclient" / "main.go")
    binary = gopath / "berth-go-client"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GO", "BERTH_"))} | {
        "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOCODE}", "GOCACHE": str(gopath / "cache"),
        "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0",
    }
    _run(["go", "build", "-o", str(binary), "."], what="building the Go client offline", timeout=600,
         cwd=src / "berthclient", env=env)
    return binary


@pytest.fixture
def platform_with_image(tmp_path: pathlib.Path) -> Iterator[tuple[RunningPlatform, str, str]]:
    """A running ``berth up`` and a locally built worker image (tag, id);
    replicas, the image and the platform are gone afterwards, also on failure."""
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    client = engine()
    image_id = ""
    try:
        tag, image_id = build_worker_image(client, version="go-client")
        p.start()
        yield p, tag, image_id
    finally:
        p.stop()
        p.remove_containers()
        if image_id:
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(image_id, force=True)


@pytest.mark.timeout(1500)  # a first run on a clean machine installs Go
def test_go_client_runs_a_ci_pipeline(go_client, platform_with_image):
    platform, tag, _ = platform_with_image
    env = {key: value for key, value in os.environ.items() if not key.startswith("BERTH_")} | {
        "BERTH_REGISTRY_ADDR": f"127.0.0.1:{platform.ports['registry']}",
        "BERTH_SCHEDULER_ADDR": f"127.0.0.1:{platform.ports['scheduler']}",
        "BERTH_ADMIN_KEY": (platform.data_dir / "admin.key").read_text().strip(),
        "BERTH_IMAGE": tag,
        "BERTH_PROJECT_NAME": "go-ci",
    }
    try:
        run = subprocess.run([str(go_client)], env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the Go client did not finish within {CLIENT_TIMEOUT} s\n{exc.stderr}\n{platform.output()}")
    lines = run.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"no JSON summary from the Go client (exit {run.returncode})\nstdout: {run.stdout[-3000:]}\n"
                    f"stderr: {run.stderr[-3000:]}\n{platform.output()}")
    context = f"{run.stderr}\n{json.dumps(summary, indent=1)[:6000]}"
    assert run.returncode == 0 and summary["ok"] is True and summary["failures"] == [], context
    assert [c["name"] for c in summary["checks"]] == [
        "create_project", "deploy_v1_by_image", "deploy_v2_bounds_0_1", "promote_v1_production",
        "promote_v2_production", "rollback_production", "history_production", "status_v1", "errors_latest",
        "deploy_empty_image", "deploy_min_above_max", "promote_production_unconfirmed", "promote_stale_sequence",
        "unknown_deployment", "status_without_deployment_id", "wrong_key",
    ], context

    assert summary["project"]["name"] == "go-ci" and summary["project"]["id"].startswith("prj_")
    v1, v2 = summary["deployments"]["v1"], summary["deployments"]["v2"]
    assert v1.startswith("dep_") and v2.startswith("dep_") and v1 != v2
    # Presence: unset bounds are the defaults, explicit 0..1 is honoured.
    assert summary["bounds"] == {"v1": [1, 3], "v2": [0, 1]}, context
    # History read page by page (page_size 2), enums read as the contract's words.
    assert summary["history"] == [
        {"sequence": 1, "kind": "promote", "deployment_id": v1},
        {"sequence": 2, "kind": "promote", "deployment_id": v2},
        {"sequence": 3, "kind": "rollback", "deployment_id": v1},
    ], context
    assert summary["status"]["deployment_id"] == v1 and summary["status"]["production"] in {
        "deploying", "running"}, context
    assert summary["errors"] == [], context

    bad = summary["bad_input"]
    assert {name: r["code"] for name, r in bad.items()} == {
        "deploy_empty_image": "InvalidArgument",
        "deploy_min_above_max": "InvalidArgument",
        "promote_production_unconfirmed": "FailedPrecondition",
        "promote_stale_sequence": "Aborted",
        "unknown_deployment": "NotFound",
        "status_without_deployment_id": "InvalidArgument",
        "wrong_key": "Unauthenticated",
    }, context
    assert all(r["domain"] == "berth.dev" and r["reason"] for r in bad.values()), context
    assert bad["deploy_empty_image"]["fields"] == ["image"]
    assert bad["deploy_min_above_max"]["fields"] == ["min_replicas"]
    assert bad["deploy_min_above_max"]["details"] == [
        "type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.BadRequest"], context
    assert bad["promote_production_unconfirmed"]["reason"] == "PROTECTED_ENVIRONMENT"
    assert bad["promote_stale_sequence"]["metadata"]["current_sequence"] == "3"
    assert (bad["unknown_deployment"]["resource_type"], bad["unknown_deployment"]["resource_name"]) == (
        "deployment", "dep_000000000000")
    assert bad["status_without_deployment_id"]["fields"] == ["deployment_id"]
    # The scheduler runs the registered image as real replicas of this platform (waited for, bounded).
    give_up = time.monotonic() + 90
    while not [c for c in platform.containers() if c.labels.get("berth.deployment") == v1]:
        assert time.monotonic() < give_up, f"no replica of {v1} started\n{platform.output()}"
        time.sleep(0.5)
