"""The public/internal split of the gRPC API (docs/grpc.md): ``berth.v1`` is
what clients call with a project key (or the admin key); service-to-service
calls live in ``berth.internal.v1``, served by the same processes, and take
the service token only. Checked over real sockets on a small platform."""
from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from berth.internal.v1 import (
    registry_internal_pb2,
    registry_internal_pb2_grpc,
    scheduler_internal_pb2,
    scheduler_internal_pb2_grpc,
    secrets_internal_pb2,
    secrets_internal_pb2_grpc,
)
from berth.v1 import secrets_pb2
from tests.secrets.harness import Platform, start_platform
from tests.secrets.support import ADMIN_KEY, SERVICE_TOKEN

C = grpc.StatusCode
ROOT = pathlib.Path(__file__).resolve().parent.parent

INTERNAL_METHODS = {
    "berth.internal.v1.RegistryInternal": {"Authenticate", "ResolveImage", "Watch", "AdvanceCanary"},
    "berth.internal.v1.SecretsInternal": {"ResolveSecrets"},
    "berth.internal.v1.SchedulerInternal": {"WatchEndpoints", "ReportLoad", "Activate", "ListRouters"},
}
PUBLIC_SERVICES = {"registry": "berth.v1.Registry", "secrets": "berth.v1.Secrets", "scheduler": "berth.v1.Scheduler"}
INTERNAL_SERVICES = {
    "registry": "berth.internal.v1.RegistryInternal",
    "secrets": "berth.internal.v1.SecretsInternal",
    "scheduler": "berth.internal.v1.SchedulerInternal",
}


def _descriptors(package_dir: str, module_package: str) -> list[Any]:
    """The file descriptor of every proto file in ``protos/<package_dir>``."""
    files = sorted((ROOT / "protos" / package_dir).glob("*.proto"))
    assert files, package_dir
    return [importlib.import_module(f"{module_package}.{f.stem}_pb2").DESCRIPTOR for f in files]


def test_the_public_descriptors_hold_none_of_the_internal_surface() -> None:
    internal_files = _descriptors("berth/internal/v1", "berth.internal.v1")
    internal_messages = {name for f in internal_files for name in f.message_types_by_name}
    internal_methods = set().union(*INTERNAL_METHODS.values())
    assert {s.full_name: {m.name for m in s.methods} for f in internal_files for s in f.services_by_name.values()} \
        == INTERNAL_METHODS
    assert {f.package for f in internal_files} == {"berth.internal.v1"}

    for public in _descriptors("berth/v1", "berth.v1"):
        assert public.package == "berth.v1", public.name
        methods = {m.name for s in public.services_by_name.values() for m in s.methods}
        assert not methods & internal_methods, (public.name, methods & internal_methods)
        assert not set(public.message_types_by_name) & internal_messages, public.name
        assert not [d.name for d in public.dependencies if d.package.startswith("berth.internal")], public.name
        assert "Internal (service token)" not in (ROOT / "protos" / public.name).read_text()


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    started = start_platform(tmp_path_factory.mktemp("platform"))
    yield started
    started.close()


def port_of(platform: Platform, process: str) -> int:
    return {"registry": platform.registry, "secrets": platform.secrets, "scheduler": platform.scheduler}[
        process
    ].running.port


@pytest.fixture(scope="module")
def channels(platform: Platform) -> Iterator[dict[str, grpc.Channel]]:
    opened = {p: grpc.insecure_channel(f"127.0.0.1:{port_of(platform, p)}") for p in PUBLIC_SERVICES}
    yield opened
    for channel in opened.values():
        channel.close()


def first(stream: Any) -> Any:
    """A streaming call's first message (its error, if refused); then cancels it."""
    try:
        return next(iter(stream))
    finally:
        stream.cancel()


# (method, process, call(channels, platform, metadata) -> the first answer)
Call = Callable[[dict[str, grpc.Channel], Platform, tuple[tuple[str, str], ...]], Any]


def _binding_key(platform: Platform) -> dict[str, str]:
    b = platform.scheduler.binding
    return {"project_id": b.project_id, "environment_id": b.environment_id, "deployment_id": b.deployment.id}


