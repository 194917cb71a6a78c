"""The scheduler's calls to the other Berth services' internal APIs
(berth.internal.v1), with the service token, deadlines and retries of what
is safe."""
from __future__ import annotations

from collections.abc import Sequence

import grpc

from berth.internal.v1 import (
    registry_internal_pb2,
    registry_internal_pb2_grpc,
    secrets_internal_pb2,
    secrets_internal_pb2_grpc,
)
from services.common.remote import DEFAULT_DEADLINE, call_idempotent, channel, credentials

from .spec import SecretValue


class GrpcSecretsResolver:
    def __init__(self, address: str, service_token: str) -> None:
        self._channel: grpc.aio.Channel = channel(address)
        self._stub = secrets_internal_pb2_grpc.SecretsInternalStub(self._channel)
        self._token = service_token

    async def resolve(self, project_id: str, environment_id: str) -> Sequence[SecretValue]:
        async def ask() -> secrets_internal_pb2.ResolveSecretsResponse:
            return await self._stub.ResolveSecrets(
                secrets_internal_pb2.ResolveSecretsRequest(project_id=project_id, environment_id=environment_id),
                metadata=credentials(self._token),
                timeout=DEFAULT_DEADLINE,
            )

        answer = await call_idempotent(ask, within=5.0)
        return [SecretValue(name=s.name, value=s.value, version=s.version) for s in answer.secrets]

    async def close(self) -> None:
        await self._channel.close()


class GrpcImageRecorder:
    """``RegistryInternal.ResolveImage``: set once, so retrying is safe."""

    def __init__(self, address: str, service_token: str) -> None:
        self._channel: grpc.aio.Channel = channel(address)
        self._stub = registry_internal_pb2_grpc.RegistryInternalStub(self._channel)
        self._token = service_token

    async def __call__(self, deployment_id: str, image_id: str) -> None:
        async def ask() -> object:
            return await self._stub.ResolveImage(
                registry_internal_pb2.ResolveImageRequest(deployment_id=deployment_id, image_id=image_id),
                metadata=credentials(self._token),
                timeout=DEFAULT_DEADLINE,
            )

        await call_idempotent(ask, within=5.0)

    async def close(self) -> None:
        await self._channel.close()
