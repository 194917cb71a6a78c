"""Client library: typed access to the Berth services over gRPC.

``error_from_rpc`` is the one place a gRPC status becomes a Berth exception.
"""
from __future__ import annotations

import ipaddress
import json
import socket
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
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
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


# ---------------------------------------------------------------- channels
#
# Every address setting of Berth (flags, BERTH_*_ADDR, platform.json) takes
# one address or a comma-separated list of instances of one service. One
# address gives the channel gRPC's defaults, exactly as before. A list gives
# client-side ``round_robin`` over every instance with client-side health
# checking (``healthCheckConfig``): an instance whose grpc.health.v1 answers
# NOT_SERVING for the service (a standby scheduler, one still starting) gets
# no calls until it serves. Idempotent methods (``retry_policy``) are retried
# by gRPC itself on UNAVAILABLE, on another instance, within the call's
# deadline; pointer moves are retried only under compare-and-swap by their
# callers (the REST API), never blindly.

IDEMPOTENT_PREFIXES = ("Get", "List")
IDEMPOTENT_METHODS = frozenset({"Authenticate", "ResolveImage", "ResolveSecrets", "Activate", "ScaleBinding"})
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def split_addresses(value: str) -> list[str]:
    """The instances an address setting names: ``host:port`` entries
    separated by commas (spaces allowed). Raises ValueError naming the entry
    that is not ``host:port``."""
    found = [part.strip() for part in value.split(",") if part.strip()]
    if not found:
        raise ValueError(f"no address in {value!r}: expected host:port, or several separated by commas")
    for address in found:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not host:port (in {value!r})")
    return found


def _literal_ips(address: str) -> list[tuple[int, str]]:
    """(family, "ip:port" or "[ip]:port") for one entry; a host name is
    resolved now (the list is fixed for the channel's life: give a name with
    several A records as one address to follow changes through DNS)."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
        out = []
        for family, _, _, _, sockaddr in infos:
            entry = (4, f"{sockaddr[0]}:{port}") if family == socket.AF_INET else (6, f"[{sockaddr[0]}]:{port}")
            if entry not in out:
                out.append(entry)
        return out
    return [(4, f"{ip}:{port}")] if ip.version == 4 else [(6, f"[{ip}]:{port}")]


def channel_target(value: str) -> str:
    """The gRPC target for an address setting: the address itself when it
    names one instance, else an ``ipv4:``/``ipv6:`` list of every instance."""
    found = split_addresses(value)
    if len(found) == 1:
        return found[0]
    entries = [entry for address in found for entry in _literal_ips(address)]
    families = {family for family, _ in entries}
    if families == {4}:
        return "ipv4:" + ",".join(a for _, a in entries)
    if families == {6}:
        return "ipv6:" + ",".join(a for _, a in entries)
    # both families: IPv4 as IPv4-mapped IPv6 addresses
    return "ipv6:" + ",".join(a if family == 6 else f"[::ffff:{a.rsplit(':', 1)[0]}]:{a.rsplit(':', 1)[1]}"
                              for family, a in entries)


ALL_SERVICES = (
    "berth.v1.Registry", "berth.internal.v1.RegistryInternal",
    "berth.v1.Secrets", "berth.internal.v1.SecretsInternal",
    "berth.v1.Scheduler", "berth.internal.v1.SchedulerInternal",
)
HEALTH_SERVICE_OF = {"registry": "berth.v1.Registry", "secrets": "berth.v1.Secrets", "scheduler": "berth.v1.Scheduler"}


def idempotent_methods() -> list[dict[str, str]]:
    """Every unary method of Berth's services that is safe to send twice
    (reads, set-once and set-to-a-value writes), as service config names."""
    from google.protobuf import descriptor_pool

    from berth.internal.v1 import registry_internal_pb2, scheduler_internal_pb2, secrets_internal_pb2  # noqa: F401
    from berth.v1 import registry_pb2, scheduler_pb2, secrets_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    return [
        {"service": service, "method": method.name}
        for service in ALL_SERVICES
        for method in pool.FindServiceByName(service).methods
        if not (method.server_streaming or method.client_streaming)
        and (method.name.startswith(IDEMPOTENT_PREFIXES) or method.name in IDEMPOTENT_METHODS)
    ]


def service_config(health_service: str) -> str:
    """The service config of a channel to several instances: round_robin,
    health-checked against ``health_service`` ("" is the server as a whole),
    with gRPC retries of the idempotent methods."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
        "methodConfig": [{"name": idempotent_methods(), "retryPolicy": RETRY_POLICY}],
    }
    return json.dumps(config)


def channel_arguments(value: str, kind: str = "") -> tuple[str, list[tuple[str, Any]]]:
    """(target, options) of a channel to the instances ``value`` names, of
    the service ``kind`` ("registry", "secrets", "scheduler"; "" checks the
    server's overall health). One instance: today's channel."""
    target = channel_target(value)
    options: list[tuple[str, Any]] = []
    if len(split_addresses(value)) > 1:
        options.append(("grpc.service_config", service_config(HEALTH_SERVICE_OF.get(kind, ""))))
        options.append(("grpc.enable_retries", 1))
        # gRPC's default reconnect backoff grows to minutes: an instance that
        # died and came back would stay unused long enough for the next
        # instance's death to leave no backend. Reconnect within a second.
        options.append(("grpc.initial_reconnect_backoff_ms", 100))
        options.append(("grpc.min_reconnect_backoff_ms", 100))
        options.append(("grpc.max_reconnect_backoff_ms", 1000))
    return target, options


def sync_channel(value: str, kind: str = "") -> grpc.Channel:
    target, options = channel_arguments(value, kind)
    return grpc.insecure_channel(target, options=options)


def open_channel(name: str, value: str, make: Any = grpc.insecure_channel) -> Any:
    """A channel (``make``: ``grpc.insecure_channel`` or
    ``grpc.aio.insecure_channel``) to the ``name`` service's instances;
    InvalidArgument naming the setting when ``value`` is not ``host:port``
    or names a host that does not resolve. Shared by ``Client`` and
    ``berth.sdk``."""
    try:
        target, options = channel_arguments(value, name)
    except (ValueError, OSError) as exc:
        raise errors.InvalidArgument(
            f"the {name} address: {exc}", hint=f"set BERTH_{name.upper()}_ADDR to host:port (or several, "
            "separated by commas), or run 'berth up' here"
        ) from None
    return make(target, options=options)


@dataclass(frozen=True)
class Endpoints:
    """Service addresses, each one ``host:port`` or a comma-separated list
    of instances; ``berth.local.endpoints()`` fills them from the
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
        self._channels: dict[str, grpc.Channel] = {}
        for name, addr in (
            ("registry", self.endpoints.registry),
            ("secrets", self.endpoints.secrets),
            ("scheduler", self.endpoints.scheduler),
        ):
            try:
                self._channels[name] = open_channel(name, addr)
            except errors.InvalidArgument:
                self.close()
                raise
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
