"""Hostile secret values are refused where they enter, on every path: the
gRPC service (INVALID_ARGUMENT naming the field), the router's REST API
(400 for NUL, 413 for a value or body too large — never a 503), and the CLI
(one clear line, no traceback). Also: the REST API's replica bounds are the
registry's own."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from berth import errors
from berth.v1 import secrets_pb2
from services.common.auth import Principal
from services.registry.domain import MAX_REPLICA_DELTA, MAX_REPLICAS_LIMIT
from services.router import api, openapi
from services.secrets.limits import MAX_VALUE_BYTES
from services.secrets.service import SecretsService
from tests.secrets.harness import Platform, platform  # noqa: F401 - the fixture
from tests.secrets.support import Registry, Secrets

ROOT = pathlib.Path(__file__).resolve().parents[2]


# -- gRPC ------------------------------------------------------------------------


def test_grpc_refuses_nul_oversize_and_empty_values(platform: Platform):  # noqa: F811
    p = platform
    with pytest.raises(errors.InvalidArgument, match=r"^value contains a NUL character \(at position 3\)"):
        p.set_secret(p.key, "abc\x00def")
    # Checked before anything else is looked up (an unknown environment too).
    with pytest.raises(errors.InvalidArgument, match="value contains a NUL"):
        p.set_secret(p.key, "abc\x00def", environment="no-such-env")
    with pytest.raises(errors.InvalidArgument, match=f"^value is larger than 64 KiB: {MAX_VALUE_BYTES + 1} bytes "
                                                     f"of UTF-8, at most {MAX_VALUE_BYTES} are allowed"):
        p.set_secret(p.key, "x" * (MAX_VALUE_BYTES + 1))
    # Bytes, not characters: 32,769 two-byte characters are over the limit.
    with pytest.raises(errors.InvalidArgument, match=f"value is larger than 64 KiB: {2 * 32769} bytes"):
        p.set_secret(p.key, "é" * 32769)
    with pytest.raises(errors.InvalidArgument, match="value is empty"):
        p.set_secret(p.key, "")
    with pytest.raises(errors.InvalidArgument, match="name is required"):
        p.set_secret(p.key, "fine", name="")
    # Nothing was stored; a value of exactly the limit, and any other text, is fine.
    listed = p.secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), p.key)
    assert list(listed.secrets) == []
    assert p.set_secret(p.key, "y" * MAX_VALUE_BYTES).version == 1
    assert p.set_secret(p.key, "multi\nline\ttabs é ✓ \U0001f600").version == 2


def test_rolling_back_to_a_value_stored_before_the_checks_is_refused(tmp_path):
    """A value holding NUL may have been stored by an older Berth: restoring
    it would break every new replica again, so rollback says why not."""
    master_key = os.urandom(32)
    db_url = f"sqlite:///{tmp_path / 'secrets.db'}"
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    secrets = Secrets(registry, db_url, master_key=master_key)
    try:
        project_id, key = registry.create_project("shop")
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="TOKEN", type="token", value="old\x01ok"), key)
        # What an older version wrote: the same encryption, no entry check.
        engine = create_engine(db_url)
        service = SecretsService(sessionmaker(engine), master_key)
        service._write("test", lambda s: service._append(
            s, Principal(project_id=project_id, key_name="old"), project_id=project_id, environment_id="",
            environment_name="", name="TOKEN", type_="token", value="abc\x00def",
        ))
        secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name="TOKEN", type="token", value="current"), key)
        with pytest.raises(errors.FailedPrecondition, match="version 2 of 'TOKEN' cannot be restored: its value "
                                                            "contains a NUL") as refused:
            secrets.call("RollbackSecret", secrets_pb2.RollbackSecretRequest(name="TOKEN", to_version=2), key)
        assert "abc" not in str(refused.value)
        restored = secrets.call("RollbackSecret", secrets_pb2.RollbackSecretRequest(name="TOKEN", to_version=1), key)
        assert restored.version == 4
        engine.dispose()
    finally:
        secrets.close()
        registry.close()


# -- REST ----------------------------------------------------------------------------


def test_rest_answers_400_for_nul_and_413_for_too_large(platform: Platform):  # noqa: F811
    p = platform

    def put(value: str):  # type: ignore[no-untyped-def]
        return p.router.call("PUT", "/secrets", p.key, json={"name": "TOKEN", "type": "token", "value": value})

    nul = put("abc\x00def")
    assert nul.status_code == 400 and nul.json()["error"]["message"].startswith("value: ")
    assert "NUL" in nul.json()["error"]["message"]

    over = put("x" * (MAX_VALUE_BYTES + 1))
    assert over.status_code == 413, over.text
    assert over.json()["error"] == {
        "code": "value_too_large",
        "message": f"value: is larger than 64 KiB: {MAX_VALUE_BYTES + 1} bytes of UTF-8, at most {MAX_VALUE_BYTES} "
                   "are allowed",
    }
    assert "Retry-After" not in over.headers

    # 5 MB: beyond the gRPC message limit (which used to surface as a 503).
    huge = put("x" * (5 * 1024 * 1024))
    assert huge.status_code == 413, huge.text
    assert huge.json()["error"]["code"] == "body_too_large" and "Retry-After" not in huge.headers
    # Any endpoint: a body over the API's limit is refused before parsing.
    big_promote = p.router.call("POST", "/deployments/promote", p.key, data=b" " * (api.MAX_API_BODY_BYTES + 1))
    assert big_promote.status_code == 413

    # Nothing landed; the largest allowed value goes through, JSON-escaped or not.
    assert p.router.call("GET", "/secrets", p.key).json()["secrets"] == []
    assert put("\x01" * MAX_VALUE_BYTES).status_code == 200  # 6x larger escaped, still under the body limit
    assert put("y" * MAX_VALUE_BYTES).json()["secret"]["version"] == 2


def test_rest_replica_bounds_are_the_registrys():
    assert api.MAX_REPLICAS == MAX_REPLICAS_LIMIT == 100
    doc = openapi.document()

    def schema(path: str, method: str = "post") -> dict:
        return doc["paths"]["/api/v1" + path][method]["requestBody"]["content"]["application/json"]["schema"]

    for path in ("/deployments/promote", "/deployments/{id}/scale"):
        for name in ("min_replicas", "max_replicas"):
            assert schema(path)["properties"][name]["maximum"] == MAX_REPLICAS_LIMIT, (path, name)
    assert schema("/deployments/{id}/scale-up")["properties"]["by"]["maximum"] == MAX_REPLICA_DELTA
    with pytest.raises(api.ApiError, match="max_replicas: must be at most 100, not 101"):
        api.PROMOTE.parse(b'{"source_deployment_id": "d", "target_environment_id": "s", "max_replicas": 101}')
    assert api.PROMOTE.parse(b'{"source_deployment_id": "d", "target_environment_id": "s", "max_replicas": 100}')
    value_doc = schema("/secrets", "put")["properties"]["value"]["description"]
    assert str(MAX_VALUE_BYTES) in value_doc and "413" in value_doc
    assert "413" in doc["paths"]["/api/v1/secrets"]["put"]["responses"]


# -- CLI ------------------------------------------------------------------------------


def berth(platform: Platform, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:  # noqa: F811
    env = {
        **os.environ,
        "BERTH_API_KEY": platform.key,
        "BERTH_PROJECT": "shop",
        "BERTH_DATA_DIR": str(ROOT / ".no-such-data-dir"),
        "BERTH_REGISTRY_ADDR": f"127.0.0.1:{platform.registry.running.port}",
        "BERTH_SECRETS_ADDR": f"127.0.0.1:{platform.secrets.running.port}",
        "BERTH_SCHEDULER_ADDR": f"127.0.0.1:{platform.scheduler.running.port}",
    }
    return subprocess.run([sys.executable, "-m", "berth.cli", *args], input=stdin, env=env, capture_output=True,
                          timeout=60, cwd=ROOT, check=False)


def test_cli_refuses_non_utf8_and_nul_on_stdin_cleanly(platform: Platform):  # noqa: F811
    for raw, expected in (
        (b"ab\xff\xfecd", "is not UTF-8 text (byte 0xff at offset 2)"),
        (b"abc\x00def\n", "contains a NUL byte (offset 3)"),
    ):
        for output in ("text", "json"):
            result = berth(platform, "secrets", "set", "--name", "TOKEN", "--stdin", "--output", output, stdin=raw)
            stderr = result.stderr.decode()
            assert result.returncode != 0, stderr
            assert "Traceback" not in stderr and expected in stderr, stderr
            assert "abc" not in stderr and "def" not in stderr  # the value is not echoed
    assert list(platform.secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), platform.key).secrets) == []

    ok = berth(platform, "secrets", "set", "--name", "TOKEN", "--stdin", stdin="sk-demo-ü\n".encode())
    assert ok.returncode == 0, ok.stderr.decode()
    too_big = berth(platform, "secrets", "set", "--name", "TOKEN", "--stdin", stdin=b"x" * (MAX_VALUE_BYTES + 1))
    assert too_big.returncode != 0 and "Traceback" not in too_big.stderr.decode()
    assert "larger than 64 KiB" in too_big.stderr.decode()
    # 5 MB: beyond the gRPC message limit, still the same clear answer.
    huge = berth(platform, "secrets", "set", "--name", "TOKEN", "--stdin", "--output", "json",
                 stdin=b"x" * (5 * 1024 * 1024))
    assert huge.returncode != 0 and "Traceback" not in huge.stderr.decode()
    assert '"code": "invalid_argument"' in huge.stderr.decode() and "larger than 64 KiB" in huge.stderr.decode()
