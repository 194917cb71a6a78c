"""Presence of replica bounds (issue 13 item 5): ``min_replicas`` and
``max_replicas`` are proto3 ``optional`` on Deploy, Promote and ScaleBinding.
Unset is the documented default; a bound given is honoured as given, 0
included; an impossible pair is INVALID_ARGUMENT with a BadRequest naming
the field — over a real gRPC socket, on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from berth import errors
from berth.v1 import registry_pb2

IMAGE = "sha256:" + "e" * 64


def _binding(registry, key, deployment_id, environment):  # type: ignore[no-untyped-def]
    found = registry.call("ListBindings", registry_pb2.ListBindingsRequest(deployment_id=deployment_id,
                                                                           environment=environment), key).bindings
    assert len(found) == 1, found
    return found[0].min_replicas, found[0].max_replicas


def _deploy(registry, key, **bounds):  # type: ignore[no-untyped-def]
    return registry.call("Deploy", registry_pb2.DeployRequest(image="app:1", image_id=IMAGE, **bounds), key).deployment


@pytest.mark.parametrize(("given", "expected"), [
    ({}, (1, 3)),                                      # both unset: the defaults
    ({"min_replicas": 0, "max_replicas": 1}, (0, 1)),  # explicit min 0 / max 1: honoured
    ({"min_replicas": 0}, (0, 3)),                     # min 0 alone is a real minimum, max defaults
    ({"max_replicas": 1}, (1, 1)),                     # max alone: min defaults, never above it
    ({"min_replicas": 5}, (5, 5)),                     # max defaults to the larger of min and 3
    ({"max_replicas": 7}, (1, 7)),
])
def test_deploy_bounds_unset_means_default_and_zero_means_zero(registry, given, expected):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    dep = _deploy(registry, key, **given)
    assert _binding(registry, key, dep.id, "preview") == expected


@pytest.mark.parametrize(("given", "field"), [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"min_replicas": 4, "max_replicas": 0}, "max_replicas"),
    ({"max_replicas": 0}, "max_replicas"),
    ({"min_replicas": -1}, "min_replicas"),
    ({"max_replicas": 101}, "max_replicas"),
    ({"min_replicas": 101}, "max_replicas"),  # max follows min to 101, above the limit
])
def test_deploy_invalid_bounds_name_the_field(registry, given, field):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    with pytest.raises(errors.InvalidArgument) as refused:
        _deploy(registry, key, **given)
    assert refused.value.field == field, refused.value.message
    listed = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(), key).deployments
    assert list(listed) == []  # nothing registered


def test_promote_keeps_existing_bounds_unless_given(registry):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    dep = _deploy(registry, key)
    promote = registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging", min_replicas=0,
                                          max_replicas=1)
    registry.call("Promote", promote, key)
    assert _binding(registry, key, dep.id, "staging") == (0, 1)  # explicit 0/1 honoured
    other = _deploy(registry, key)
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=other.id, target_environment="staging"), key)
    assert _binding(registry, key, other.id, "staging") == (1, 3)  # unset: defaults for a new binding
    # Back to the first: unset bounds keep the binding's own (a minimum of 0 read as 1, it serves again).
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging"), key)
    assert _binding(registry, key, dep.id, "staging") == (1, 1)
    with pytest.raises(errors.InvalidArgument) as refused:
        registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=other.id, target_environment="staging",
                                                             min_replicas=4, max_replicas=2), key)
    assert refused.value.field == "min_replicas"


def test_scale_binding_changes_only_what_is_given(registry):  # type: ignore[no-untyped-def]
    _, key = registry.create_project("shop")
    dep = _deploy(registry, key)

    def scale(**bounds):  # type: ignore[no-untyped-def]
        b = registry.call("ScaleBinding", registry_pb2.ScaleBindingRequest(deployment_id=dep.id, **bounds), key)
        return b.min_replicas, b.max_replicas

    assert scale(max_replicas=6) == (1, 6)
    assert scale(min_replicas=0) == (0, 6)
    assert scale(min_replicas=2, max_replicas=2) == (2, 2)
    for bounds, field in (({}, "min_replicas"), ({"min_replicas": 3}, "min_replicas"),
                          ({"max_replicas": 1}, "min_replicas"), ({"max_replicas": 0}, "max_replicas")):
        with pytest.raises(errors.InvalidArgument) as refused:
            scale(**bounds)
        assert refused.value.field == field, (bounds, refused.value.message)
    assert _binding(registry, key, dep.id, "preview") == (2, 2)  # refusals changed nothing
