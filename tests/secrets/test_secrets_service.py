"""Secrets over real gRPC next to a real registry: scoping, resolution,
write-only values, tamper evidence."""
from __future__ import annotations

import base64

import pytest
from sqlalchemy import create_engine, text

from berth import errors
from berth.internal.v1 import secrets_internal_pb2 as internal
from berth.shapes import secret_scope
from berth.v1 import secrets_pb2
from tests.secrets.support import SERVICE_TOKEN, Registry, Secrets, environment_ids

CANARY = "canary-4f1d2b9e"


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
    assert second.version == 2 and second.scope == secrets_pb2.SecretInfo.SCOPE_PROJECT

    listed = secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), key)
    assert [(s.name, secret_scope(s), s.version) for s in listed.secrets] == [("API_TOKEN", "project", 2)]
    staging = secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(environment="staging"), key)
    assert [(s.name, secret_scope(s), s.version) for s in staging.secrets] == [("API_TOKEN", "environment:staging", 1)]
    assert CANARY not in str(listed) + str(staging)

    envs = environment_ids(registry, key)
    resolved = secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id, environment_id=envs["staging"]), SERVICE_TOKEN)
    assert [(s.name, s.value) for s in resolved.secrets] == [("API_TOKEN", "staging-" + CANARY)]
    resolved = secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id, environment_id=envs["preview"]), SERVICE_TOKEN)
    assert [(s.name, s.value, s.version) for s in resolved.secrets] == [("API_TOKEN", "p2-" + CANARY, 2)]

    with pytest.raises(errors.PermissionDenied, match="only Berth's own services"):
        secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id, environment_id=envs["preview"]), key)


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


def test_errors_carry_structured_details(platform):
    """The google.rpc.Status details come back through berth.client into the
    exception: BadRequest's field, ErrorInfo's reason and hint, ResourceInfo."""
    registry, secrets, _ = platform
    registry.create_project("alpha")
    _, key = registry.create_project("beta")
    with pytest.raises(errors.InvalidArgument) as bad_name:
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="1BAD", type="token", value="x"), key)
    assert (bad_name.value.field, bad_name.value.reason) == ("name", "INVALID_ARGUMENT")
    assert "environment variable" in bad_name.value.description
    with pytest.raises(errors.InvalidArgument) as bad_type:
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="OK", type="weird", value="x"), key)
    assert bad_type.value.field == "type"
    with pytest.raises(errors.InvalidArgument) as bad_version:
        secrets.call("RollbackSecret", secrets_pb2.RollbackSecretRequest(name="OK", to_version=0), key)
    assert bad_version.value.field == "to_version"
    with pytest.raises(errors.NotFound) as missing_env:
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="OK", type="token", value="x", environment="nope"), key)
    # Raised by the registry, carried through the secrets service unchanged.
    assert (missing_env.value.reason, missing_env.value.resource_type, missing_env.value.resource_name) == (
        "NOT_FOUND", "environment", "nope")
    assert "known environments: preview" in missing_env.value.hint and "hint" not in missing_env.value.message
    with pytest.raises(errors.NotFound) as missing:
        secrets.call("DeleteSecret", secrets_pb2.DeleteSecretRequest(name="NOPE"), key)
    assert (missing.value.resource_type, missing.value.resource_name) == ("secret", "NOPE")
    assert "berth secrets list" in missing.value.hint
    with pytest.raises(errors.PermissionDenied) as other:
        secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(project="alpha"), key)
    assert other.value.reason == "WRONG_PROJECT" and other.value.metadata == {"key_project": "beta"}
    with pytest.raises(errors.Unauthenticated) as nobody:
        secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), "berth_pk_nope")
    assert nobody.value.reason == "API_KEY_INVALID"


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
        secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
    assert CANARY not in str(info.value)
    with engine.begin() as conn:
        flipped = bytearray(rows["A"].ciphertext)
        flipped[0] ^= 1
        conn.execute(text("UPDATE secret_versions SET ciphertext=:c WHERE name='A'"), {"c": bytes(flipped)})
        conn.execute(text("UPDATE secret_versions SET ciphertext=:c, nonce=:n WHERE name='B'"), {"c": rows["B"].ciphertext, "n": rows["B"].nonce})
    with pytest.raises(errors.FailedPrecondition, match="secret 'A'"):
        secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
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


def _resolve(secrets, project_id, environment_id=""):  # type: ignore[no-untyped-def]
    request = internal.ResolveSecretsRequest(project_id=project_id, environment_id=environment_id)
    return {s.name: s.value for s in secrets.call_internal("ResolveSecrets", request).secrets}


