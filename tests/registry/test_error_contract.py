"""The error contract: each RPC x bad input gets the exact status code and a
message a person can act on, and leaves the registry unchanged; arbitrary
requests never get UNKNOWN or INTERNAL."""
from __future__ import annotations

import math
import re

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.internal.v1 import registry_internal_pb2
from berth.v1 import common_pb2, registry_pb2
from tests.registry.conftest import ADMIN_KEY, BACKENDS, SERVICE_TOKEN, Registry

C = grpc.StatusCode
R = registry_pb2
RI = registry_internal_pb2  # berth.internal.v1.RegistryInternal
INTERNAL = {m.name for m in RI.DESCRIPTOR.services_by_name["RegistryInternal"].methods}


class World:
    """Two projects with a known history, shared by every case of a module."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        _, self.key = registry.create_project("shop")
        _, self.other_key = registry.create_project("other")
        call = registry.call
        self.v1 = call("Deploy", R.DeployRequest(image="app:1"), self.key).deployment.id
        call("Promote", R.PromoteRequest(deployment_id=self.v1, target_environment="staging"), self.key)
        self.v2 = call("Deploy", R.DeployRequest(image="app:2"), self.key).deployment.id
        call("Promote", R.PromoteRequest(deployment_id=self.v1, target_environment="production", confirm=True), self.key)
        call("Promote", R.PromoteRequest(deployment_id=self.v2, target_environment="production", confirm=True), self.key)
        call("CreateEnvironment", R.CreateEnvironmentRequest(name="qa"), self.key)
        self.dead = call("Deploy", R.DeployRequest(image="app:3", environment="qa"), self.key).deployment.id
        call("TerminateDeployment", R.TerminateDeploymentRequest(deployment_id=self.dead), self.key)
        self.other_dep = call("Deploy", R.DeployRequest(image="app:9"), self.other_key).deployment.id
        self.other_key_id = call("ListApiKeys", R.ListApiKeysRequest(), self.other_key).keys[0].id
        self.ids = [self.v1, self.v2, self.dead, self.other_dep, self.other_key_id]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"
    else:
        url = request.getfixturevalue("postgres_cluster").create_database()
    registry = Registry(url)
    yield World(registry)
    registry.close()


# (rpc, request factory taking the world, key: "project" | "other" | "service" | "admin" | literal, code, message)
CASES = [
    ("ListEnvironments", lambda w: R.ListEnvironmentsRequest(), "", C.UNAUTHENTICATED, "no API key given"),
    ("ListEnvironments", lambda w: R.ListEnvironmentsRequest(), "berth_pk_nope", C.UNAUTHENTICATED, "not valid"),
    ("ListEnvironments", lambda w: R.ListEnvironmentsRequest(), "admin", C.PERMISSION_DENIED, "admin key only creates projects"),
    ("CreateProject", lambda w: R.CreateProjectRequest(name="new"), "project", C.PERMISSION_DENIED, "needs the platform's admin key"),
    ("CreateProject", lambda w: R.CreateProjectRequest(name="shop"), "admin", C.ALREADY_EXISTS, "'shop' already exists"),
    ("CreateProject", lambda w: R.CreateProjectRequest(name=""), "admin", C.INVALID_ARGUMENT, "project name is required"),
    ("GetProject", lambda w: R.GetProjectRequest(project="other"), "project", C.PERMISSION_DENIED, "belongs to project 'shop', not 'other'"),
    ("GetProject", lambda w: R.GetProjectRequest(project="no such!"), "project", C.INVALID_ARGUMENT, "not a valid project"),
    ("GetProject", lambda w: R.GetProjectRequest(project="p" * 81), "project", C.INVALID_ARGUMENT, "81 characters long"),
    ("CreateEnvironment", lambda w: R.CreateEnvironmentRequest(name=""), "project", C.INVALID_ARGUMENT, "environment name is required"),
    ("CreateEnvironment", lambda w: R.CreateEnvironmentRequest(name="e" * 41), "project", C.INVALID_ARGUMENT, "41 characters long"),
    ("CreateEnvironment", lambda w: R.CreateEnvironmentRequest(name="Bad_Name"), "project", C.INVALID_ARGUMENT, "lowercase letters"),
    ("CreateEnvironment", lambda w: R.CreateEnvironmentRequest(name="staging"), "project", C.ALREADY_EXISTS, "'staging' already exists"),
    ("CreateEnvironment", lambda w: R.CreateEnvironmentRequest(project="other", name="x"), "project", C.PERMISSION_DENIED, "belongs to project"),
    ("DeleteEnvironment", lambda w: R.DeleteEnvironmentRequest(environment=""), "project", C.INVALID_ARGUMENT, "environment is required"),
    ("DeleteEnvironment", lambda w: R.DeleteEnvironmentRequest(environment="nope"), "project", C.NOT_FOUND, "'nope' not found"),
    ("DeleteEnvironment", lambda w: R.DeleteEnvironmentRequest(environment="production"), "project", C.FAILED_PRECONDITION, "protected"),
    ("DeleteEnvironment", lambda w: R.DeleteEnvironmentRequest(environment="preview"), "project", C.FAILED_PRECONDITION, "points to deployment"),
    ("CreateApiKey", lambda w: R.CreateApiKeyRequest(name=""), "project", C.INVALID_ARGUMENT, "key name is required"),
    ("CreateApiKey", lambda w: R.CreateApiKeyRequest(name="Not Valid"), "project", C.INVALID_ARGUMENT, "key name 'Not Valid' is not valid"),
    ("CreateApiKey", lambda w: R.CreateApiKeyRequest(name="default"), "project", C.ALREADY_EXISTS, "'default' already exists"),
    ("RevokeApiKey", lambda w: R.RevokeApiKeyRequest(key=""), "project", C.INVALID_ARGUMENT, "key is required"),
    ("RevokeApiKey", lambda w: R.RevokeApiKeyRequest(key="key_000000000000"), "project", C.NOT_FOUND, "no active API key"),
    ("RevokeApiKey", lambda w: R.RevokeApiKeyRequest(key=w.other_key_id), "project", C.NOT_FOUND, "no active API key"),
    ("RevokeApiKey", lambda w: R.RevokeApiKeyRequest(key="default"), "project", C.FAILED_PRECONDITION, "last active key"),
    ("Deploy", lambda w: R.DeployRequest(image=""), "project", C.INVALID_ARGUMENT, "image is required"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", environment="nope"), "project", C.NOT_FOUND, "environment 'nope' not found"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", environment="production"), "project", C.FAILED_PRECONDITION, "protected: moving its pointer needs confirmation"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", expected_sequence=7), "project", C.ABORTED, "expected sequence 7, it is at 2"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", expected_sequence=0), "project", C.ABORTED, "expected sequence 0, it is at 2"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", config=common_pb2.WorkerConfig(resources=common_pb2.Resources(cpus=math.nan))), "project", C.INVALID_ARGUMENT, "cpus must be a finite number"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", reason="a\x00b"), "project", C.INVALID_ARGUMENT, "reason must not contain NUL"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", project="other"), "project", C.PERMISSION_DENIED, "belongs to project"),
    ("GetDeployment", lambda w: R.GetDeploymentRequest(), "project", C.INVALID_ARGUMENT, "deployment_id is required"),
    ("GetDeployment", lambda w: R.GetDeploymentRequest(deployment_id="dep nope"), "project", C.INVALID_ARGUMENT, "is not a deployment id"),
    # Well-formed but wrong, not merely unknown: a caller error, never NOT_FOUND.
    ("GetDeployment", lambda w: R.GetDeploymentRequest(deployment_id="dep_nope"), "project", C.INVALID_ARGUMENT, "is not a deployment id"),
    ("GetDeployment", lambda w: R.GetDeploymentRequest(deployment_id="dep_000000000000"), "project", C.NOT_FOUND, "not found in project 'shop'"),
    ("GetDeployment", lambda w: R.GetDeploymentRequest(deployment_id=w.other_dep), "project", C.NOT_FOUND, "not found in project 'shop'"),
    ("ListDeployments", lambda w: R.ListDeploymentsRequest(environment="nope"), "project", C.NOT_FOUND, "environment 'nope' not found"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id="dep_000000000000", target_environment="staging"), "project", C.NOT_FOUND, "not found"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.other_dep, target_environment="staging"), "project", C.NOT_FOUND, "not found in project 'shop'"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.v2, target_environment="nope"), "project", C.NOT_FOUND, "environment 'nope'"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.v1, target_environment="production"), "project", C.FAILED_PRECONDITION, "protected"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.v2, target_environment="staging", expected_sequence=5), "project", C.ABORTED, "expected sequence 5, it is at 1"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.v1, target_environment="staging"), "project", C.FAILED_PRECONDITION, "already serves"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.dead, target_environment="staging"), "project", C.FAILED_PRECONDITION, "terminated and cannot be promoted"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.v2, target_environment="staging", min_replicas=4, max_replicas=2), "project", C.INVALID_ARGUMENT, "min_replicas 4 is greater"),
    ("Rollback", lambda w: R.RollbackRequest(environment="staging"), "project", C.FAILED_PRECONDITION, "no earlier deployment"),
    ("Rollback", lambda w: R.RollbackRequest(environment="preview", to_deployment_id=w.other_dep), "project", C.FAILED_PRECONDITION, "never served"),
    ("Rollback", lambda w: R.RollbackRequest(environment="preview", expected_sequence=1), "project", C.ABORTED, "expected sequence 1, it is at 2"),
    ("Rollback", lambda w: R.RollbackRequest(environment="production"), "project", C.FAILED_PRECONDITION, "protected"),
    ("Rollback", lambda w: R.RollbackRequest(environment=""), "project", C.INVALID_ARGUMENT, "environment is required"),
    ("ListHistory", lambda w: R.ListHistoryRequest(environment="nope"), "project", C.NOT_FOUND, "'nope' not found"),
    ("ListHistory", lambda w: R.ListHistoryRequest(project="shop", environment="preview"), "other", C.PERMISSION_DENIED, "belongs to project 'other'"),
    ("ListBindings", lambda w: R.ListBindingsRequest(deployment_id=w.other_dep), "project", C.NOT_FOUND, "not found in project"),
    ("ScaleBinding", lambda w: R.ScaleBindingRequest(deployment_id=w.v1, min_replicas=1, max_replicas=2), "project", C.INVALID_ARGUMENT, r"several environments \(preview, production, staging\)"),
    ("ScaleBinding", lambda w: R.ScaleBindingRequest(deployment_id=w.v2, environment="staging", min_replicas=1, max_replicas=2), "project", C.NOT_FOUND, "not bound to environment 'staging'"),
    ("ScaleBinding", lambda w: R.ScaleBindingRequest(deployment_id=w.v2, environment="preview", min_replicas=3, max_replicas=1), "project", C.INVALID_ARGUMENT, "min_replicas 3 is greater"),
    ("ScaleBinding", lambda w: R.ScaleBindingRequest(deployment_id=w.dead, min_replicas=1, max_replicas=1), "project", C.FAILED_PRECONDITION, "terminated"),
    ("AdjustReplicas", lambda w: R.AdjustReplicasRequest(deployment_id=w.v2, environment="preview"), "project", C.INVALID_ARGUMENT, "delta must not be 0"),
    ("AdjustReplicas", lambda w: R.AdjustReplicasRequest(deployment_id=w.other_dep, delta=1), "project", C.NOT_FOUND, "not found in project"),
    ("TerminateDeployment", lambda w: R.TerminateDeploymentRequest(deployment_id="dep_000000000000"), "project", C.NOT_FOUND, "not found"),
    ("StartDeployment", lambda w: R.StartDeploymentRequest(deployment_id=w.other_dep), "project", C.NOT_FOUND, "not found in project"),
    # berth.internal.v1.RegistryInternal: the service token only.
    ("Authenticate", lambda w: RI.AuthenticateRequest(api_key="x"), "project", C.PERMISSION_DENIED, "only Berth's own services"),
    ("Authenticate", lambda w: RI.AuthenticateRequest(api_key="x"), "admin", C.PERMISSION_DENIED, "only Berth's own services"),
    ("Authenticate", lambda w: RI.AuthenticateRequest(api_key="x"), "", C.UNAUTHENTICATED, "no API key given"),
    ("Authenticate", lambda w: RI.AuthenticateRequest(api_key="berth_pk_nope"), "service", C.UNAUTHENTICATED, "not valid"),
    ("ResolveImage", lambda w: RI.ResolveImageRequest(deployment_id=w.v1, image_id="sha256:" + "e" * 64), "project", C.PERMISSION_DENIED, "only Berth's own services"),
    ("ResolveImage", lambda w: RI.ResolveImageRequest(deployment_id=w.v1, image_id="latest"), "service", C.INVALID_ARGUMENT, "sha256:<64 hex digits>"),
    ("ResolveImage", lambda w: RI.ResolveImageRequest(deployment_id="dep_000000000000", image_id="sha256:" + "e" * 64), "service", C.NOT_FOUND, "not found"),
]


def status_details(exc: grpc.RpcError) -> dict[type, object]:
    """The details of a failed call's google.rpc.Status, by type."""
    status = rpc_status.from_call(exc)
    assert status is not None, f"no google.rpc.Status details: {exc.code()} {exc.details()}"
    assert status.code == exc.code().value[0] and status.message == exc.details()
    out: dict[type, object] = {}
    for any_detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo):
            if any_detail.Is(cls.DESCRIPTOR):
                message = cls()
                any_detail.Unpack(message)
                out[cls] = message
    return out


