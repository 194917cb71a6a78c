"""Binding operations: list, scale, scale-up/down, terminate, start — each a
change of desired state published on the watch."""
from __future__ import annotations

import pytest

from berth import enums, errors, shapes
from berth.v1 import common_pb2, registry_pb2
from tests.registry.conftest import collect_until

IMAGE = "sha256:" + "d" * 64


def bindings(registry, key, **kw):  # type: ignore[no-untyped-def]
    resp = registry.call("ListBindings", registry_pb2.ListBindingsRequest(**kw), key)
    return {(b.environment_name, b.deployment.id): b for b in resp.bindings}


def test_scale_and_adjust(registry):
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE), key).deployment
    (b,) = bindings(registry, key, deployment_id=dep.id).values()
    assert (b.environment_name, b.min_replicas, b.max_replicas, shapes.binding_json(b)["state"], b.serving) == ("preview", 1, 3, "active", True)

    stream = registry.watch()
    start = collect_until(stream, lambda e: e.snapshot_complete)[-1].revision

    scaled = registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=dep.id, min_replicas=2, max_replicas=5), key)
    assert (scaled.min_replicas, scaled.max_replicas) == (2, 5)
    up = registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=4), key)
    assert (up.min_replicas, up.max_replicas) == (6, 6)  # max widened to let min pass
    down = registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=-10), key)
    assert (down.min_replicas, down.max_replicas) == (0, 6)  # floored at 0
    events = collect_until(stream, lambda e: e.WhichOneof("change") == "binding" and e.binding.min_replicas == 0)
    stream.cancel()
    moves = [(e.binding.min_replicas, e.binding.max_replicas) for e in events if e.WhichOneof("change") == "binding"]
    assert moves == [(2, 5), (6, 6), (0, 6)]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3 and revisions[0] > start

    for bad_min, bad_max, text in [(-1, 3, "must not be negative"), (0, 0, "at least 1"),
                                   (4, 2, "greater than max_replicas"), (1, 101, "above the limit")]:
        with pytest.raises(errors.InvalidArgument, match=text):
            registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(
                deployment_id=dep.id, min_replicas=bad_min, max_replicas=bad_max), key)
    with pytest.raises(errors.InvalidArgument, match="delta must not be 0"):
        registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=0), key)
    with pytest.raises(errors.InvalidArgument, match="delta 101 is out of range"):
        registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=101), key)
    top = registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=100), key)
    assert (top.min_replicas, top.max_replicas) == (100, 100)
    with pytest.raises(errors.InvalidArgument, match="min_replicas to 101, above the limit of 100"):
        registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=1), key)


def test_environment_needed_when_several_bindings(registry):
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging"), key)
    with pytest.raises(errors.InvalidArgument, match=r"several environments \(preview, staging\)"):
        registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, delta=1), key)
    got = registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=dep.id, environment="staging", delta=1), key)
    assert (got.environment_name, got.min_replicas) == ("staging", 2)
    assert bindings(registry, key)[("preview", dep.id)].min_replicas == 1
    with pytest.raises(errors.NotFound, match="not bound to environment 'production'"):
        registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(
            deployment_id=dep.id, environment="production", min_replicas=1, max_replicas=1), key)
    assert set(bindings(registry, key, environment="staging")) == {("staging", dep.id)}


def test_terminate_and_start(registry):
    _, key = registry.create_project("shop")
    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="staging"), key)
    v2 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:2"), key).deployment  # preview now serves v2
    registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=v1.id, environment="preview", min_replicas=0, max_replicas=2), key)
    registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=v1.id, environment="staging", min_replicas=0, max_replicas=2), key)

    stream = registry.watch()
    collect_until(stream, lambda e: e.snapshot_complete)
    done = registry.call("TerminateDeployment", registry_pb2.TerminateDeploymentRequest(deployment_id=v1.id), key)
    assert shapes.deployment_state(done) == "terminated"
    events = collect_until(stream, lambda e: e.WhichOneof("change") == "binding" and e.binding.environment_name == "staging")
    assert {(e.binding.environment_name, enums.label(common_pb2.Binding.State, e.binding.state), shapes.deployment_state(e.binding.deployment)) for e in events} >= {
        ("staging", "terminated", "terminated")}
    assert all(b.state == common_pb2.Binding.STATE_TERMINATED for b in bindings(registry, key, deployment_id=v1.id).values())
    # The record stays; a terminated deployment cannot be promoted or scaled.
    assert registry.call("GetDeployment", registry_pb2.GetDeploymentRequest(deployment_id=v1.id), key).image == "app:1"
    with pytest.raises(errors.FailedPrecondition, match="terminated and cannot be promoted"):
        registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v1.id, target_environment="production", confirm=True), key)
    with pytest.raises(errors.FailedPrecondition, match="terminated; its replica bounds") as terminated:
        registry.call("AdjustReplicas", registry_pb2.AdjustReplicasRequest(deployment_id=v1.id, environment="staging", delta=1), key)
    # The hint and the reason travel as details (ErrorInfo), not in the message.
    assert "start it first" in terminated.value.hint and terminated.value.reason == "DEPLOYMENT_TERMINATED"
    # Terminating twice changes nothing.
    before = registry.service.current_revision()
    registry.call("TerminateDeployment", registry_pb2.TerminateDeploymentRequest(deployment_id=v1.id), key)
    assert registry.service.current_revision() == before

    started = registry.call("StartDeployment", registry_pb2.StartDeploymentRequest(deployment_id=v1.id), key)
    assert shapes.deployment_state(started) == "active"
    after = bindings(registry, key, deployment_id=v1.id)
    # staging is served by v1: at least one replica; preview (served by v2) stays at 0.
    assert (after[("staging", v1.id)].state, after[("staging", v1.id)].min_replicas) == (common_pb2.Binding.STATE_ACTIVE, 1)
    assert (after[("preview", v1.id)].state, after[("preview", v1.id)].min_replicas) == (common_pb2.Binding.STATE_ACTIVE, 0)
    assert bindings(registry, key)[("preview", v2.id)].serving
    stream.cancel()


def test_rollback_restarts_a_terminated_deployment(registry):
    _, key = registry.create_project("shop")
    v1 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    registry.call("Deploy", registry_pb2.DeployRequest(image="app:2"), key)
    registry.call("TerminateDeployment", registry_pb2.TerminateDeploymentRequest(deployment_id=v1.id), key)
    back = registry.call("Rollback", registry_pb2.RollbackRequest(environment="preview"), key)
    assert back.environment.deployment_id == v1.id
    b = bindings(registry, key)[("preview", v1.id)]
    assert (shapes.binding_json(b)["state"], shapes.deployment_state(b.deployment), b.serving, b.min_replicas >= 1) == ("active", "active", True, True)
