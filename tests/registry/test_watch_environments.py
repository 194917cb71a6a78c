"""berth.v1.Registry.WatchEnvironments: a project's own changes for clients
holding a project key (issue 13), over a real socket, on SQLite and
PostgreSQL, and across two registries on one PostgreSQL database."""
from __future__ import annotations

import threading

import grpc
import pytest
from grpc_status import rpc_status

from berth.v1 import common_pb2, registry_pb2
from tests.registry.conftest import ADMIN_KEY, SERVICE_TOKEN, Registry, collect_until

STREAM_SECONDS = 20  # below the stream's 30 s key re-check: a revocation must end it sooner


def watch(registry: Registry, key: str, *, since: int = 0, project: str = "", timeout: float = STREAM_SECONDS):  # type: ignore[no-untyped-def]
    return registry.stub.WatchEnvironments(
        registry_pb2.WatchEnvironmentsRequest(project=project, since_revision=since),
        metadata=(("x-api-key", key),), timeout=timeout,
    )


def opening(stream):  # type: ignore[no-untyped-def]
    return collect_until(stream, lambda e: e.snapshot_complete)


def change(event) -> str:  # type: ignore[no-untyped-def]
    return event.WhichOneof("change") or ""


def failure(stream) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    return caught.value


def field_violations(error: grpc.RpcError) -> list[str]:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


def test_a_project_sees_its_moves_and_never_another_projects(registry):
    _, shop = registry.create_project("shop")
    _, other = registry.create_project("other")
    registry.call("Deploy", registry_pb2.DeployRequest(image="other:1"), other)
    stream = watch(registry, shop)
    first = opening(stream)
    marker = first[-1]
    assert not marker.resumed
    assert sorted(e.environment.name for e in first if change(e) == "environment") == ["preview", "production", "staging"]
    assert all(e.environment.project_name == "shop" for e in first if change(e) == "environment")

    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), shop)
    registry.call("Deploy", registry_pb2.DeployRequest(image="other:2"), other)  # never on this stream
    registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), other)  # nor this
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.deployment.id, target_environment="staging"), shop)
    registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), shop)
    registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="qa"), shop)
    events = collect_until(stream, lambda e: change(e) == "deleted")
    stream.cancel()

    assert all(e.revision > marker.revision for e in events)
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    for e in events:  # every event is of this project
        project = {
            "moved": e.moved.environment.project_name, "created": e.created.project_name,
            "deleted": e.deleted.project_name, "binding": e.binding.project_name,
        }[change(e)]
        assert project == "shop", e
    moves = [e.moved for e in events if change(e) == "moved"]
    assert [(m.environment.name, m.entry.sequence, m.entry.deployment_id, m.entry.previous_deployment_id)
            for m in moves] == [("preview", 1, v1.deployment.id, ""), ("staging", 1, v1.deployment.id, "")]
    assert [m.entry.kind for m in moves] == [common_pb2.HistoryEntry.KIND_DEPLOY, common_pb2.HistoryEntry.KIND_PROMOTE]
    assert [m.environment.deployment_id for m in moves] == [v1.deployment.id, v1.deployment.id]
    assert [e.created.name for e in events if change(e) == "created"] == ["qa"]
    assert [e.deleted.name for e in events if change(e) == "deleted"] == ["qa"]
    bound = [(e.binding.environment_name, e.binding.deployment.id, e.binding.serving)
             for e in events if change(e) == "binding"]
    assert bound == [("preview", v1.deployment.id, True), ("staging", v1.deployment.id, True)]


def test_resume_replays_only_what_came_after(registry):
    _, key = registry.create_project("shop")
    stream = watch(registry, key)
    opening(stream)
    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key)
    last = collect_until(stream, lambda e: change(e) == "moved")[-1].revision
    stream.cancel()

    v2 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:2"), key)
    rolled = registry.call("Rollback", registry_pb2.RollbackRequest(environment="preview"), key)
    resumed = watch(registry, key, since=last)
    replay = opening(resumed)
    assert replay[-1].resumed
    assert all(e.revision > last for e in replay[:-1])
    assert [(e.moved.entry.sequence, e.moved.entry.deployment_id) for e in replay if change(e) == "moved"] == [
        (2, v2.deployment.id), (3, v1.deployment.id)]
    assert rolled.entry.sequence == 3
    # then live changes, once
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.deployment.id, target_environment="staging"), key)
    live = collect_until(resumed, lambda e: change(e) == "moved")
    resumed.cancel()
    assert [(e.moved.environment.name, e.moved.entry.sequence) for e in live if change(e) == "moved"] == [("staging", 1)]


def test_bad_keys_and_bad_revisions(registry):
    _, key = registry.create_project("shop")
    registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key)
    assert failure(watch(registry, "berth_pk_not-a-key")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert failure(watch(registry, "")).code() == grpc.StatusCode.UNAUTHENTICATED

    negative = failure(watch(registry, key, since=-1))
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT and "since_revision" in negative.details()
    assert field_violations(negative) == ["since_revision"]
    current = registry.service.current_revision()
    future = failure(watch(registry, key, since=current + 1000))
    assert future.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(future) == ["since_revision"]

    # Another project's name with this key: refused, nothing streamed.
    registry.create_project("other")
    assert failure(watch(registry, key, project="other")).code() == grpc.StatusCode.PERMISSION_DENIED
    # The admin key must name the project; then it watches that one.
    no_project = failure(watch(registry, ADMIN_KEY))
    assert no_project.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(no_project) == ["project"]
    admin = watch(registry, ADMIN_KEY, project="shop")
    names = {e.environment.project_name for e in opening(admin) if change(e) == "environment"}
    admin.cancel()
    assert names == {"shop"}


def test_a_revoked_key_ends_the_stream(registry):
    _, key = registry.create_project("shop")
    spare = registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), key).api_key
    stream = watch(registry, spare)
    opening(stream)
    registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="ci"), key)
    error = failure(stream)  # ends well before its deadline (a DEADLINE_EXCEEDED would fail here)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error


@pytest.fixture
def two_on_postgres(postgres_cluster):  # type: ignore[no-untyped-def]
    url = postgres_cluster.create_database()
    a, b = Registry(url), Registry(url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
        postgres_cluster.drop_database(url)


def test_across_instances_moves_resume_and_revocation(two_on_postgres):
    a, b = two_on_postgres
    _, key = a.create_project("shop")
    spare = a.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), key).api_key
    on_b = watch(b, spare)
    opening(on_b)
    made = [a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key).deployment.id for n in range(3)]
    events = collect_until(on_b, lambda e: change(e) == "moved" and e.moved.entry.sequence == 3)
    assert [e.moved.entry.deployment_id for e in events if change(e) == "moved"] == made
    last = events[-1].revision
    on_b.cancel()

    more = [a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key).deployment.id for n in range(3, 5)]
    resumed = watch(b, spare, since=last)
    replay = opening(resumed)
    assert replay[-1].resumed
    assert [e.moved.entry.deployment_id for e in replay if change(e) == "moved"] == more

    errors: list[grpc.RpcError] = []
    reader = threading.Thread(target=lambda: errors.append(failure(resumed)))
    reader.start()
    a.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="ci"), key)  # through A; the stream is on B
    reader.join(STREAM_SECONDS + 5)
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAUTHENTICATED]
    # The service token may watch a named project too (Berth's own tools).
    service = watch(b, SERVICE_TOKEN, project="shop")
    assert opening(service)[-1].snapshot_complete
    service.cancel()
