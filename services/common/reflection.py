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
"""
from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
METHOD = "ServerReflectionInfo"


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


def _v1_handler(servicer: reflection.aio.ReflectionServicer) -> grpc.GenericRpcHandler:
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
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_v1_handler(servicer),))
