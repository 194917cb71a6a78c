"""Pagination of the registry's List RPCs over real gRPC, on both stores:
page_size (default 100, capped at 1000), opaque page tokens read with a
keyset in the store, a stable order under concurrent inserts, and bad or
foreign tokens refused as INVALID_ARGUMENT naming page_token."""
from __future__ import annotations

import base64

import pytest

from berth import errors
from berth.v1 import registry_pb2

IMAGE = "sha256:" + "c" * 64


def deploy(registry, key):  # type: ignore[no-untyped-def]
    return registry.call(
        "Deploy", registry_pb2.DeployRequest(image="example/worker:1", image_id=IMAGE, environment="preview"), key
    ).deployment


def pages(registry, key, method, request, field):  # type: ignore[no-untyped-def]
    """Every page of a list as a list of lists of ids (or sequences)."""
    out = []
    while True:
        response = registry.call(method, request, key)
        items = getattr(response, field)
        out.append([getattr(i, "id", None) or i.sequence for i in items])
        if not response.next_page_token:
            return out
        request.page_token = response.next_page_token


def test_250_deployments_page_100_100_50_in_order_and_history_pages_too(registry):
    _, key = registry.create_project("shop")
    created = [deploy(registry, key).id for _ in range(250)]
    newest_first = list(reversed(created))

    got = pages(registry, key, "ListDeployments", registry_pb2.ListDeploymentsRequest(), "deployments")
    assert [len(p) for p in got] == [100, 100, 50]
    flat = [i for p in got for i in p]
    assert flat == newest_first and len(set(flat)) == 250  # no duplicates, none missing, in order

    # The same list filtered to an environment has its own tokens.
    bound = pages(registry, key, "ListDeployments", registry_pb2.ListDeploymentsRequest(environment="preview",
                                                                                         page_size=120), "deployments")
    assert [len(p) for p in bound] == [120, 120, 10] and [i for p in bound for i in p] == newest_first

    # History: oldest first by sequence, 250 deploys into preview.
    history = pages(registry, key, "ListHistory", registry_pb2.ListHistoryRequest(environment="preview"), "entries")
    assert [len(p) for p in history] == [100, 100, 50]
    assert [s for p in history for s in p] == list(range(1, 251))

    # Size: 0 is the default, anything above 1000 is 1000; an exact fit ends with an empty token.
    everything = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=5000), key)
    assert len(everything.deployments) == 250 and everything.next_page_token == ""
    exact = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=250), key)
    assert len(exact.deployments) == 250 and exact.next_page_token == ""


def test_a_page_boundary_is_stable_under_a_concurrent_insert(registry):
    _, key = registry.create_project("shop")
    created = [deploy(registry, key).id for _ in range(25)]
    first = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=10), key)
    newer = deploy(registry, key).id  # lands before the first page: nothing shifts
    second = registry.call(
        "ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=10, page_token=first.next_page_token), key
    )
    third = registry.call(
        "ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=10, page_token=second.next_page_token), key
    )
    seen = [d.id for page in (first, second, third) for d in page.deployments]
    assert seen == list(reversed(created)) and newer not in seen and third.next_page_token == ""

    # History appends at the end: the new entry shows up on a later page, exactly once.
    h1 = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="preview", page_size=20), key)
    deploy(registry, key)
    h2 = registry.call(
        "ListHistory", registry_pb2.ListHistoryRequest(environment="preview", page_size=20, page_token=h1.next_page_token),
        key,
    )
    assert [e.sequence for e in list(h1.entries) + list(h2.entries)] == list(range(1, 28))


