"""The registry over real gRPC: projects, pointer moves, history, errors."""
from __future__ import annotations

import threading

import grpc
import pytest

from berth import errors, shapes
from berth.internal.v1 import registry_internal_pb2
from berth.v1 import common_pb2, registry_pb2
from tests.registry.conftest import ADMIN_KEY

IMAGE_A = "sha256:" + "a" * 64
IMAGE_B = "sha256:" + "b" * 64


def deploy(registry, key, image_id=IMAGE_A, env="preview", **kw):
    return registry.call(
        "Deploy",
        registry_pb2.DeployRequest(image="example/worker:1", image_id=image_id, environment=env, **kw),
        key,
    )


def test_project_starts_with_default_environments(registry):
    project_id, key = registry.create_project("shop")
    assert key.startswith("berth_pk_")
    envs = registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments
    assert sorted(e.name for e in envs) == ["preview", "production", "staging"]
    assert all(e.project_id == project_id and not e.deployment_id for e in envs)
    assert [e.protected for e in envs if e.name == "production"] == [True]


def test_deploy_promote_rollback_history(registry):
    _, key = registry.create_project("shop")
    v1 = deploy(registry, key, IMAGE_A).deployment
    v2 = deploy(registry, key, IMAGE_B).deployment
    assert v1.id != v2.id and v1.image_id == IMAGE_A and v1.config.port == 8080

    moved = registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="staging"), key)
    assert moved.environment.deployment_id == v1.id and moved.entry.sequence == 1
    moved = registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.id, target_environment="staging"), key)
    assert moved.environment.deployment_id == v2.id and moved.entry.previous_deployment_id == v1.id
    back = registry.call("Rollback", registry_pb2.RollbackRequest(environment="staging"), key)
    assert back.environment.deployment_id == v1.id
    assert (back.entry.kind, back.entry.deployment_id, back.entry.previous_deployment_id) == (common_pb2.HistoryEntry.KIND_ROLLBACK, v1.id, v2.id)

    history = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries
    assert [(h.sequence, shapes.entry_json(h)["kind"], h.deployment_id) for h in history] == [
        (1, "promote", v1.id), (2, "promote", v2.id), (3, "rollback", v1.id)
    ]
    assert all(h.actor == "default" for h in history)
    preview = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="preview"), key).entries
    assert [h.kind for h in preview] == [common_pb2.HistoryEntry.KIND_DEPLOY] * 2


def test_production_needs_confirmation(registry):
    _, key = registry.create_project("shop")
    v1 = deploy(registry, key).deployment
    with pytest.raises(errors.FailedPrecondition, match="protected"):
        registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="production"), key)
    history = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="production"), key).entries
    assert list(history) == []
    moved = registry.call(
        "Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="production", confirm=True), key
    )
    assert moved.environment.deployment_id == v1.id


def test_compare_and_swap_loser_records_nothing(registry):
    _, key = registry.create_project("shop")
    v1 = deploy(registry, key).deployment
    v2 = deploy(registry, key, IMAGE_B).deployment
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="staging", expected_sequence=0), key)
    with pytest.raises(errors.Aborted, match="expected sequence 5, it is at 1"):
        # expected_sequence 0 means "no check"; use a stale non-zero one
        registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.id, target_environment="staging", expected_sequence=5), key)
    history = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries
    assert [h.deployment_id for h in history] == [v1.id]


def test_rollback_without_earlier_entry_fails(registry):
    _, key = registry.create_project("shop")
    deploy(registry, key)
    with pytest.raises(errors.FailedPrecondition, match="no earlier deployment"):
        registry.call("Rollback", registry_pb2.RollbackRequest(environment="preview"), key)


