"""Versions, explicit deletion, rollback, isolation of every RPC and
concurrent writers, over real gRPC next to a real registry."""
from __future__ import annotations

import threading

import pytest

from berth import errors
from berth.internal.v1 import secrets_internal_pb2 as internal
from berth.shapes import secret_scope
from berth.v1 import secrets_pb2 as pb
from tests.secrets.support import ADMIN_KEY, SERVICE_TOKEN, Registry, Secrets, environment_ids

CANARY = "canary-9a7c31e0"


@pytest.fixture
def platform(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    secrets = Secrets(registry, f"sqlite:///{tmp_path / 'secrets.db'}")
    yield registry, secrets
    secrets.close()
    registry.close()


def resolve(secrets, project_id, environment_id=""):  # type: ignore[no-untyped-def]
    answer = secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id, environment_id=environment_id), SERVICE_TOKEN)
    return {s.name: (s.value, s.version, s.scope) for s in answer.secrets}


def test_set_delete_set_rollback_keeps_every_version(platform):
    registry, secrets = platform
    project_id, key = registry.create_project("shop")
    envs = environment_ids(registry, key)
    for i in (1, 2):
        info = secrets.call("SetSecret", pb.SetSecretRequest(name="DB_PASSWORD", type="password", value=f"v{i}-{CANARY}"), key)
        assert info.version == i and not info.deleted
    secrets.call("SetSecret", pb.SetSecretRequest(name="DB_PASSWORD", type="password", value="stg-" + CANARY, environment="staging"), key)

    deleted = secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="DB_PASSWORD"), key).secret
    assert (deleted.version, deleted.deleted, secret_scope(deleted), deleted.type) == (3, True, "project", "password")
    assert list(secrets.call("ListSecrets", pb.ListSecretsRequest(), key).secrets) == []
    assert resolve(secrets, project_id, envs["preview"]) == {}
    # The staging override is a secret of its own: it still resolves there.
    assert resolve(secrets, project_id, envs["staging"]) == {"DB_PASSWORD": ("stg-" + CANARY, 1, "environment:staging")}
    with pytest.raises(errors.NotFound, match="it was deleted"):
        secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="DB_PASSWORD"), key)

    versions = secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="DB_PASSWORD"), key).versions
    assert [(v.version, v.deleted) for v in versions] == [(1, False), (2, False), (3, True)]
    assert all(v.updated_by == "default" or v.updated_by for v in versions)
    assert versions[0].created_at == versions[2].created_at  # of the first version
    assert versions[2].updated_at.ToDatetime() >= versions[0].updated_at.ToDatetime()
    assert CANARY not in str(versions)

    # Setting again continues the numbering.
    again = secrets.call("SetSecret", pb.SetSecretRequest(name="DB_PASSWORD", type="password", value="v4-" + CANARY), key)
    assert again.version == 4
    assert resolve(secrets, project_id, envs["preview"])["DB_PASSWORD"][:2] == ("v4-" + CANARY, 4)

    # Rollback restores an earlier value as a new version.
    back = secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD", to_version=1), key)
    assert (back.version, back.deleted, back.type) == (5, False, "password")
    assert resolve(secrets, project_id, envs["preview"])["DB_PASSWORD"][:2] == ("v1-" + CANARY, 5)
    with pytest.raises(errors.FailedPrecondition, match="deletion"):
        secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD", to_version=3), key)
    with pytest.raises(errors.FailedPrecondition, match="already the current"):
        secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD", to_version=5), key)
    with pytest.raises(errors.NotFound, match="no version 9 \\(versions 1..5\\)"):
        secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD", to_version=9), key)
    with pytest.raises(errors.InvalidArgument, match="to_version"):
        secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD"), key)

    # A deleted secret comes back by rollback; deleting the staging override uncovers the project's.
    secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="DB_PASSWORD"), key)
    assert secrets.call("RollbackSecret", pb.RollbackSecretRequest(name="DB_PASSWORD", to_version=2), key).version == 7
    secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="DB_PASSWORD", environment="staging"), key)
    assert resolve(secrets, project_id, envs["staging"]) == {"DB_PASSWORD": ("v2-" + CANARY, 7, "project")}
    listed = secrets.call("ListSecrets", pb.ListSecretsRequest(environment="staging"), key).secrets
    assert [(s.name, secret_scope(s), s.version) for s in listed] == [("DB_PASSWORD", "project", 7)]
    staging_versions = secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="DB_PASSWORD", environment="staging"), key)
    assert [(v.version, v.deleted, secret_scope(v)) for v in staging_versions.versions] == [
        (1, False, "environment:staging"), (2, True, "environment:staging")]
    all_versions = [v.version for v in secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="DB_PASSWORD"), key).versions]
    assert all_versions == list(range(1, 8))  # never decreasing, nothing lost