CALLS: dict[str, tuple[str, Call]] = {
    "Authenticate": ("registry", lambda ch, p, md: registry_internal_pb2_grpc.RegistryInternalStub(ch["registry"]).Authenticate(
        registry_internal_pb2.AuthenticateRequest(api_key=p.key), metadata=md, timeout=10)),
    "ResolveImage": ("registry", lambda ch, p, md: registry_internal_pb2_grpc.RegistryInternalStub(ch["registry"]).ResolveImage(
        registry_internal_pb2.ResolveImageRequest(deployment_id="dep_000000000000", image_id="sha256:" + "e" * 64),
        metadata=md, timeout=10)),
    "Watch": ("registry", lambda ch, p, md: first(registry_internal_pb2_grpc.RegistryInternalStub(ch["registry"]).Watch(
        registry_internal_pb2.WatchRequest(), metadata=md, timeout=10))),
    "AdvanceCanary": ("registry", lambda ch, p, md: registry_internal_pb2_grpc.RegistryInternalStub(ch["registry"]).AdvanceCanary(
        registry_internal_pb2.AdvanceCanaryRequest(project=p.project_id, environment="env_000000000000", step=0,
                                                   action=registry_internal_pb2.AdvanceCanaryRequest.ACTION_ADVANCE),
        metadata=md, timeout=10)),
    "ResolveSecrets": ("secrets", lambda ch, p, md: secrets_internal_pb2_grpc.SecretsInternalStub(ch["secrets"]).ResolveSecrets(
        secrets_internal_pb2.ResolveSecretsRequest(project_id=p.project_id), metadata=md, timeout=10)),
    "WatchEndpoints": ("scheduler", lambda ch, p, md: first(
        scheduler_internal_pb2_grpc.SchedulerInternalStub(ch["scheduler"]).WatchEndpoints(
            scheduler_internal_pb2.WatchEndpointsRequest(), metadata=md, timeout=10))),
    "ReportLoad": ("scheduler", lambda ch, p, md: scheduler_internal_pb2_grpc.SchedulerInternalStub(ch["scheduler"]).ReportLoad(
        scheduler_internal_pb2.ReportLoadRequest(bindings=[scheduler_internal_pb2.BindingLoad(**_binding_key(p))],
                                                 reporter="test"), metadata=md, timeout=10)),
    "Activate": ("scheduler", lambda ch, p, md: scheduler_internal_pb2_grpc.SchedulerInternalStub(ch["scheduler"]).Activate(
        scheduler_internal_pb2.ActivateRequest(**_binding_key(p)), metadata=md, timeout=10)),
    "ListRouters": ("scheduler", lambda ch, p, md: scheduler_internal_pb2_grpc.SchedulerInternalStub(ch["scheduler"]).ListRouters(
        scheduler_internal_pb2.ListRoutersRequest(), metadata=md, timeout=10)),
}


def test_every_internal_method_is_exercised() -> None:
    assert set(CALLS) == set().union(*INTERNAL_METHODS.values())


REFUSALS = [
    ("project", C.PERMISSION_DENIED, "only Berth's own services may call berth.internal.v1"),
    ("admin", C.PERMISSION_DENIED, "only Berth's own services may call berth.internal.v1"),
    ("", C.UNAUTHENTICATED, "no API key given"),
    ("berth_pk_not-a-key", C.UNAUTHENTICATED, "not valid"),
]


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize(("who", "code", "message"), REFUSALS, ids=["project-key", "admin-key", "no-key", "bad-key"])
def test_an_internal_method_refuses_anything_but_the_service_token(
    platform: Platform, channels: dict[str, grpc.Channel], method: str, who: str, code: grpc.StatusCode, message: str
) -> None:
    key = {"project": platform.key, "admin": ADMIN_KEY}.get(who, who)
    metadata = (("x-api-key", key),) if key else ()
    _, call = CALLS[method]
    with pytest.raises(grpc.RpcError) as info:
        call(channels, platform, metadata)
    assert info.value.code() == code, info.value.details()
    assert message in (info.value.details() or "")


def test_the_service_token_is_accepted_by_every_internal_method(platform: Platform, channels: dict[str, grpc.Channel]) -> None:
    token = (("x-api-key", SERVICE_TOKEN),)
    platform.set_secret(platform.key, value="v-internal", name="INTERNAL_TEST")

    principal = CALLS["Authenticate"][1](channels, platform, token)
    assert (principal.project_id, principal.key_name) == (platform.project_id, "ci")
    with pytest.raises(grpc.RpcError) as info:  # past authentication: the domain's answer
        CALLS["ResolveImage"][1](channels, platform, token)
    assert info.value.code() == C.NOT_FOUND, info.value.details()
    assert CALLS["Watch"][1](channels, platform, token).revision >= 1  # the snapshot begins
    with pytest.raises(grpc.RpcError) as info:  # past authentication: no such environment
        CALLS["AdvanceCanary"][1](channels, platform, token)
    assert info.value.code() == C.NOT_FOUND, info.value.details()
    resolved = CALLS["ResolveSecrets"][1](channels, platform, token)
    assert {s.name: s.value for s in resolved.secrets}["INTERNAL_TEST"] == "v-internal"
    assert isinstance(CALLS["WatchEndpoints"][1](channels, platform, token), scheduler_internal_pb2.EndpointSnapshot)
    assert CALLS["ReportLoad"][1](channels, platform, token) == scheduler_internal_pb2.ReportLoadResponse()
    assert CALLS["Activate"][1](channels, platform, token).status
    assert CALLS["ListRouters"][1](channels, platform, token).live_window_seconds > 0