@pytest.mark.parametrize(
    ("request_kwargs", "error", "text"),
    [
        ({"image": ""}, errors.InvalidArgument, "image is required"),
        ({"image": "Not A Ref!"}, errors.InvalidArgument, "not a valid image reference"),
        ({"image": "ok/ref:1", "image_id": "md5:zz"}, errors.InvalidArgument, "image_id"),
        ({"image": "ok/ref:1", "environment": "nope"}, errors.NotFound, "environment 'nope' not found"),
        ({"image": "ok/ref:1", "project": "other"}, errors.PermissionDenied, "belongs to project"),
        ({"image": "ok/ref:1", "min_replicas": 5, "max_replicas": 2}, errors.InvalidArgument, "min_replicas 5"),
        ({"image": "ok/ref:1", "config": common_pb2.WorkerConfig(port=70000)}, errors.InvalidArgument, "config.port"),
        ({"image": "ok/ref:1", "config": common_pb2.WorkerConfig(variables={"BERTH_X": "1"})}, errors.InvalidArgument, "set by Berth"),
    ],
)
def test_deploy_rejects_bad_input(registry, request_kwargs, error, text):
    _, key = registry.create_project("shop")
    with pytest.raises(error, match=text):
        registry.call("Deploy", registry_pb2.DeployRequest(**request_kwargs), key)
    assert registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(), key).deployments == []


def test_authentication_and_isolation(registry):
    _, key_a = registry.create_project("alpha")
    registry.create_project("beta")
    v1 = deploy(registry, key_a).deployment
    with pytest.raises(errors.Unauthenticated, match="no API key"):
        registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(project="alpha"), "")
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(project="alpha"), "berth_pk_wrong")
    _, key_b = registry.create_project("gamma")
    with pytest.raises(errors.PermissionDenied):
        registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(project="alpha"), key_b)
    with pytest.raises(errors.NotFound):
        registry.call("GetDeployment", registry_pb2.GetDeploymentRequest(deployment_id=v1.id), key_b)
    with pytest.raises(errors.PermissionDenied, match="admin key"):
        registry.call("CreateProject", registry_pb2.CreateProjectRequest(name="delta"), key_a)
    with pytest.raises(errors.PermissionDenied, match="only creates projects"):
        registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(project="alpha"), ADMIN_KEY)
    with pytest.raises(errors.AlreadyExists):
        registry.create_project("alpha")
    with pytest.raises(errors.InvalidArgument, match="project name"):
        registry.create_project("Bad_Name")


def test_watch_sends_snapshot_then_changes(registry):
    _, key = registry.create_project("shop")
    v1 = deploy(registry, key).deployment
    stream = registry.watch(timeout=20)
    events = []
    for event in stream:
        events.append(event)
        if event.snapshot_complete:
            break
    envs = {e.environment.name: e.environment for e in events if e.WhichOneof("change") == "environment"}
    bindings = [e.binding for e in events if e.WhichOneof("change") == "binding"]
    assert envs["preview"].deployment_id == v1.id
    assert [(b.environment_name, b.deployment.id, b.serving) for b in bindings] == [("preview", v1.id, True)]
    snapshot_revision = events[-1].revision

    got = []
    done = threading.Event()

    def reader():
        for event in stream:
            got.append(event)
            if event.WhichOneof("change") == "environment" and event.environment.name == "staging":
                done.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="staging"), key)
    assert done.wait(10)
    stream.cancel()
    assert all(e.revision > snapshot_revision for e in got)
    assert got[-1].environment.deployment_id == v1.id


def test_watch_and_internal_calls_need_the_service_token(registry):
    _, key = registry.create_project("shop")
    with pytest.raises(grpc.RpcError) as info:
        next(iter(registry.internal.Watch(registry_internal_pb2.WatchRequest(), metadata=(("x-api-key", key),), timeout=5)))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(errors.PermissionDenied):
        registry.call_internal("Authenticate", registry_internal_pb2.AuthenticateRequest(api_key=key), key)
    principal = registry.call_internal("Authenticate", registry_internal_pb2.AuthenticateRequest(api_key=key))
    assert principal.project_name == "shop"
