"""Secrets on the whole platform (``berth up``, the real CLI, real
containers): a secret change rolls the replicas under constant load without
a failed request, and a canary value is found only inside the container.

Calls the CLI has no command for yet (versions, rollback, delete,
rotate-key) go straight to the secrets service's gRPC port, as the CLI will.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from typing import Self

import grpc
import pytest
import requests

from berth import errors
from berth.client import error_from_rpc
from berth.internal.v1 import secrets_internal_pb2, secrets_internal_pb2_grpc
from berth.v1 import secrets_pb2 as pb
from berth.v1 import secrets_pb2_grpc
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context
from tests.support.platform import RunningPlatform, eventually

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

LOAD_THREADS = 8
LOAD_MAX_SECONDS = 150  # bound of the load loop, whatever happens


@pytest.fixture
def platform(tmp_path):
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    p.start()
    yield p
    p.stop()
    p.remove_containers()
    remove_labelled(engine(), TEST_LABEL)


class Load:
    """LOAD_THREADS clients requesting through the router until stopped."""

    def __init__(self, platform: RunningPlatform, project: str, environment: str) -> None:
        self.platform, self.project, self.environment = platform, project, environment
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.secrets_seen: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.phase = "steady"
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOAD_THREADS)]

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + LOAD_MAX_SECONDS
        headers = {"X-Berth-Project": self.project, "X-Berth-Environment": self.environment}
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                resp = session.get(self.platform.router + "/cgi-bin/index.cgi", headers=headers, timeout=30)
            except requests.RequestException as exc:
                with self.lock:
                    self.failures.append(f"at +{sent - self.t0:.1f}s ({self.phase}): {type(exc).__name__}: {exc}")
                continue
            with self.lock:
                if resp.status_code != 200:
                    self.failures.append(f"at +{sent - self.t0:.1f}s ({self.phase}): {resp.status_code} {resp.text[:200]}")
                    continue
                self.ok += 1
                secret = next((line[7:] for line in resp.text.splitlines() if line.startswith("secret=")), "")
                self.secrets_seen[secret] = self.secrets_seen.get(secret, 0) + 1

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def seen(self, secret: str) -> int:
        with self.lock:
            return self.secrets_seen.get(secret, 0)


def container_envs(platform: RunningPlatform, deployment_id: str) -> list[dict[str, str]]:
    """Environment of each running replica of the deployment (docker inspect)."""
    envs = []
    for c in platform.containers():
        if c.labels.get("berth.deployment") == deployment_id and c.status == "running":
            envs.append(dict(item.split("=", 1) for item in c.attrs["Config"]["Env"]))
    return envs


def replicas_all_have(platform: RunningPlatform, deployment_id: str, name: str, value: str | None, count: int) -> bool:
    """All ``count`` replicas (and no stale one) carry ``name=value`` (None: absent)."""
    all_containers = [c for c in platform.containers() if c.labels.get("berth.deployment") == deployment_id]
    envs = container_envs(platform, deployment_id)
    return len(all_containers) == count and len(envs) == count and all(e.get(name) == value for e in envs)


def describe(platform: RunningPlatform, deployment_id: str) -> list[tuple[str, str, bool]]:
    return [
        (c.name, c.status, "APP_SECRET" in json.dumps(c.attrs["Config"]["Env"]))
        for c in platform.containers() if c.labels.get("berth.deployment") == deployment_id
    ]


def test_secret_changes_roll_replicas_under_load_and_the_canary_never_leaks(platform, tmp_path):
    canaries = [f"canary-{uuid.uuid4().hex}" for _ in range(2)]
    outputs: list[str] = []  # everything the CLI and the services said to us

    def cli_json(*args: str, **kw):  # type: ignore[no-untyped-def]
        result = platform.cli(*args, "--output", "json", **kw)
        outputs.extend([result.stdout, result.stderr])
        return json.loads(result.stdout)["data"]

    key = cli_json("projects", "create", "vault")["api_key"]
    admin_key = (platform.data_dir / "admin.key").read_text().strip()
    channel = grpc.insecure_channel(f"127.0.0.1:{platform.ports['secrets']}")
    stub = secrets_pb2_grpc.SecretsStub(channel)
    internal_stub = secrets_internal_pb2_grpc.SecretsInternalStub(channel)

    def rpc(method: str, request, api_key: str = key, *, internal: bool = False):  # type: ignore[no-untyped-def]
        try:
            target = internal_stub if internal else stub
            answer = getattr(target, method)(request, metadata=(("x-api-key", api_key),), timeout=30)
        except grpc.RpcError as exc:
            outputs.append(f"{exc.code()} {exc.details()}")
            raise error_from_rpc(exc) from None
        outputs.append(str(answer))
        return answer

    cli_json("secrets", "set", "--project", "vault", "--name", "APP_SECRET", "--type", "api_key", "--stdin",
             api_key=key, input=canaries[0] + "\n")
    write_worker_context(str(tmp_path / "worker"), version="v1")
    deployed = cli_json("deploy", str(tmp_path / "worker"), "--project", "vault", "--var", "SHOW_SECRET=APP_SECRET",
                        "--min-replicas", "2", "--max-replicas", "2", api_key=key)
    dep_id = deployed["deployment"]["id"]
    assert deployed["status"] == "running"
    assert replicas_all_have(platform, dep_id, "APP_SECRET", canaries[0], 2)

    figures = {}
    with Load(platform, "vault", "preview") as load:
        eventually(lambda: load.seen(canaries[0]) >= 20, timeout=60, what="load running")
        # 1. A new value: version 2. The scheduler's spec hash changes; replicas roll.
        started = time.monotonic()
        load.phase = "set"
        cli_json("secrets", "set", "--project", "vault", "--name", "APP_SECRET", "--type", "api_key", "--stdin",
                 api_key=key, input=canaries[1] + "\n")
        eventually(lambda: replicas_all_have(platform, dep_id, "APP_SECRET", canaries[1], 2), timeout=90,
                   what="replicas replaced with the new value")
        figures["set_to_rolled_s"] = round(time.monotonic() - started, 1)
        seen_before = load.seen(canaries[1])
        eventually(lambda: load.seen(canaries[1]) >= seen_before + 20, timeout=60, what="new value served")
        assert load.seen(canaries[1]) > seen_before  # the replicas see the new value

        # 2. The master key is rotated under load: nothing rolls (no version changed), nothing fails.
        load.phase = "rotate"
        rotated = rpc("RotateMasterKey", pb.RotateMasterKeyRequest(), admin_key)
        assert rotated.data_keys_rewrapped == 1 and len(rotated.key_fingerprint) == 16

        # 3. Rollback to version 1: the first value comes back as version 3.
        started = time.monotonic()
        load.phase = "rollback"
        back = rpc("RollbackSecret", pb.RollbackSecretRequest(name="APP_SECRET", to_version=1))
        assert back.version == 3
        eventually(lambda: replicas_all_have(platform, dep_id, "APP_SECRET", canaries[0], 2), timeout=90,
                   what="replicas rolled back to the first value")
        figures["rollback_to_rolled_s"] = round(time.monotonic() - started, 1)
        seen_before = load.seen(canaries[0])
        eventually(lambda: load.seen(canaries[0]) >= seen_before + 20, timeout=60, what="old value served")
    figures["requests_ok"], figures["requests_failed"] = load.ok, len(load.failures)
    print("figures:", figures)

    # 4. Delete: the replicas roll again and no longer carry the variable.
    deleted = rpc("DeleteSecret", pb.DeleteSecretRequest(name="APP_SECRET")).secret
    assert deleted.deleted and deleted.version == 4
    eventually(lambda: replicas_all_have(platform, dep_id, "APP_SECRET", None, 2), timeout=90,
               what=f"replicas without it (state: {describe(platform, dep_id)})")
    body = platform.get("vault", "preview", "/cgi-bin/index.cgi").text
    assert "secret=\n" in body + "\n" or "secret=" not in body.replace("secret=\n", "")
    versions = rpc("ListSecretVersions", pb.ListSecretVersionsRequest(name="APP_SECRET")).versions
    assert [(v.version, v.deleted) for v in versions] == [(1, False), (2, False), (3, False), (4, True)]

    # Error paths carry no value either.
    for bad in (
        lambda: rpc("SetSecret", pb.SetSecretRequest(name="bad-name", type="token", value=canaries[0])),
        lambda: rpc("SetSecret", pb.SetSecretRequest(name="OK", type="nope", value=canaries[1])),
        lambda: rpc("RollbackSecret", pb.RollbackSecretRequest(name="APP_SECRET", to_version=4)),
        lambda: rpc("ResolveSecrets", secrets_internal_pb2.ResolveSecretsRequest(
            project_id=deployed["deployment"].get("project_id", "")), internal=True),
    ):
        with pytest.raises(errors.BerthError):
            bad()
    for args in (("secrets", "list"), ("secrets", "list", "--environment", "preview"), ("deployment", "status", dep_id),
                 ("deployment", "errors", dep_id), ("history", "--environment", "preview"), ("deployments",)):
        cli_json(*args, "--project", "vault", api_key=key)

    # Positive control: the canary IS in a container's environment (a
    # replica of the first value is recreated for this by rolling back).
    rpc("RollbackSecret", pb.RollbackSecretRequest(name="APP_SECRET", to_version=2))
    eventually(lambda: replicas_all_have(platform, dep_id, "APP_SECRET", canaries[1], 2), timeout=90,
               what="replicas carry the canary again")
    inspected = json.dumps([c.attrs for c in platform.containers()])
    assert canaries[1] in inspected
    channel.close()

    # The hunt: every database (every table, every column, as text and hex),
    # every file of the data directory (logs, WAL, key files), every output.
    platform.stop()  # flushes logs and checkpoints nothing away: raw files are scanned too
    found: list[str] = []
    for db in sorted(platform.data_dir.rglob("*.db")):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            assert tables, f"{db} has no tables"
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    for value in row:
                        as_bytes = value if isinstance(value, bytes) else str(value).encode()
                        for canary in canaries:
                            if canary in str(value) or canary.encode().hex() in as_bytes.hex():
                                found.append(f"{db.name}:{table}")
        finally:
            conn.close()
    scanned = 0
    for path in sorted(p for p in platform.data_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        scanned += 1
        for canary in canaries:
            if canary.encode() in data:
                found.append(str(path.relative_to(platform.data_dir)))
    assert scanned >= 6  # databases, logs, key files
    logs = "".join(p.read_text(errors="replace") for p in (platform.data_dir / "logs").glob("*.log"))
    assert "secret_set" in logs and "master_key_rotated" in logs  # the logs are real and do talk about secrets
    for text_ in outputs:
        for canary in canaries:
            if canary in text_:
                found.append(f"output: {text_[:120]}")
    assert not found, f"canary leaked into: {found}"

    # The scheduler drains a replaced replica (out of the routers' pool, then
    # stopped) and the router retries a cut idempotent request: no request fails.
    assert not load.failures, (
        f"rolling replacement lost {len(load.failures)} of {load.ok + len(load.failures)} requests: {load.failures[:3]}"
    )
