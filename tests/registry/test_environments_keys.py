"""Environments (create, list, delete) and API keys (create, list, revoke)."""
from __future__ import annotations

import pytest

from berth import errors
from berth.internal.v1 import registry_internal_pb2
from berth.v1 import registry_pb2
from tests.registry.conftest import collect_until

IMAGE = "sha256:" + "c" * 64


def envs(registry, key):  # type: ignore[no-untyped-def]
    return {e.name: e for e in registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments}


def test_create_list_delete_environment(registry):
    _, key = registry.create_project("shop")
    created = registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)
    assert created.id.startswith("env_") and not created.protected and created.sequence == 0
    assert set(envs(registry, key)) == {"preview", "staging", "production", "qa"}
    with pytest.raises(errors.AlreadyExists, match="'qa' already exists"):
        registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)

    stream = registry.watch()
    snapshot = collect_until(stream, lambda e: e.snapshot_complete)
    assert created.id in {e.environment.id for e in snapshot if e.WhichOneof("change") == "environment"}

    deleted = registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment=created.id), key)
    assert deleted.environment.name == "qa"
    assert "qa" not in envs(registry, key)
    event = collect_until(stream, lambda e: e.WhichOneof("change") == "environment_deleted")[-1]
    assert event.environment_deleted == created.id and event.revision > snapshot[-1].revision
    stream.cancel()
    with pytest.raises(errors.NotFound, match="environment 'qa' not found"):
        registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="qa"), key)
    # The name is free again; the new environment is a different one.
    again = registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)
    assert again.id != created.id


def test_delete_refuses_protected_and_pointed_environments(registry):
    _, key = registry.create_project("shop")
    with pytest.raises(errors.FailedPrecondition, match="'production' is protected"):
        registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="production"), key)
    registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE, environment="qa"), key)
    with pytest.raises(errors.FailedPrecondition, match=f"points to deployment {dep.deployment.id}"):
        registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="qa"), key)
    assert envs(registry, key)["qa"].deployment_id == dep.deployment.id


def test_force_deletes_a_pointed_environment_with_its_bindings_and_history(registry):
    _, key = registry.create_project("shop")
    qa = registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)
    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE, environment="qa"), key)
    v2 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:2", image_id=IMAGE, environment="qa"), key)
    # Also bound elsewhere: that binding and environment stay.
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.deployment.id, target_environment="staging"), key)
    with pytest.raises(errors.FailedPrecondition, match="points to deployment .*--force"):
        registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="qa"), key)

    stream = registry.watch()
    snapshot = collect_until(stream, lambda e: e.snapshot_complete)
    deleted = registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="qa", force=True), key)
    assert deleted.environment.id == qa.id and deleted.environment.deployment_id == v2.deployment.id
    event = collect_until(stream, lambda e: e.WhichOneof("change") == "environment_deleted")[-1]
    assert event.environment_deleted == qa.id and event.revision > snapshot[-1].revision
    stream.cancel()
    assert "qa" not in envs(registry, key)
    with pytest.raises(errors.NotFound, match="environment 'qa' not found"):
        registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="qa"), key)
    for dep in (v1.deployment.id, v2.deployment.id):
        bound = registry.call("ListBindings", registry_pb2.ListBindingsRequest(deployment_id=dep), key).bindings
        assert qa.id not in {b.environment_id for b in bound}
    assert envs(registry, key)["staging"].deployment_id == v2.deployment.id
    assert len(registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries) == 1
    # A new environment of that name starts empty.
    again = registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name="qa"), key)
    assert again.id != qa.id and not again.deployment_id and again.sequence == 0
    assert not registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="qa"), key).entries


def test_force_delete_of_production_needs_confirm(registry):
    _, key = registry.create_project("shop")
    registry.call("Deploy", registry_pb2.DeployRequest(
        image="app:1", image_id=IMAGE, environment="production", confirm=True), key)
    with pytest.raises(errors.FailedPrecondition, match="'production' is protected and cannot be deleted"):
        registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="production"), key)
    with pytest.raises(errors.FailedPrecondition, match="'production' is protected: deleting it needs confirmation"):
        registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(environment="production", force=True), key)
    assert "production" in envs(registry, key)
    registry.call("DeleteEnvironment", registry_pb2.DeleteEnvironmentRequest(
        environment="production", force=True, confirm=True), key)
    assert "production" not in envs(registry, key)


def test_environment_carries_previous_deployment(registry):
    _, key = registry.create_project("shop")
    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE), key).deployment
    assert envs(registry, key)["preview"].previous_deployment_id == ""
    v2 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:2"), key)
    assert v2.environment.previous_deployment_id == v1.id
    assert envs(registry, key)["preview"].previous_deployment_id == v1.id
    back = registry.call("Rollback", registry_pb2.RollbackRequest(environment="preview"), key)
    assert (back.environment.deployment_id, back.environment.previous_deployment_id) == (v1.id, v2.deployment.id)


def test_api_keys_create_list_revoke(registry):
    _, key = registry.create_project("shop")
    made = registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), key)
    assert made.api_key.startswith("berth_pk_") and len(made.api_key) > 40
    assert made.key.prefix == made.api_key[:13] and made.key.name == "ci"
    with pytest.raises(errors.AlreadyExists, match="'ci' already exists"):
        registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), key)

    listed = registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(), made.api_key).keys
    assert [k.name for k in listed] == ["default", "ci"]
    assert all(made.api_key not in str(k) and key not in str(k) for k in listed)
    assert all(not k.HasField("revoked_at") for k in listed)

    # The new key acts as "ci" in history.
    moved = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), made.api_key)
    assert moved.entry.actor == "ci"

    revoked = registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="ci"), key)
    assert revoked.id == made.key.id and revoked.HasField("revoked_at")
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), made.api_key)
    with pytest.raises(errors.Unauthenticated):
        registry.call_internal("Authenticate", registry_internal_pb2.AuthenticateRequest(api_key=made.api_key))
    # Revoking again by id is a no-op; the name is free for a new key.
    assert registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key=made.key.id), key).revoked_at == revoked.revoked_at
    with pytest.raises(errors.NotFound, match="no active API key 'ci'"):
        registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="ci"), key)
    fresh = registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), key)
    assert fresh.key.id != made.key.id
    names = [(k.name, k.HasField("revoked_at")) for k in registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(), key).keys]
    assert names == [("default", False), ("ci", True), ("ci", False)]


def test_last_active_key_cannot_be_revoked(registry):
    _, key = registry.create_project("shop")
    with pytest.raises(errors.FailedPrecondition, match="last active key"):
        registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="default"), key)
    other = registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ops"), key).api_key
    registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="default"), other)
    with pytest.raises(errors.Unauthenticated):
        registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(), key)


def test_keys_are_scoped_to_their_project(registry):
    _, key_a = registry.create_project("alpha")
    _, key_b = registry.create_project("beta")
    b_keys = registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(), key_b).keys
    with pytest.raises(errors.PermissionDenied):
        registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(project="beta"), key_a)
    with pytest.raises(errors.NotFound):
        registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key=b_keys[0].id), key_a)
    with pytest.raises(errors.PermissionDenied):
        registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(project="beta", name="x"), key_a)
