"""Secrets over real gRPC next to a real registry: scoping, resolution,
write-only values, tamper evidence."""
from __future__ import annotations

import base64
import os

import grpc
import pytest
from sqlalchemy import create_engine, text

from berth import errors
from berth.client import error_from_rpc
from berth.v1 import secrets_pb2, secrets_pb2_grpc
from services.secrets import app as secrets_app
from tests.registry.conftest import SERVICE_TOKEN, Registry
from tests.support.inproc import start_in_background

CANARY = "canary-4f1d2b9e"


class Secrets:
    def __init__(self, registry: Registry, database_url: str) -> None:
        self.bg, (self.running, self.closers) = start_in_background(
            lambda: secrets_app.start(
                host="127.0.0.1", port=0, database_url=database_url, master_key=os.urandom(32),
                registry=f"127.0.0.1:{registry.running.port}", service_token=SERVICE_TOKEN,
            )
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = secrets_pb2_grpc.SecretsStub(self.channel)

    def call(self, name, request, key):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.stub, name)(request, metadata=(("x-api-key", key),), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0.5))
        self.bg.close()


@pytest.fixture
def platform(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    db_url = f"sqlite:///{tmp_path / 'secrets.db'}"
    secrets = Secrets(registry, db_url)
    yield registry, secrets, db_url
    secrets.close()
    registry.close()


def test_environment_overrides_project_and_values_stay_write_only(platform):
    registry, secrets, _ = platform
    project_id, key = registry.create_project("shop")
    secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="API_TOKEN", type="token", value="project-" + CANARY), key)
    secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="API_TOKEN", type="token", value="staging-" + CANARY, environment="staging"), key)
    second = secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="API_TOKEN", type="token", value="p2-" + CANARY), key)
    assert second.version == 2 and second.scope == "project"

    listed = secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), key)
    assert [(s.name, s.scope, s.version) for s in listed.secrets] == [("API_TOKEN", "project", 2)]
    staging = secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(environment="staging"), key)
    assert [(s.name, s.scope, s.version) for s in staging.secrets] == [("API_TOKEN", "environment:staging", 1)]
    assert CANARY not in str(listed) + str(staging)

    envs = {e.name: e.id for e in registry.call("ListEnvironments", __import__("berth.v1.registry_pb2", fromlist=["x"]).ListEnvironmentsRequest(), key).environments}
    resolved = secrets.call("ResolveSecrets", secrets_pb2.ResolveSecretsRequest(project_id=project_id, environment_id=envs["staging"]), SERVICE_TOKEN)
    assert [(s.name, s.value) for s in resolved.secrets] == [("API_TOKEN", "staging-" + CANARY)]
    resolved = secrets.call("ResolveSecrets", secrets_pb2.ResolveSecretsRequest(project_id=project_id, environment_id=envs["preview"]), SERVICE_TOKEN)
    assert [(s.name, s.value, s.version) for s in resolved.secrets] == [("API_TOKEN", "p2-" + CANARY, 2)]

    with pytest.raises(errors.PermissionDenied, match="write-only"):
        secrets.call("ResolveSecrets", secrets_pb2.ResolveSecretsRequest(project_id=project_id, environment_id=envs["preview"]), key)


def test_isolation_and_bad_input(platform):
    registry, secrets, _ = platform
    registry.create_project("alpha")
    _, key_b = registry.create_project("beta")
    with pytest.raises(errors.PermissionDenied):
        secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(project="alpha"), key_b)
    with pytest.raises(errors.Unauthenticated):
        secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), "berth_pk_nope")
    with pytest.raises(errors.InvalidArgument, match="environment variable"):
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="1BAD", type="token", value="x"), key_b)
    with pytest.raises(errors.InvalidArgument, match="type 'weird'"):
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="OK", type="weird", value="x"), key_b)
    with pytest.raises(errors.NotFound, match="environment 'nope'"):
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="OK", type="token", value="x", environment="nope"), key_b)
    assert list(secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), key_b).secrets) == []


def test_tampered_or_moved_ciphertext_fails_loudly(platform):
    registry, secrets, db_url = platform
    project_id, key = registry.create_project("shop")
    secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="A", type="password", value=CANARY), key)
    secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="B", type="password", value="other"), key)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        rows = {r.name: r for r in conn.execute(text("SELECT name, ciphertext, nonce FROM secret_versions"))}
        # Copy A's ciphertext into B's row: same key, wrong place.
        conn.execute(text("UPDATE secret_versions SET ciphertext=:c, nonce=:n WHERE name='B'"), {"c": rows["A"].ciphertext, "n": rows["A"].nonce})
    with pytest.raises(errors.FailedPrecondition, match="failed to decrypt") as info:
        secrets.call("ResolveSecrets", secrets_pb2.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
    assert CANARY not in str(info.value)
    with engine.begin() as conn:
        flipped = bytearray(rows["A"].ciphertext)
        flipped[0] ^= 1
        conn.execute(text("UPDATE secret_versions SET ciphertext=:c WHERE name='A'"), {"c": bytes(flipped)})
        conn.execute(text("UPDATE secret_versions SET ciphertext=:c, nonce=:n WHERE name='B'"), {"c": rows["B"].ciphertext, "n": rows["B"].nonce})
    with pytest.raises(errors.FailedPrecondition, match="secret 'A'"):
        secrets.call("ResolveSecrets", secrets_pb2.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
    # The service survives and keeps answering.
    assert len(secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), key).secrets) == 2


def test_master_key_file_is_private(tmp_path):
    from services.secrets.crypto import load_master_key

    path = tmp_path / "keys" / "master.key"
    key = load_master_key(env_value="", key_file=path)
    assert len(key) == 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_master_key(env_value="", key_file=path) == key
    assert load_master_key(env_value=base64.b64encode(b"k" * 32).decode(), key_file=None) == b"k" * 32
    with pytest.raises(errors.InvalidArgument):
        load_master_key(env_value=base64.b64encode(b"short").decode(), key_file=None)