def test_bad_foreign_or_negative_paging_is_invalid_argument_naming_the_field(registry):
    _, key = registry.create_project("shop")
    _, other_key = registry.create_project("other")
    for _ in range(3):
        deploy(registry, key)
        deploy(registry, other_key)
    mine = registry.call("ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=1), key).next_page_token
    history = registry.call("ListHistory", registry_pb2.ListHistoryRequest(environment="preview", page_size=1), key)
    assert mine and history.next_page_token

    cases = [
        ("ListDeployments", registry_pb2.ListDeploymentsRequest(page_size=-1), key, "page_size"),
        ("ListHistory", registry_pb2.ListHistoryRequest(environment="preview", page_size=-5), key, "page_size"),
        ("ListDeployments", registry_pb2.ListDeploymentsRequest(page_token="not a token!"), key, "page_token"),
        ("ListDeployments", registry_pb2.ListDeploymentsRequest(
            page_token=base64.urlsafe_b64encode(b'{"s":1}').decode()), key, "page_token"),
        # Another project's token, another filter's, another method's.
        ("ListDeployments", registry_pb2.ListDeploymentsRequest(page_token=mine), other_key, "page_token"),
        ("ListDeployments", registry_pb2.ListDeploymentsRequest(environment="preview", page_token=mine), key,
         "page_token"),
        ("ListHistory", registry_pb2.ListHistoryRequest(environment="preview", page_token=mine), key, "page_token"),
        ("ListHistory", registry_pb2.ListHistoryRequest(environment="staging", page_token=history.next_page_token),
         key, "page_token"),
    ]
    for method, request, caller_key, field in cases:
        with pytest.raises(errors.InvalidArgument) as refused:
            registry.call(method, request, caller_key)
        assert refused.value.field == field, (method, request)


def test_environments_and_api_keys_page_oldest_first(registry):
    _, key = registry.create_project("shop")
    for i in range(12):
        registry.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name=f"qa-{i:02d}"), key)
        registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name=f"ci-{i:02d}"), key)
    envs = pages(registry, key, "ListEnvironments", registry_pb2.ListEnvironmentsRequest(page_size=5), "environments")
    assert [len(p) for p in envs] == [5, 5, 5]
    everything = registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments
    assert [i for p in envs for i in p] == [e.id for e in everything] and len(everything) == 15
    assert [e.name for e in everything][3:] == [f"qa-{i:02d}" for i in range(12)]
    keys = pages(registry, key, "ListApiKeys", registry_pb2.ListApiKeysRequest(page_size=4), "keys")
    assert [len(p) for p in keys] == [4, 4, 4, 1] and len({i for p in keys for i in p}) == 13
    token = registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(page_size=1), key).next_page_token
    with pytest.raises(errors.InvalidArgument) as refused:
        registry.call("ListApiKeys", registry_pb2.ListApiKeysRequest(page_token=token), key)
    assert refused.value.field == "page_token"


def test_bindings_page_by_environment_then_deployment(registry):
    _, key = registry.create_project("shop")
    deps = [deploy(registry, key).id for _ in range(4)]
    for dep in deps[:3]:
        registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=dep, target_environment="staging"), key)
    whole = registry.call("ListBindings", registry_pb2.ListBindingsRequest(page_size=1000), key)
    expected = [(b.environment_name, b.deployment.id) for b in whole.bindings]
    assert whole.next_page_token == "" and len(expected) == len(set(expected)) >= 5
    assert expected == sorted(expected, key=lambda p: (p[0], deps.index(p[1])))
    got = []
    request = registry_pb2.ListBindingsRequest(page_size=2)
    while True:
        answer = registry.call("ListBindings", request, key)
        assert len(answer.bindings) <= 2
        got += [(b.environment_name, b.deployment.id) for b in answer.bindings]
        if not answer.next_page_token:
            break
        request.page_token = answer.next_page_token
    assert got == expected
    first = registry.call("ListBindings", registry_pb2.ListBindingsRequest(page_size=1), key).next_page_token
    with pytest.raises(errors.InvalidArgument) as refused:
        registry.call("ListBindings", registry_pb2.ListBindingsRequest(environment="staging", page_token=first), key)
    assert refused.value.field == "page_token"