def test_rows_moved_across_projects_and_environments_and_wrapped_keys_fail(platform):
    """Each copy below is the strongest forgery an attacker with write access
    to the database has: same name, same version, only the place differs."""
    registry, secrets, db_url = platform
    pa, key_a = registry.create_project("alpha")
    pb, key_b = registry.create_project("beta")
    envs = environment_ids(registry, key_a)
    set_ = secrets_pb2.SetSecretRequest
    secrets.call("SetSecret", set_(name="TOKEN", type="token", value="a-" + CANARY), key_a)
    secrets.call("SetSecret", set_(name="TOKEN", type="token", value="a-staging-" + CANARY, environment="staging"), key_a)
    secrets.call("SetSecret", set_(name="TOKEN", type="token", value="a-production-" + CANARY, environment="production"), key_a)
    secrets.call("SetSecret", set_(name="TOKEN", type="token", value="b-value"), key_b)
    engine = create_engine(db_url)

    def row(project_id, environment_id):  # type: ignore[no-untyped-def]
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT nonce, ciphertext FROM secret_versions WHERE project_id=:p AND environment_id=:e"),
                {"p": project_id, "e": environment_id},
            ).one()

    def put(project_id, environment_id, nonce, ciphertext):  # type: ignore[no-untyped-def]
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE secret_versions SET nonce=:n, ciphertext=:c WHERE project_id=:p AND environment_id=:e"),
                {"n": nonce, "c": ciphertext, "p": project_id, "e": environment_id},
            )

    originals = {
        "b": row(pb, ""), "staging": row(pa, envs["staging"]), "production": row(pa, envs["production"]),
    }
    # Project A's ciphertext in project B's row.
    put(pb, "", *row(pa, ""))
    with pytest.raises(errors.FailedPrecondition, match="secret 'TOKEN' version 1 \\(project\\) failed to decrypt") as info:
        _resolve(secrets, pb)
    assert CANARY not in str(info.value)
    put(pb, "", *originals["b"])
    assert _resolve(secrets, pb) == {"TOKEN": "b-value"}

    # Staging's ciphertext in production's row (same project, same data key).
    put(pa, envs["production"], *originals["staging"])
    with pytest.raises(errors.FailedPrecondition, match="environment:production\\) failed to decrypt") as info:
        _resolve(secrets, pa, envs["production"])
    assert CANARY not in str(info.value)
    assert _resolve(secrets, pa, envs["staging"]) == {"TOKEN": "a-staging-" + CANARY}  # the source still works
    put(pa, envs["production"], *originals["production"])
    assert _resolve(secrets, pa, envs["production"]) == {"TOKEN": "a-production-" + CANARY}

    # The project scope's ciphertext in the staging row.
    put(pa, envs["staging"], *row(pa, ""))
    with pytest.raises(errors.FailedPrecondition, match="failed to decrypt"):
        _resolve(secrets, pa, envs["staging"])
    put(pa, envs["staging"], *originals["staging"])

    # Wrapped data keys: A's in B's row, then one flipped byte.
    with engine.connect() as conn:
        keys = {r.project_id: r for r in conn.execute(text("SELECT project_id, nonce, wrapped_key FROM secret_data_keys"))}
    with engine.begin() as conn:
        conn.execute(text("UPDATE secret_data_keys SET nonce=:n, wrapped_key=:w WHERE project_id=:p"),
                     {"n": keys[pa].nonce, "w": keys[pa].wrapped_key, "p": pb})
    with pytest.raises(errors.FailedPrecondition, match=f"the data key of project {pb} failed to decrypt"):
        _resolve(secrets, pb)
    flipped = bytearray(keys[pb].wrapped_key)
    flipped[len(flipped) // 2] ^= 0x80
    with engine.begin() as conn:
        conn.execute(text("UPDATE secret_data_keys SET nonce=:n, wrapped_key=:w WHERE project_id=:p"),
                     {"n": keys[pb].nonce, "w": bytes(flipped), "p": pb})
    with pytest.raises(errors.FailedPrecondition, match="data key of project"):
        _resolve(secrets, pb)
    # A set into a project whose data key is broken fails the same way, and stores nothing.
    with pytest.raises(errors.FailedPrecondition, match="data key of project"):
        secrets.call("SetSecret", set_(name="OTHER", type="token", value="x-" + CANARY), key_b)
    # Project A is untouched and the service keeps serving.
    assert _resolve(secrets, pa) == {"TOKEN": "a-" + CANARY}
    with engine.begin() as conn:
        conn.execute(text("UPDATE secret_data_keys SET wrapped_key=:w WHERE project_id=:p"),
                     {"w": keys[pb].wrapped_key, "p": pb})
    assert _resolve(secrets, pb) == {"TOKEN": "b-value"}
