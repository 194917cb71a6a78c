"""docs/grpc.md's reference is generated from the protos' comments
(scripts/gen_grpc_docs.py), and server reflection serves descriptors that
carry those comments (services/common/reflection.py)."""
from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from berth.internal.v1 import registry_internal_pb2
from berth.v1 import registry_pb2, scheduler_pb2, secrets_pb2
from services.common.auth import Principal
from services.common.server import start_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_grpc_docs  # noqa: E402


def test_grpc_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_grpc_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, "docs/grpc.md is stale: run python scripts/gen_grpc_docs.py and commit"


def test_every_method_and_message_is_in_the_reference_with_its_comment():
    text = (ROOT / "docs" / "grpc.md").read_text()
    reference = text.split(gen_grpc_docs.START, 1)[1].split(gen_grpc_docs.END, 1)[0]
    fds = gen_grpc_docs.descriptor_set()
    berth_files = [f for f in fds.file if f.package.startswith("berth.")]
    assert {f.package for f in berth_files} == {"berth.v1", "berth.internal.v1"}
    for f in berth_files:
        comments = gen_grpc_docs.Comments(f)
        for si, service in enumerate(f.service):
            assert f"### Service `{f.package}.{service.name}`" in reference
            for mi, method in enumerate(service.method):
                comment = comments.get(gen_grpc_docs.FILE_SERVICE, si, gen_grpc_docs.SERVICE_METHOD, mi)
                assert comment, f"{service.name}.{method.name} has no comment in {f.name}"
                assert f"#### `{service.name}.{method.name}`" in reference
                assert comment.split("\n")[0] in reference
                if f.package == "berth.v1":  # the public API says who may call and what fails
                    assert "Credentials:" in comment and "Errors:" in comment, f"{service.name}.{method.name}"
        for message in f.message_type:
            assert f"#### `{message.name}`" in reference, message.name
    # An enum is rendered with its values and their comments.
    assert "#### enum `HistoryEntry.Kind`" in reference
    assert "| `KIND_PROMOTE` | 2 | Registry.Promote pointed it at an existing deployment. |" in reference
    # Field types show presence and links.
    assert "| `min_replicas` | 6 | optional int32 |" in reference
    assert "[`WorkerConfig`](#berth-v1-workerconfig)" in reference


def _reflect(port: int, version: str, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        [answer] = list(info(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]),
                             timeout=10))
    assert answer.HasField("file_descriptor_response"), answer
    return [descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto]


def _method_comment(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> str:
    [si] = [i for i, s in enumerate(file.service) if s.name == service]
    [mi] = [i for i, m in enumerate(file.service[si].method) if m.name == method]
    for location in file.source_code_info.location:
        if list(location.path) == [gen_grpc_docs.FILE_SERVICE, si, gen_grpc_docs.SERVICE_METHOD, mi]:
            return location.leading_comments
    return ""


def test_reflection_serves_the_protos_comments():
    """A reflection client (v1 and v1alpha) reads a method's comment, a
    field's and an enum value's from the descriptors a server answers."""
    services = (
        registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
        registry_internal_pb2.DESCRIPTOR.services_by_name["RegistryInternal"].full_name,
        secrets_pb2.DESCRIPTOR.services_by_name["Secrets"].full_name,
        scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    )

    async def nobody(api_key: str) -> Principal:  # no RPC of these services is called
        raise AssertionError("not called")

    async def scenario() -> None:
        running = await start_server(host="127.0.0.1", port=0, service_names=services,
                                     register=lambda server: None, authenticate=nobody)
        try:
            for version in ("v1", "v1alpha"):
                files = await asyncio.to_thread(_reflect, running.port, version, "berth.v1.Registry")
                by_name = {f.name: f for f in files}
                assert {"berth/v1/registry.proto", "berth/v1/common.proto"} <= set(by_name), sorted(by_name)
                promote = _method_comment(by_name["berth/v1/registry.proto"], "Registry", "Promote")
                assert "Points an environment at an existing deployment" in promote, promote
                assert "Credentials: project key." in promote
                common = by_name["berth/v1/common.proto"]
                assert any("Never sent by the server." in loc.leading_comments
                           for loc in common.source_code_info.location)
                internal = await asyncio.to_thread(_reflect, running.port, version, "berth.internal.v1.RegistryInternal")
                [watch_file] = [f for f in internal if f.name == "berth/internal/v1/registry_internal.proto"]
                assert "platform-wide change feed" in _method_comment(watch_file, "RegistryInternal", "Watch")
                scheduler = await asyncio.to_thread(_reflect, running.port, version, "berth.v1.Scheduler")
                [sched] = [f for f in scheduler if f.name == "berth/v1/scheduler.proto"]
                assert "Credentials:" in _method_comment(sched, "Scheduler", "GetDeploymentStatus")
        finally:
            await running.stop(0)

    asyncio.run(scenario())