def test_validation_names_the_field(platform):
    registry, secrets = platform
    _, key = registry.create_project("shop")
    cases = [
        ("SetSecret", pb.SetSecretRequest(type="token", value="x"), "name is required"),
        ("SetSecret", pb.SetSecretRequest(name="has-dash", type="token", value="x"), "name 'has-dash' is not usable as an environment variable"),
        ("SetSecret", pb.SetSecretRequest(name="BERTH_X", type="token", value="x"), "name 'BERTH_X' is reserved"),
        ("SetSecret", pb.SetSecretRequest(name="PORT", type="token", value="x"), "name 'PORT' is reserved"),
        ("SetSecret", pb.SetSecretRequest(name="OK", value="x"), "type is required"),
        ("SetSecret", pb.SetSecretRequest(name="OK", type="cert", value="x"), "type 'cert' is not one of"),
        ("SetSecret", pb.SetSecretRequest(name="OK", type="token"), "value is empty"),
        ("SetSecret", pb.SetSecretRequest(name="OK", type="token", value="x" * (64 * 1024 + 1)), "value is larger"),
        ("DeleteSecret", pb.DeleteSecretRequest(name="9X"), "name '9X'"),
        ("ListSecretVersions", pb.ListSecretVersionsRequest(), "name is required"),
        ("RollbackSecret", pb.RollbackSecretRequest(name="OK", to_version=-1), "to_version must be"),
    ]
    for method, request, message in cases:
        with pytest.raises(errors.InvalidArgument, match=message):
            secrets.call(method, request, key)
    secrets.call("SetSecret", pb.SetSecretRequest(name="CERT", type="certificate", value="-----BEGIN-----"), key)
    for method, request in [
        ("DeleteSecret", pb.DeleteSecretRequest(name="NOPE")),
        ("ListSecretVersions", pb.ListSecretVersionsRequest(name="NOPE")),
        ("RollbackSecret", pb.RollbackSecretRequest(name="NOPE", to_version=1)),
        ("ListSecretVersions", pb.ListSecretVersionsRequest(name="CERT", environment="staging")),
        ("DeleteSecret", pb.DeleteSecretRequest(name="CERT", environment="nowhere")),
    ]:
        with pytest.raises(errors.NotFound):
            secrets.call(method, request, key)


def test_one_project_key_reaches_no_other_project(platform):
    registry, secrets = platform
    pa, key_a = registry.create_project("alpha")
    pb_id, key_b = registry.create_project("beta")
    envs_b = environment_ids(registry, key_b)
    secrets.call("SetSecret", pb.SetSecretRequest(name="B_TOKEN", type="token", value="b-" + CANARY), key_b)
    secrets.call("SetSecret", pb.SetSecretRequest(name="B_TOKEN", type="token", value="b2-" + CANARY), key_b)
    for project in ("beta", pb_id):
        for method, request in [
            ("ListSecrets", pb.ListSecretsRequest(project=project)),
            ("SetSecret", pb.SetSecretRequest(project=project, name="B_TOKEN", type="token", value="evil")),
            ("DeleteSecret", pb.DeleteSecretRequest(project=project, name="B_TOKEN")),
            ("ListSecretVersions", pb.ListSecretVersionsRequest(project=project, name="B_TOKEN")),
            ("RollbackSecret", pb.RollbackSecretRequest(project=project, name="B_TOKEN", to_version=1)),
        ]:
            with pytest.raises(errors.PermissionDenied, match="belongs to project 'alpha'"):
                secrets.call(method, request, key_a)
    # Without naming a project, A's key works on A's own (empty) namespace only.
    with pytest.raises(errors.NotFound):
        secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="B_TOKEN"), key_a)
    # An environment id of project B is not an environment of project A.
    with pytest.raises(errors.NotFound):
        secrets.call("SetSecret", pb.SetSecretRequest(name="X", type="token", value="x", environment=envs_b["staging"]), key_a)
    # Values come back through no RPC for a project key, its own or another's; nor for the admin key.
    for key in (key_a, key_b, ADMIN_KEY):
        for project_id in (pa, pb_id):
            with pytest.raises(errors.PermissionDenied, match="only Berth's own services"):
                secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=project_id), key)
    with pytest.raises(errors.PermissionDenied, match="admin key only creates projects"):
        secrets.call("ListSecrets", pb.ListSecretsRequest(project="beta"), ADMIN_KEY)
    with pytest.raises(errors.Unauthenticated):
        secrets.call("DeleteSecret", pb.DeleteSecretRequest(project="beta", name="B_TOKEN"), "berth_pk_forged")
    with pytest.raises(errors.Unauthenticated):
        secrets.call_internal("ResolveSecrets", internal.ResolveSecretsRequest(project_id=pb_id), "")
    # Nothing of B's changed, and no response carried a value.
    versions = secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="B_TOKEN"), key_b).versions
    assert [(v.version, v.deleted) for v in versions] == [(1, False), (2, False)]
    assert resolve(secrets, pb_id) == {"B_TOKEN": ("b2-" + CANARY, 2, "project")}


