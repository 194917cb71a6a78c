"""Client library: typed access to the Berth services over gRPC.

``error_from_rpc`` is the one place a gRPC status becomes a Berth exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from berth import errors
from berth.v1 import (
    registry_pb2_grpc,
    scheduler_pb2_grpc,
    secrets_pb2_grpc,
)

ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.BerthError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
}


def status_details(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carried
    (``grpc-status-details-bin``), or None when it carried none."""
    try:
        return rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError, DecodeError):
        return None


def error_from_rpc(exc: grpc.RpcError) -> errors.BerthError:
    """The Berth exception for a failed call, with the structured details the
    service sent (reason, metadata, field, resource; the hint from
    ``ErrorInfo.metadata["hint"]``)."""
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or code.name  # type: ignore[attr-defined]
    cls = ERROR_BY_STATUS.get(code, errors.Internal)
    kwargs: dict[str, Any] = {}
    status = status_details(exc)
    for any_detail in status.details if status is not None else ():
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            metadata = dict(info.metadata)
            kwargs["reason"] = info.reason
            kwargs["hint"] = metadata.pop("hint", "")
            kwargs["metadata"] = metadata
        elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
            if bad.field_violations:
                kwargs["field"] = bad.field_violations[0].field
                kwargs["description"] = bad.field_violations[0].description
        elif any_detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            any_detail.Unpack(resource)
            kwargs["resource_type"] = resource.resource_type
            kwargs["resource_name"] = resource.resource_name
    error = cls(details, **kwargs)
    # Only what the service sent: not a field guessed from the text.
    error.field = kwargs.get("field", "")
    error.description = kwargs.get("description", "")
    error.code = code.name  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True)
class Endpoints:
    """Service addresses; ``berth.local.endpoints()`` fills them from the
    environment and the running platform's ``platform.json``."""

    registry: str = "127.0.0.1:50051"
    secrets: str = "127.0.0.1:50052"
    scheduler: str = "127.0.0.1:50053"


@dataclass
class Client:
    """Synchronous client used by the CLI. Every call carries a deadline and
    raises a ``berth.errors`` exception on failure."""

    api_key: str
    endpoints: Endpoints = field(default_factory=Endpoints)
    timeout: float = 15.0

    def __post_init__(self) -> None:
        self._channels = {
            name: grpc.insecure_channel(addr)
            for name, addr in (
                ("registry", self.endpoints.registry),
                ("secrets", self.endpoints.secrets),
                ("scheduler", self.endpoints.scheduler),
            )
        }
        self.registry = registry_pb2_grpc.RegistryStub(self._channels["registry"])
        self.secrets = secrets_pb2_grpc.SecretsStub(self._channels["secrets"])
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channels["scheduler"])

    def call(self, method, request, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return method(
                request,
                metadata=(("x-api-key", self.api_key),) if self.api_key else (),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_all(self, method, request, field: str, *, page_size: int = 0) -> list:  # type: ignore[no-untyped-def]
        """Every item of a paginated List RPC: follows ``next_page_token``
        until it is empty and returns the ``field`` items of all pages in
        order."""
        items: list = []
        request.page_size = page_size
        request.page_token = ""
        while True:
            response = self.call(method, request)
            items.extend(getattr(response, field))
            if not response.next_page_token:
                return items
            request.page_token = response.next_page_token

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