def test_a_project_key_still_calls_the_public_api(platform: Platform, channels: dict[str, grpc.Channel]) -> None:
    answer = platform.secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), platform.key)
    assert isinstance(answer, secrets_pb2.ListSecretsResponse)


@pytest.mark.parametrize("process", sorted(PUBLIC_SERVICES))
def test_health_and_reflection_name_both_services(channels: dict[str, grpc.Channel], process: str) -> None:
    channel = channels[process]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", PUBLIC_SERVICES[process], INTERNAL_SERVICES[process]):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, name

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INTERNAL_SERVICES[process]),
    ]
    listed, internal_file = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {PUBLIC_SERVICES[process], INTERNAL_SERVICES[process]} <= names
    assert internal_file.file_descriptor_response.file_descriptor_proto, "reflection resolves the internal service"


def test_the_grpc_docs_name_every_service_and_method() -> None:
    """docs/grpc.md is written by hand for now: it must at least keep up with
    the protos (every service and method, with its credential)."""
    from services.registry import domain

    doc = (ROOT / "docs" / "grpc.md").read_text()
    for descriptor in (*_descriptors("berth/v1", "berth.v1"), *_descriptors("berth/internal/v1", "berth.internal.v1")):
        for service in descriptor.services_by_name.values():
            assert f"`{service.full_name}`" in doc, service.full_name
            for method in service.methods:
                assert f"`{method.name}`" in doc, f"{service.full_name}/{method.name} is not in docs/grpc.md"
    for prefix in (domain.PROJECT_ID_PREFIX, domain.ENVIRONMENT_ID_PREFIX, domain.DEPLOYMENT_ID_PREFIX,
                   domain.API_KEY_ID_PREFIX):
        assert f"`{prefix}` + 12" in doc, prefix


@pytest.mark.parametrize(("package_dir", "module_package", "go_suffix", "java", "csharp"), [
    ("berth/v1", "berth.v1", "berth/v1;berthv1", "dev.berth.v1", "Berth.V1"),
    ("berth/internal/v1", "berth.internal.v1", "berth/internal/v1;internalv1", "dev.berth.internal.v1",
     "Berth.Internal.V1"),
])
def test_every_proto_file_carries_the_language_file_options(
    package_dir: str, module_package: str, go_suffix: str, java: str, csharp: str
) -> None:
    """go_package, java_package (multiple files), csharp_namespace and
    php_namespace, the same on every file of a package (docs/grpc.md)."""
    doc = (ROOT / "docs" / "grpc.md").read_text()
    go_package = f"github.com/berth-dev/berth/gen/go/{go_suffix}"
    assert f"`{go_package}`" in doc
    for descriptor in _descriptors(package_dir, module_package):
        options = descriptor.GetOptions()
        assert options.go_package == go_package, descriptor.name
        assert (options.java_package, options.java_multiple_files) == (java, True), descriptor.name
        assert options.csharp_namespace == csharp, descriptor.name
        assert options.php_namespace == csharp.replace(".", "\\"), descriptor.name


@pytest.mark.parametrize("process", sorted(PUBLIC_SERVICES))
def test_reflection_v1_lists_and_describes_both_services(channels: dict[str, grpc.Channel], process: str) -> None:
    """A raw ``grpc.reflection.v1.ServerReflection/ServerReflectionInfo``
    call (the v1 messages are v1alpha's under another package, the same
    bytes): every process lists its public and internal service and both
    reflection versions, and describes the internal service and v1
    reflection itself."""
    info = channels[process].stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INTERNAL_SERVICES[process]),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    listed, internal_file, reflection_file = list(info(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {PUBLIC_SERVICES[process], INTERNAL_SERVICES[process], "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names, names

    def files(answer: reflection_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
        assert not answer.HasField("error_response"), answer.error_response
        parsed = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in answer.file_descriptor_response.file_descriptor_proto]
        return {f.name: f for f in parsed}

    internal = files(internal_file)
    service = INTERNAL_SERVICES[process].rsplit(".", 1)[1]
    assert any(f.package == "berth.internal.v1" and service in {s.name for s in f.service} for f in internal.values())
    own = files(reflection_file)["grpc/reflection/v1/reflection.proto"]
    assert own.package == "grpc.reflection.v1"
    assert [m.input_type for s in own.service for m in s.method] == [".grpc.reflection.v1.ServerReflectionRequest"]
