"""One way to build, run and stop a Berth gRPC service.

``start_server`` binds the port (0 picks a free one), registers health checking
and reflection (v1alpha and v1), and installs ``CallInterceptor``: the single
place where the caller is authenticated and domain errors become gRPC status codes.

Each process serves a public service (``berth.v1``: project keys, the admin
key where a method says so) and an internal one (``berth.internal.v1``:
service-to-service calls). The interceptor holds the one rule for the
latter: only the service token may call it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_status import rpc_status

from berth import errors
from services.common.auth import API_KEY_METADATA, Principal, current_principal
from services.common.reflection import enable_reflection

log = logging.getLogger("berth.grpc")

PUBLIC_PREFIX = "/berth.v1."
INTERNAL_PREFIX = "/berth.internal.v1."

STATUS_BY_ERROR: dict[type[errors.BerthError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

# Given an API key (or "" when none was sent) returns the principal or raises
# Unauthenticated. Each service supplies its own.
Authenticator = Callable[[str], Awaitable[Principal]]


def status_for(error: errors.BerthError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def status_proto(error: errors.BerthError, code: grpc.StatusCode) -> status_pb2.Status:
    """The ``google.rpc.Status`` for a domain error: the code, the human
    message and the details. Every error gets an ``ErrorInfo`` (its reason;
    the hint, when there is one, as ``metadata["hint"]``); INVALID_ARGUMENT
    with a field a ``BadRequest``; FAILED_PRECONDITION a
    ``PreconditionFailure``; NOT_FOUND with a resource a ``ResourceInfo``."""
    details: list[Message] = []
    metadata = dict(error.metadata)
    if error.hint:
        metadata["hint"] = error.hint
    details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=metadata))
    if code == grpc.StatusCode.INVALID_ARGUMENT and error.field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description),
        ]))
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=error.reason, subject=error.resource_name or error.field, description=error.message,
            ),
        ]))
    if code == grpc.StatusCode.NOT_FOUND and (error.resource_type or error.resource_name):
        details.append(error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=error.resource_name, description=error.message,
        ))
    status = status_pb2.Status(code=code.value[0], message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


class _Undecodable:
    """A request message that could not be decoded (say, a string field that
    is not UTF-8): answered INVALID_ARGUMENT by the handler wrapper rather
    than the transport's UNKNOWN."""

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and kin: the caller's bytes, not our bug
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(
            f"the request message could not be decoded ({request.why}); string fields must be valid UTF-8"
        )


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every ``berth.v1`` and ``berth.internal.v1`` call and
    maps domain errors to status codes. Handlers never call
    ``context.abort`` themselves.

    ``berth.internal.v1`` takes the service token and nothing else: no key or
    an invalid one is UNAUTHENTICATED, a valid project key or the admin key
    PERMISSION_DENIED, before the handler runs."""

    def __init__(self, authenticate: Authenticator, public_methods: Sequence[str] = ()) -> None:
        self._authenticate = authenticate
        self._public = set(public_methods)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        internal = method.startswith(INTERNAL_PREFIX)
        if handler is None or not (internal or method.startswith(PUBLIC_PREFIX)):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        api_key = metadata.get(API_KEY_METADATA, "")
        needs_auth = internal or method not in self._public

        async def enter(context: grpc.aio.ServicerContext) -> None:
            if needs_auth:
                principal = await self._authenticate(api_key)
                if internal and not principal.service:
                    raise errors.PermissionDenied(
                        "only Berth's own services may call berth.internal.v1 (it takes the service token); "
                        "clients use the public berth.v1 API"
                    )
                current_principal.set(principal)

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            if isinstance(exc, errors.BerthError):
                code = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("internal_error", extra={"method": method, "error": exc.message})
                await context.abort_with_status(rpc_status.to_status(status_proto(exc, code)))
            log.exception("unexpected_error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    _check_decoded(request)
                    await enter(context)
                    return await inner_uu(request, context)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place errors are mapped
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await fail(context, exc)
                finally:
                    log.debug("call", extra={"method": method, "ms": round((time.perf_counter() - started) * 1000, 2)})

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
                try:
                    _check_decoded(request)
                    await enter(context)
                    async for item in inner_us(request, context):
                        yield item
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await fail(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: report NOT_SERVING, let in-flight calls finish, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    *,
    host: str,
    port: int,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    authenticate: Authenticator,
    public_methods: Sequence[str] = (),
    serving: bool = True,
) -> RunningServer:
    """``serving=False``: health checks answer NOT_SERVING until
    ``RunningServer.set_serving`` (a service still loading its state)."""
    server = grpc.aio.server(
        interceptors=[CallInterceptor(authenticate, public_methods)],
        options=[
            ("grpc.so_reuseport", 0),
            # Clients keep long watch streams alive with pings every 20 s;
            # accept them instead of answering GOAWAY "too_many_pings".
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection((*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    initial = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health.set(name, initial)
    return RunningServer(server=server, port=bound, health=health, service_names=tuple(service_names))


async def serve_until_signalled(
    running: RunningServer,
    *,
    name: str,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace: float = 5.0,
) -> None:
    """Blocks until SIGTERM/SIGINT, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving", extra={"service": name, "port": running.port})
    await stop.wait()
    log.info("stopping", extra={"service": name})
    if on_stop is not None:
        await on_stop()
    await running.stop(grace)
    log.info("stopped", extra={"service": name})
