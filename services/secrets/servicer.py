"""gRPC handlers of berth.v1.Secrets and berth.internal.v1.SecretsInternal
(the service token only: the interceptor's rule, services/common/server.py)."""
from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from berth.errors import InvalidArgument, NotFound, PermissionDenied
from berth.internal.v1 import secrets_internal_pb2, secrets_internal_pb2_grpc
from berth.v1 import common_pb2, registry_pb2, registry_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from services.common.auth import Principal, caller
from services.common.remote import DEFAULT_DEADLINE, call_idempotent, channel, credentials
from services.secrets.service import SecretInfo, SecretsService, validate_secret

log = logging.getLogger("berth.secrets")

SERVICE_NAME = secrets_pb2.DESCRIPTOR.services_by_name["Secrets"].full_name
INTERNAL_SERVICE_NAME = secrets_internal_pb2.DESCRIPTOR.services_by_name["SecretsInternal"].full_name
SERVICE_NAMES = (SERVICE_NAME, INTERNAL_SERVICE_NAME)


def _ts(value) -> Timestamp:  # type: ignore[no-untyped-def]
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _info(info: SecretInfo) -> secrets_pb2.SecretInfo:
    return secrets_pb2.SecretInfo(
        name=info.name,
        type=info.type,
        scope=secrets_pb2.SecretInfo.SCOPE_ENVIRONMENT if info.environment_id else secrets_pb2.SecretInfo.SCOPE_PROJECT,
        environment_id=info.environment_id,
        environment=info.environment_name,
        version=info.version,
        created_at=_ts(info.created_at),
        updated_at=_ts(info.updated_at),
        updated_by=info.updated_by,
        deleted=info.deleted,
    )


class EnvironmentDirectory:
    """Resolves project and environment references through the registry."""

    def __init__(self, registry_address: str, service_token: str) -> None:
        self._channel = channel(registry_address, "registry")
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._token = service_token

    async def environment(self, project_id: str, ref: str) -> tuple[str, str]:
        token = ""

        async def ask() -> registry_pb2.ListEnvironmentsResponse:
            return await self._stub.ListEnvironments(
                registry_pb2.ListEnvironmentsRequest(project=project_id, page_size=1000, page_token=token),
                metadata=credentials(self._token),
                timeout=DEFAULT_DEADLINE,
            )

        envs: list[common_pb2.Environment] = []
        while True:  # every page: a project may have more environments than one holds
            answer = await call_idempotent(ask)
            envs.extend(answer.environments)
            token = answer.next_page_token
            if not token:
                break
        for env in envs:
            if ref in (env.id, env.name):
                return env.id, env.name
        raise NotFound(
            f"environment {ref!r} not found", hint="known environments: " + ", ".join(sorted(e.name for e in envs)),
            resource_type="environment", resource_name=ref,
        )

    async def close(self) -> None:
        await self._channel.close()


def project_of(principal: Principal, ref: str) -> str:
    """The caller's own project; a reference to any other is refused."""
    if principal.admin:
        raise PermissionDenied(
            "the admin key only creates projects", hint="use the project's API key", reason="ADMIN_KEY_NOT_ALLOWED"
        )
    if not principal.project_id:
        raise InvalidArgument("project is required")
    if ref and ref not in (principal.project_id, principal.project_name):
        raise PermissionDenied(
            f"your API key belongs to project {principal.project_name!r}, not {ref!r}", hint="use that project's API key",
            reason="WRONG_PROJECT", metadata={"key_project": principal.project_name},
        )
    return principal.project_id