# Hints travel in ErrorInfo.metadata["hint"] (the CLI shows them).
HINTS = [
    ("DeleteEnvironment", lambda w: R.DeleteEnvironmentRequest(environment="nope"), "NOT_FOUND", "known environments: preview"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", environment="production"), "PROTECTED_ENVIRONMENT", "--yes"),
    ("Deploy", lambda w: R.DeployRequest(image="app:1", expected_sequence=7), "SEQUENCE_CONFLICT", "re-read the history"),
    ("Promote", lambda w: R.PromoteRequest(deployment_id=w.dead, target_environment="staging"), "DEPLOYMENT_TERMINATED", "berth deployment start"),
]


@pytest.mark.parametrize(("rpc", "make", "reason", "hint"), HINTS)
def test_hints_and_reasons_travel_in_error_info(world, rpc, make, reason, hint):
    with pytest.raises(grpc.RpcError) as info:
        getattr(world.registry.stub, rpc)(make(world), metadata=(("x-api-key", world.key),), timeout=10)
    detail = status_details(info.value)[error_details_pb2.ErrorInfo]
    assert hint in detail.metadata["hint"] and hint not in info.value.details()
    assert detail.reason == reason


def stub_for(registry: Registry, rpc: str):  # type: ignore[no-untyped-def]
    return registry.internal if rpc in INTERNAL else registry.stub


def key_for(world: World, which: str) -> str:
    return {"project": world.key, "other": world.other_key, "service": SERVICE_TOKEN, "admin": ADMIN_KEY}.get(which, which)


@pytest.mark.parametrize(("rpc", "make", "who", "code", "message"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_error_contract(world, rpc, make, who, code, message):
    registry = world.registry
    revision = registry.service.current_revision()
    history = registry.call("ListHistory", R.ListHistoryRequest(environment="preview"), world.key).entries
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub_for(registry, rpc), rpc)(make(world), metadata=(("x-api-key", key_for(world, who)),), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert re.search(message, info.value.details()), info.value.details()
    details = status_details(info.value)
    assert "hint:" not in info.value.details(), "hints travel in ErrorInfo.metadata, not in the message"
    info_detail = details[error_details_pb2.ErrorInfo]
    assert info_detail.domain == "berth.dev" and re.fullmatch(r"[A-Z][A-Z0-9_]*", info_detail.reason), info_detail
    if code == C.INVALID_ARGUMENT:
        violations = details[error_details_pb2.BadRequest].field_violations
        assert violations and violations[0].field and violations[0].description, details
        # The field named is one the message names too (or its parent, for a map entry).
        assert violations[0].field.split(".")[0] in info.value.details(), (violations[0].field, info.value.details())
    if code == C.ABORTED:
        assert info_detail.reason == "SEQUENCE_CONFLICT"
        history_env = make(world)
        env_name = getattr(history_env, "environment", "") or getattr(history_env, "target_environment", "") or "preview"
        entries = registry.call("ListHistory", R.ListHistoryRequest(environment=env_name), world.key).entries
        assert info_detail.metadata["current_sequence"] == str(max((e.sequence for e in entries), default=0))
    if code == C.FAILED_PRECONDITION:
        assert details[error_details_pb2.PreconditionFailure].violations[0].type == info_detail.reason
    if code == C.NOT_FOUND:
        assert details[error_details_pb2.ResourceInfo].resource_type, details
    # A refused call changes nothing.
    assert registry.service.current_revision() == revision
    assert registry.call("ListHistory", R.ListHistoryRequest(environment="preview"), world.key).entries == history


# ---- arbitrary requests -----------------------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=120)
SCALARS = {
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    # Open enums: any int32 travels, values this server does not know included.
    FieldDescriptor.TYPE_ENUM: st.one_of(st.integers(-1, 8), st.integers(-(2**31), 2**31 - 1)),
}


def message_strategy(descriptor, known: st.SearchStrategy[str], depth: int = 0):  # type: ignore[no-untyped-def]
    """A request of the given type with every field drawn independently:
    arbitrary text or a known-good name/id, any integer of its width, any
    float (NaN and infinities included), nested messages, maps and lists."""
    cls = GetMessageClass(descriptor)
    fields = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = st.dictionaries(st.one_of(TEXT, st.sampled_from(["PORT", "BERTH_X", "OK_NAME"])), TEXT, max_size=3)
        elif f.message_type is not None:
            if depth > 2 or f.message_type.full_name.startswith("google."):
                continue
            value = message_strategy(f.message_type, known, depth + 1)
        elif f.type == FieldDescriptor.TYPE_STRING:
            value = st.one_of(TEXT, known)
        else:
            value = SCALARS[f.type]
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if f.is_repeated and not is_map:  # repeated scalars and messages (RecordExperimentRunRequest.cases)
            value = st.lists(value, max_size=3)
        fields[f.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**{k: v for k, v in kw.items() if v is not None}))


UNARY = [
    m
    for service in (R.DESCRIPTOR.services_by_name["Registry"], RI.DESCRIPTOR.services_by_name["RegistryInternal"])
    for m in service.methods
    if not m.server_streaming
]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_requests_never_get_unknown_or_internal(world, data):
    known = st.sampled_from([*world.ids, "shop", "other", "preview", "staging", "production", "qa", "default",
                             "app:1", "sha256:" + "f" * 64, ""])
    method = data.draw(st.sampled_from(UNARY), label="rpc")
    request = data.draw(message_strategy(method.input_type, known), label="request")
    who = data.draw(st.sampled_from(["project", "other", "service", "admin", "", "berth_pk_x"]), label="key")
    try:
        getattr(stub_for(world.registry, method.name), method.name)(
            request, metadata=(("x-api-key", key_for(world, who)),), timeout=10
        )
    except grpc.RpcError as exc:
        assert exc.code() not in (C.UNKNOWN, C.INTERNAL), f"{method.name}({request}) -> {exc.code()}: {exc.details()}"
        assert exc.details(), "every error carries a message"
        if exc.code() != C.DEADLINE_EXCEEDED:
            details = status_details(exc)
            assert details[error_details_pb2.ErrorInfo].reason, f"{method.name}({request}): no ErrorInfo reason"
            if exc.code() == C.ABORTED and details[error_details_pb2.ErrorInfo].reason == "SEQUENCE_CONFLICT":
                assert details[error_details_pb2.ErrorInfo].metadata["current_sequence"].isdigit()


@pytest.mark.parametrize(("path", "who"), [
    ("/berth.v1.Registry/CreateProject", "admin"),
    ("/berth.v1.Registry/ListEnvironments", "project"),
    ("/berth.internal.v1.RegistryInternal/Authenticate", "service"),
])
def test_request_bytes_that_do_not_decode_are_invalid_argument_not_unknown(world: World, path: str, who: str) -> None:
    # Field 1 (a string in each request) holding bytes that are not UTF-8,
    # sent as raw bytes as a non-Python client could.
    raw = bytes([0x0A, 2, 0xFF, 0xFE])
    call = world.registry.channel.unary_unary(path)
    with pytest.raises(grpc.RpcError) as err:
        call(raw, metadata=(("x-api-key", key_for(world, who)),), timeout=10)
    assert err.value.code() == C.INVALID_ARGUMENT, err.value.details()
    assert "UTF-8" in err.value.details()
    environments = world.registry.call("ListEnvironments", R.ListEnvironmentsRequest(), world.key).environments
    assert {"preview", "staging", "production", "qa"} <= {e.name for e in environments}  # still serving, unchanged
