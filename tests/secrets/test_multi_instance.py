"""Two secrets services on one PostgreSQL database sharing one master key
file (what ``berth up --instances 2`` runs): a rotation through one while
the other creates projects' data keys and resolves secrets loses nothing.
Every data key ends under the newest key, both instances and a fresh one
read every value, and no data key is left wrapped by a key that is gone."""
from __future__ import annotations

import base64
import itertools
import threading

import pytest
from sqlalchemy import create_engine, text

from berth.internal.v1 import secrets_internal_pb2 as internal
from berth.v1 import secrets_pb2 as pb
from services.secrets import crypto
from tests.secrets.support import ADMIN_KEY, SERVICE_TOKEN, Registry, Secrets
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

ROTATIONS = 3
MAX_NEW_PROJECTS = 60  # bounds the writer


@pytest.fixture
def registry(tmp_path):  # type: ignore[no-untyped-def]
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


def resolve(secrets: Secrets, project_id: str) -> dict[str, str]:
    answer = secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id), SERVICE_TOKEN)
    return {s.name: s.value for s in answer.secrets}


def key_ids(db_url: str) -> dict[str, int]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT master_key_id, count(*) FROM secret_data_keys GROUP BY master_key_id"))
            return {r[0]: r[1] for r in rows}
    finally:
        engine.dispose()


def test_rotation_on_one_instance_while_the_other_writes_and_reads(registry, postgres_url, tmp_path):  # noqa: F811
    key_file = tmp_path / "shared" / "master.key"
    a = Secrets(registry, postgres_url, master_key_file=key_file)
    b = Secrets(registry, postgres_url, master_key_file=key_file)
    expected: dict[str, dict[str, str]] = {}
    lock = threading.Lock()
    try:
        for i in range(3):
            project_id, key = registry.create_project(f"seed{i}")
            a.call("SetSecret", pb.SetSecretRequest(name="TOKEN", type="token", value=f"seed-{i}"), key)
            expected[project_id] = {"TOKEN": f"seed-{i}"}

        stop = threading.Event()
        failures: list[BaseException] = []
        created = [0]

        def writer() -> None:
            # New projects on instance b: each one wraps a new data key with
            # b's idea of the current master key, racing a's rotations.
            for n in itertools.count():
                if stop.is_set() or n >= MAX_NEW_PROJECTS:
                    return
                try:
                    project_id, key = registry.create_project(f"new{n}")
                    b.call("SetSecret", pb.SetSecretRequest(name="TOKEN", type="token", value=f"new-{n}"), key)
                    with lock:
                        expected[project_id] = {"TOKEN": f"new-{n}"}
                    created[0] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return

        def reader(instance: Secrets) -> None:
            while not stop.is_set():
                with lock:
                    snapshot = dict(expected)
                for project_id, values in snapshot.items():
                    try:
                        assert resolve(instance, project_id) == values
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        failures.append(exc)
                        return

        threads = [threading.Thread(target=writer), threading.Thread(target=reader, args=(a,)),
                   threading.Thread(target=reader, args=(b,))]
        for t in threads:
            t.start()
        fingerprints = []
        try:
            for _ in range(ROTATIONS):
                before = created[0]
                answer = a.call("RotateMasterKey", pb.RotateMasterKeyRequest(), ADMIN_KEY)
                fingerprints.append(answer.key_fingerprint)
                # Let b create a few data keys after each rotation (bounded wait on a condition).
                waited = threading.Event()
                for _ in range(500):
                    if created[0] >= before + 3 or failures or waited.wait(0.01):
                        break
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, failures[:3]
        assert created[0] >= ROTATIONS * 3, created  # the writer did race the rotations
        assert len(set(fingerprints)) == ROTATIONS
        # Every data key under the newest master key: none left under a key that is gone.
        assert crypto.fingerprint(base64.b64decode(key_file.read_text())) == fingerprints[-1]
        assert key_ids(postgres_url) == {fingerprints[-1]: len(expected)}
        assert not crypto.previous_path(key_file).exists()
        # b rotates next (it learned the key a made); then both read everything.
        answer = b.call("RotateMasterKey", pb.RotateMasterKeyRequest(), ADMIN_KEY)
        assert answer.data_keys_rewrapped == len(expected)
        for instance in (a, b):
            for project_id, values in expected.items():
                assert resolve(instance, project_id) == values
    finally:
        a.close()
        b.close()
    # A fresh instance holds only what the key file holds, and reads every value.
    c = Secrets(registry, postgres_url, master_key_file=key_file)
    try:
        for project_id, values in expected.items():
            assert resolve(c, project_id) == values
    finally:
        c.close()


def test_concurrent_rotations_on_both_instances_never_lose_a_key(registry, postgres_url, tmp_path):  # noqa: F811
    """Both instances asked to rotate at once: the rotations run one after
    the other (the key file's lock), so neither overwrites the key the
    other's data keys were just wrapped with."""
    key_file = tmp_path / "shared" / "master.key"
    a = Secrets(registry, postgres_url, master_key_file=key_file)
    b = Secrets(registry, postgres_url, master_key_file=key_file)
    expected = {}
    try:
        for i in range(5):
            project_id, key = registry.create_project(f"p{i}")
            (a if i % 2 else b).call("SetSecret", pb.SetSecretRequest(name="TOKEN", type="token", value=f"v{i}"), key)
            expected[project_id] = {"TOKEN": f"v{i}"}
        answers: list[object] = []
        errors: list[BaseException] = []

        def rotate(instance: Secrets) -> None:
            for _ in range(3):
                try:
                    answers.append(instance.call("RotateMasterKey", pb.RotateMasterKeyRequest(), ADMIN_KEY))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

        threads = [threading.Thread(target=rotate, args=(x,)) for x in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert len(answers) == 6
        newest = crypto.fingerprint(base64.b64decode(key_file.read_text()))
        assert key_ids(postgres_url) == {newest: len(expected)}
    finally:
        a.close()
        b.close()
    c = Secrets(registry, postgres_url, master_key_file=key_file)
    try:
        for project_id, values in expected.items():
            assert resolve(c, project_id) == values
    finally:
        c.close()