class SecretsServicer(secrets_pb2_grpc.SecretsServicer):
    def __init__(self, service: SecretsService, directory: EnvironmentDirectory) -> None:
        self._service = service
        self._directory = directory

    async def SetSecret(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        project_id = project_of(principal, request.project)
        validate_secret(request.name, request.type, request.value)  # bad input answers before any lookup
        env_id, env_name = ("", "")
        if request.environment:
            env_id, env_name = await self._directory.environment(project_id, request.environment)
        info = await asyncio.to_thread(
            lambda: self._service.set_secret(
                principal,
                project_id=project_id,
                environment_id=env_id,
                environment_name=env_name,
                name=request.name,
                type_=request.type,
                value=request.value,
            )
        )
        log.info("secret_set", extra={"project": project_id, "secret": info.name, "scope": info.scope, "version": info.version})
        return _info(info)

    async def _scope(self, project_id: str, environment: str) -> tuple[str, str]:
        if not environment:
            return "", ""
        return await self._directory.environment(project_id, environment)

    async def DeleteSecret(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        project_id = project_of(principal, request.project)
        env_id, env_name = await self._scope(project_id, request.environment)
        info = await asyncio.to_thread(
            lambda: self._service.delete_secret(
                principal, project_id=project_id, environment_id=env_id, environment_name=env_name, name=request.name
            )
        )
        log.info("secret_deleted", extra={"project": project_id, "secret": info.name, "scope": info.scope, "version": info.version})
        return secrets_pb2.DeleteSecretResponse(secret=_info(info))

    async def ListSecretVersions(self, request, context):  # type: ignore[no-untyped-def]
        project_id = project_of(caller(), request.project)
        env_id, env_name = await self._scope(project_id, request.environment)
        versions, token = await asyncio.to_thread(
            lambda: self._service.list_versions(
                project_id, env_id, env_name, request.name, page_size=request.page_size, page_token=request.page_token
            )
        )
        return secrets_pb2.ListSecretVersionsResponse(versions=[_info(v) for v in versions], next_page_token=token)

    async def RollbackSecret(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        project_id = project_of(principal, request.project)
        env_id, env_name = await self._scope(project_id, request.environment)
        info = await asyncio.to_thread(
            lambda: self._service.rollback_secret(
                principal, project_id=project_id, environment_id=env_id, environment_name=env_name,
                name=request.name, to_version=request.to_version,
            )
        )
        log.info(
            "secret_rolled_back",
            extra={"project": project_id, "secret": info.name, "scope": info.scope, "version": info.version,
                   "from_version": request.to_version},
        )
        return _info(info)

    async def RotateMasterKey(self, request, context):  # type: ignore[no-untyped-def]
        count, key_id = await asyncio.to_thread(self._service.rotate_master_key, caller())
        return secrets_pb2.RotateMasterKeyResponse(data_keys_rewrapped=count, key_fingerprint=key_id)

    async def ListSecrets(self, request, context):  # type: ignore[no-untyped-def]
        project_id = project_of(caller(), request.project)
        env_id = ""
        if request.environment:
            env_id, _ = await self._directory.environment(project_id, request.environment)
        infos, token = await asyncio.to_thread(
            lambda: self._service.list_secrets(
                project_id, env_id, page_size=request.page_size, page_token=request.page_token
            )
        )
        return secrets_pb2.ListSecretsResponse(secrets=[_info(i) for i in infos], next_page_token=token)


class SecretsInternalServicer(secrets_internal_pb2_grpc.SecretsInternalServicer):
    def __init__(self, service: SecretsService) -> None:
        self._service = service

    async def ResolveSecrets(self, request, context):  # type: ignore[no-untyped-def]
        resolved = await asyncio.to_thread(
            self._service.resolve, caller(), request.project_id, request.environment_id
        )
        return secrets_internal_pb2.ResolveSecretsResponse(
            secrets=[
                secrets_internal_pb2.ResolvedSecret(name=s.name, value=s.value, version=s.version, scope=s.scope)
                for s in resolved
            ]
        )


def add_to_server(server: grpc.aio.Server, service: SecretsService, directory: EnvironmentDirectory) -> None:
    """The public and the internal service, on one server."""
    secrets_pb2_grpc.add_SecretsServicer_to_server(SecretsServicer(service, directory), server)
    secrets_internal_pb2_grpc.add_SecretsInternalServicer_to_server(SecretsInternalServicer(service), server)
