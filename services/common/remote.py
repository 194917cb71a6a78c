"""Calling another Berth service: channels, credentials, deadlines, retries
of what is safe, and authentication through the registry."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from berth import errors
from berth.client import channel_arguments, error_from_rpc
from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from services.common.auth import (
    ADMIN_PRINCIPAL,
    API_KEY_METADATA,
    SERVICE_PRINCIPAL,
    Principal,
    same_secret,
)

T = TypeVar("T")

DEFAULT_DEADLINE = 5.0


def channel(address: str, kind: str = "") -> grpc.aio.Channel:
    """A channel to the service ``kind`` ("registry", "secrets",
    "scheduler") at ``address``: one ``host:port``, or a comma-separated list
    of instances reached with round_robin, health-checked, idempotent methods
    retried by gRPC (``berth.client.channel_arguments``)."""
    target, options = channel_arguments(address, kind)
    return grpc.aio.insecure_channel(
        target,
        options=[("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_permit_without_calls", 1), *options],
    )


def credentials(token: str) -> tuple[tuple[str, str], ...]:
    return ((API_KEY_METADATA, token),)


async def call_idempotent(fn: Callable[[], Awaitable[T]], *, within: float = 10.0) -> T:
    """Retries a read or an idempotent write while the peer is UNAVAILABLE,
    with jittered backoff, for at most ``within`` seconds."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(errors.Unavailable),
            wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
            stop=stop_after_delay(within),
            reraise=True,
        ):
            with attempt:
                try:
                    return await fn()
                except grpc.aio.AioRpcError as exc:
                    raise error_from_rpc(exc) from None
    except errors.BerthError:
        raise
    raise errors.Internal("retry loop ended without a result")  # pragma: no cover


class RegistryAuthenticator:
    """Authenticates API keys by asking the registry on every call
    (``berth.internal.v1.RegistryInternal.Authenticate``). The service token
    and admin key are checked locally.

    Project keys are deliberately not cached, positively or negatively, and
    a call never shares an answer with another call that asked before it:
    revoking a key commits in the registry before ``RevokeApiKey`` returns,
    so every service refuses the key from then on, with no window. One
    round trip per call is cheap at control-plane rates."""

    def __init__(self, registry_address: str, service_token: str, *, admin_key: str = "") -> None:
        self._channel = channel(registry_address, "registry")
        self._stub = registry_internal_pb2_grpc.RegistryInternalStub(self._channel)
        self._service_token = service_token
        self._admin_key = admin_key

    async def __call__(self, api_key: str) -> Principal:
        if not api_key:
            raise errors.Unauthenticated("no API key given", hint="set BERTH_API_KEY")
        if same_secret(api_key, self._service_token):
            return SERVICE_PRINCIPAL
        if same_secret(api_key, self._admin_key):
            return ADMIN_PRINCIPAL

        async def ask() -> registry_internal_pb2.Principal:
            return await self._stub.Authenticate(
                registry_internal_pb2.AuthenticateRequest(api_key=api_key),
                metadata=credentials(self._service_token),
                timeout=DEFAULT_DEADLINE,
            )

        answer = await call_idempotent(ask, within=5.0)
        return Principal(
            project_id=answer.project_id,
            project_name=answer.project_name,
            key_name=answer.key_name,
            admin=answer.admin,
        )

    async def close(self) -> None:
        await self._channel.close()
