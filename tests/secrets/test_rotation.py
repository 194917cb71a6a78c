"""Master key rotation: re-wrapping without a pause in resolution, the key
file protocol, and recovery from a crash at each step."""
from __future__ import annotations

import base64
import os
import threading

import pytest
from sqlalchemy import create_engine, text

from berth import errors
from berth.internal.v1 import secrets_internal_pb2 as internal
from berth.v1 import secrets_pb2 as pb
from services.secrets import crypto
from tests.secrets.support import ADMIN_KEY, SERVICE_TOKEN, Registry, Secrets

CANARY = "canary-27b4e6f1"


@pytest.fixture
def registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


def resolve(secrets, project_id):  # type: ignore[no-untyped-def]
    answer = secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
    return {s.name: s.value for s in answer.secrets}


def key_ids(db_url: str) -> set[str]:
    with create_engine(db_url).connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT master_key_id FROM secret_data_keys"))}


def seed(registry, secrets, n=3):  # type: ignore[no-untyped-def]
    expected = {}
    for i in range(n):
        project_id, key = registry.create_project(f"p{i}")
        secrets.call("SetSecret", pb.SetSecretRequest(name="TOKEN", type="token", value=f"{i}-{CANARY}"), key)
        expected[project_id] = {"TOKEN": f"{i}-{CANARY}"}
    return expected


def test_rotation_rewraps_every_data_key_while_resolution_goes_on(registry, tmp_path):
    key_file = tmp_path / "keys" / "master.key"
    db_url = f"sqlite:///{tmp_path / 'secrets.db'}"
    secrets = Secrets(registry, db_url, master_key_file=key_file)
    try:
        expected = seed(registry, secrets)
        first_key = key_file.read_bytes()
        assert key_ids(db_url) == {crypto.fingerprint(base64.b64decode(first_key))}

        stop = threading.Event()
        failures: list[BaseException] = []
        counts = [0]

        def reader() -> None:
            while not stop.is_set():
                for project_id, values in expected.items():
                    try:
                        assert resolve(secrets, project_id) == values
                        counts[0] += 1
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        failures.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            fingerprints = []
            for _ in range(3):
                before = counts[0]
                answer = secrets.call("RotateMasterKey", pb.RotateMasterKeyRequest(), ADMIN_KEY)
                assert answer.data_keys_rewrapped == len(expected)
                fingerprints.append(answer.key_fingerprint)
                # Wait until reads happened after this rotation (no timing assumption).
                deadline = threading.Event()
                while counts[0] < before + 10 and not failures and not deadline.wait(0.01):
                    pass
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not failures, failures[:3]
        assert len(set(fingerprints)) == 3
        new_key = base64.b64decode(key_file.read_text())
        assert crypto.fingerprint(new_key) == fingerprints[-1] and key_file.read_bytes() != first_key
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert not crypto.previous_path(key_file).exists()
        assert sorted(p.name for p in key_file.parent.iterdir()) == ["master.key"]  # no temporary left
        assert key_ids(db_url) == {fingerprints[-1]}
        assert fingerprints[-1] not in str(first_key) and base64.b64encode(new_key).decode() not in str(answer)
    finally:
        secrets.close()
    # A restart reads the new key file and resolves everything.
    secrets = Secrets(registry, db_url, master_key_file=key_file)
    try:
        for project_id, values in expected.items():
            assert resolve(secrets, project_id) == values
        # New projects get data keys under the new key.
        project_id, key = registry.create_project("late")
        secrets.call("SetSecret", pb.SetSecretRequest(name="LATE", type="generic", value="late"), key)
        assert key_ids(db_url) == {crypto.fingerprint(base64.b64decode(key_file.read_text()))}
    finally:
        secrets.close()


def test_rotation_is_admin_only_and_refused_for_an_environment_key(registry, tmp_path):
    secrets = Secrets(registry, f"sqlite:///{tmp_path / 'env.db'}", master_key=os.urandom(32))
    try:
        _, key = registry.create_project("shop")
        with pytest.raises(errors.PermissionDenied, match="admin key"):
            secrets.call("RotateMasterKey", pb.RotateMasterKeyRequest(), key)
        with pytest.raises(errors.PermissionDenied):
            secrets.call("RotateMasterKey", pb.RotateMasterKeyRequest(), SERVICE_TOKEN)
        with pytest.raises(errors.FailedPrecondition, match="BERTH_MASTER_KEY"):
            secrets.call("RotateMasterKey", pb.RotateMasterKeyRequest(), ADMIN_KEY)
    finally:
        secrets.close()


def test_a_crash_at_any_step_leaves_everything_decryptable(registry, tmp_path):
    key_file = tmp_path / "master.key"
    db_url = f"sqlite:///{tmp_path / 'secrets.db'}"
    secrets = Secrets(registry, db_url, master_key_file=key_file)
    try:
        expected = seed(registry, secrets, n=2)
    finally:
        secrets.close()
    k1 = base64.b64decode(key_file.read_text())

    # Crash 1: ".previous" written, the key file not yet replaced.
    crypto.write_key_file(crypto.previous_path(key_file), k1)
    # Crash 2 on top: the key file replaced by a new key, no data key re-wrapped yet.
    ring = crypto.MasterKeyring.load(env_value="", key_file=key_file)
    crypto.previous_path(key_file).unlink()
    ring.begin_rotation()
    k2 = base64.b64decode(key_file.read_text())
    assert k2 != k1 and crypto.previous_path(key_file).exists()
    assert key_ids(db_url) == {crypto.fingerprint(k1)}
    # The next start finishes the rotation: data keys under k2, ".previous" gone.
    secrets = Secrets(registry, db_url, master_key_file=key_file)
    try:
        for project_id, values in expected.items():
            assert resolve(secrets, project_id) == values
        assert key_ids(db_url) == {crypto.fingerprint(k2)}
        assert not crypto.previous_path(key_file).exists()
    finally:
        secrets.close()

    # Crash 3: committed, ".previous" not yet deleted: it is just removed.
    crypto.write_key_file(crypto.previous_path(key_file), k1)
    secrets = Secrets(registry, db_url, master_key_file=key_file)
    try:
        for project_id, values in expected.items():
            assert resolve(secrets, project_id) == values
        assert not crypto.previous_path(key_file).exists()
    finally:
        secrets.close()

    # The wrong key: resolution fails loudly, naming the key it lacks (a fingerprint, never a key).
    other = tmp_path / "other.key"
    secrets = Secrets(registry, db_url, master_key_file=other)
    try:
        project_id = next(iter(expected))
        with pytest.raises(errors.FailedPrecondition, match=f"master key {crypto.fingerprint(k2)}, which this service does not hold"):
            resolve(secrets, project_id)
    finally:
        secrets.close()