def test_concurrent_writers_lose_no_version(platform):
    registry, secrets = platform
    _, key = registry.create_project("shop")
    threads, per_thread = 8, 6
    failures: list[BaseException] = []
    seen: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for i in range(per_thread):
                if i == 3 and n % 2:
                    try:
                        info = secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="SHARED"), key).secret
                    except errors.NotFound:
                        continue  # another thread deleted it first: fine
                else:
                    info = secrets.call("SetSecret", pb.SetSecretRequest(name="SHARED", type="token", value=f"{n}-{i}"), key)
                with lock:
                    seen.append(info.version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not failures, failures
    assert len(seen) == len(set(seen)), "two writes got the same version"
    versions = [v.version for v in secrets.call("ListSecretVersions", pb.ListSecretVersionsRequest(name="SHARED"), key).versions]
    assert versions == list(range(1, len(seen) + 1)) == sorted(seen)


def _all_pages(secrets, key, method, request, field):  # type: ignore[no-untyped-def]
    pages = []
    while True:
        answer = secrets.call(method, request, key)
        pages.append(list(getattr(answer, field)))
        if not answer.next_page_token:
            return pages
        request.page_token = answer.next_page_token


def test_secrets_and_versions_page_by_name_and_version(platform):
    registry, secrets = platform
    _, key = registry.create_project("shop")
    _, other_key = registry.create_project("other")
    names = [f"S_{i:03d}" for i in range(25)]
    for name in names:
        secrets.call("SetSecret", pb.SetSecretRequest(name=name, type="token", value="x"), key)
    # A deleted secret is skipped, an environment's own overrides the project's.
    secrets.call("DeleteSecret", pb.DeleteSecretRequest(name="S_003"), key)
    secrets.call("SetSecret", pb.SetSecretRequest(name="S_010", type="token", value="y", environment="staging"), key)
    live = [n for n in names if n != "S_003"]

    pages = _all_pages(secrets, key, "ListSecrets", pb.ListSecretsRequest(page_size=10), "secrets")
    assert [len(p) for p in pages] == [10, 10, 4]
    assert [s.name for p in pages for s in p] == live
    staged = _all_pages(secrets, key, "ListSecrets", pb.ListSecretsRequest(environment="staging", page_size=7), "secrets")
    flat = [s for p in staged for s in p]
    assert [s.name for s in flat] == live and [secret_scope(s) for s in flat if s.name == "S_010"] == ["environment:staging"]

    for i in range(2, 13):
        secrets.call("SetSecret", pb.SetSecretRequest(name="S_000", type="token", value=f"v{i}"), key)
    versions = _all_pages(secrets, key, "ListSecretVersions", pb.ListSecretVersionsRequest(name="S_000", page_size=5),
                          "versions")
    assert [len(p) for p in versions] == [5, 5, 2]
    assert [v.version for p in versions for v in p] == list(range(1, 13))

    first = secrets.call("ListSecrets", pb.ListSecretsRequest(page_size=1), key)
    cases = [
        ("ListSecrets", pb.ListSecretsRequest(page_size=-1), key, "page_size"),
        ("ListSecretVersions", pb.ListSecretVersionsRequest(name="S_000", page_size=-1), key, "page_size"),
        ("ListSecrets", pb.ListSecretsRequest(page_token="%%%"), key, "page_token"),
        ("ListSecrets", pb.ListSecretsRequest(page_token=first.next_page_token), other_key, "page_token"),
        ("ListSecrets", pb.ListSecretsRequest(environment="staging", page_token=first.next_page_token), key, "page_token"),
        ("ListSecretVersions", pb.ListSecretVersionsRequest(name="S_000", page_token=first.next_page_token), key,
         "page_token"),
    ]
    for method, request, caller_key, field in cases:
        with pytest.raises(errors.InvalidArgument) as refused:
            secrets.call(method, request, caller_key)
        assert refused.value.field == field, (method, request)
