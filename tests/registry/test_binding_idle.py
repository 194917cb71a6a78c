"""A binding's paused-tier windows (idle_pause_seconds, idle_stop_seconds):
set by Deploy, Promote and ScaleBinding, kept when unset, published on the
watch (what the scheduler reads), refused out of range naming the field —
on SQLite and PostgreSQL (the migration adds the columns)."""
from __future__ import annotations

import pytest

from berth import errors
from berth.v1 import registry_pb2
from tests.registry.conftest import collect_until

IMAGE = "sha256:" + "e" * 64


def windows(b):  # type: ignore[no-untyped-def]
    return (b.idle_pause_seconds, b.idle_stop_seconds)


def binding_of(registry, key, dep_id, env):  # type: ignore[no-untyped-def]
    resp = registry.call("ListBindings", registry_pb2.ListBindingsRequest(deployment_id=dep_id, environment=env), key)
    (b,) = resp.bindings
    return b


def test_windows_set_kept_and_published(registry):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    plain = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE), key).deployment
    assert windows(binding_of(registry, key, plain.id, "preview")) == (0, 0)  # the scheduler's defaults

    dep = registry.call("Deploy", registry_pb2.DeployRequest(
        image="app:2", image_id=IMAGE, min_replicas=0, idle_pause_seconds=30, idle_stop_seconds=600), key).deployment
    assert windows(binding_of(registry, key, dep.id, "preview")) == (30, 600)

    stream = registry.watch()
    collect_until(stream, lambda e: e.snapshot_complete)
    scaled = registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(
        deployment_id=dep.id, environment="preview", idle_stop_seconds=1200), key)
    assert windows(scaled) == (30, 1200)  # the pause window unset: kept
    assert (scaled.min_replicas, scaled.max_replicas) == (0, 3)  # bounds unset: kept
    [event] = [e for e in collect_until(stream, lambda e: e.WhichOneof("change") == "binding")
               if e.WhichOneof("change") == "binding"]
    stream.cancel()
    assert windows(event.binding) == (30, 1200)  # what the scheduler sees

    same = registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(
        deployment_id=dep.id, environment="preview", idle_pause_seconds=30), key)
    assert windows(same) == (30, 1200)

    registry.call("Promote", registry_pb2.PromoteRequest(
        deployment_id=dep.id, target_environment="staging", idle_pause_seconds=5), key)
    assert windows(binding_of(registry, key, dep.id, "staging")) == (5, 0)
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=plain.id, target_environment="staging"), key)
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging"), key)
    assert windows(binding_of(registry, key, dep.id, "staging")) == (5, 0)  # unset: what it had there

    back = registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(
        deployment_id=dep.id, environment="preview", idle_pause_seconds=0, idle_stop_seconds=0), key)
    assert windows(back) == (0, 0)  # 0: the scheduler's defaults again


@pytest.mark.parametrize("field", ["idle_pause_seconds", "idle_stop_seconds"])
@pytest.mark.parametrize("value", [-1, 86_401])
def test_out_of_range_is_refused_naming_the_field(registry, field, value):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE), key).deployment
    for method, request in [
        ("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=dep.id, **{field: value})),
        ("Deploy", registry_pb2.DeployRequest(image="app:2", image_id=IMAGE, **{field: value})),
        ("Promote", registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging", **{field: value})),
    ]:
        with pytest.raises(errors.InvalidArgument, match=f"{field} {value} is out of range") as raised:
            registry.call(method, request, key)
        assert raised.value.field == field
    b = binding_of(registry, key, dep.id, "preview")
    assert windows(b) == (0, 0)  # nothing changed
    listed = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(), key).deployments
    assert [d.id for d in listed] == [dep.id]  # the refused Deploy registered nothing


def test_scale_with_nothing_given_is_still_refused(registry):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE), key).deployment
    with pytest.raises(errors.InvalidArgument, match="min_replicas or max_replicas is required"):
        registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=dep.id), key)
