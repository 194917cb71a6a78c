"""Server reflection in both versions: ``grpc.reflection.v1alpha`` (what
grpcio-reflection registers) and ``grpc.reflection.v1`` (what current grpcurl,
Postman and most non-Python clients ask for first).

grpcio-reflection (up to at least 1.85) ships the v1alpha service only. The
v1 protocol is the same messages under another package, so v1 is served here
by the same servicer, through the v1alpha message classes (the bytes on the
wire are identical). A v1 file descriptor, v1alpha's renamed, is added to the
default descriptor pool so reflection can describe the v1 service itself.
(If a newer grpcio-reflection already put the v1 descriptor there, that one
is kept.)

Reflected descriptors carry the protos' comments: the stubs' descriptors do
not (protoc leaves source info out of generated code), so the files of
Berth's own packages are answered from ``descriptors.binpb``, which
scripts/gen_protos.py writes next to each package's stubs with
``--include_source_info``. A file there is used only when it describes the
same thing as the stub the server runs (compared without source info); a
stale one is ignored with a warning.
"""
from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

log = logging.getLogger("berth.reflection")

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
METHOD = "ServerReflectionInfo"
# The packages whose descriptor sets (with comments) ship next to their stubs.
COMMENTED_PACKAGES = ("berth.v1", "berth.internal.v1")
DESCRIPTORS = "descriptors.binpb"


def _bare(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The file without what protoc's descriptor set adds to the stubs' copy:
    source info and computed JSON names."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(file)
    bare.ClearField("source_code_info")
    messages = list(bare.message_type)
    while messages:
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return bare


def commented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info, for every
    file of Berth's packages whose shipped descriptor matches the running
    stub's."""
    pool = descriptor_pool.Default()
    found: dict[str, bytes] = {}
    for package in COMMENTED_PACKAGES:
        try:
            data = importlib.resources.files(package).joinpath(DESCRIPTORS).read_bytes()
        except (FileNotFoundError, ModuleNotFoundError):
            log.warning("reflection_without_comments", extra={"package": package})
            continue
        for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
            try:
                running = descriptor_pb2.FileDescriptorProto()
                pool.FindFileByName(file.name).CopyToProto(running)
            except KeyError:
                continue  # a file no stub of this process imported
            if _bare(file) != _bare(running):
                log.warning("reflection_descriptor_stale", extra={"file": file.name})
                continue
            found[file.name] = file.SerializeToString()
    return found


class CommentedReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer, answering Berth's files with comments."""

    def __init__(self, service_names: Sequence[str]) -> None:
        super().__init__(service_names)
        self._commented = commented_files()

    def _with_comments(self, response: reflection_pb2.ServerReflectionResponse) -> reflection_pb2.ServerReflectionResponse:
        if response.HasField("file_descriptor_response"):
            protos = response.file_descriptor_response.file_descriptor_proto
            for i, raw in enumerate(protos):
                name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                if name in self._commented:
                    protos[i] = self._commented[name]
        return response

    def _file_by_filename(self, request, filename):  # type: ignore[no-untyped-def]
        return self._with_comments(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        return self._with_comments(super()._file_containing_symbol(request, fully_qualified_name))

    def _file_containing_extension(self, request, containing_type, extension_number):  # type: ignore[no-untyped-def]
        return self._with_comments(super()._file_containing_extension(request, containing_type, extension_number))


def _ensure_v1_descriptor() -> None:
    """Puts ``grpc/reflection/v1/reflection.proto`` in the default pool
    unless something (a newer grpcio-reflection) already did."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    source = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(source)
    old_prefix = f".{source.package}."
    source.name = V1_FILE
    source.package = V1_PACKAGE
    for message in source.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(old_prefix):]
    for service in source.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type[len(old_prefix):]
            method.output_type = f".{V1_PACKAGE}." + method.output_type[len(old_prefix):]
    source.options.Clear()
    pool.Add(source)


def _v1_handler(servicer: CommentedReflectionServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    })


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serves v1alpha and v1 reflection on ``server``, both listing
    ``service_names`` and the two reflection services."""
    _ensure_v1_descriptor()
    names = (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    servicer = CommentedReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_v1_handler(servicer),))
