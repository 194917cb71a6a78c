"""gRPC handlers of berth.v1.Registry and berth.internal.v1.RegistryInternal:
proto in, use case, proto out. Who may call which is the interceptor's rule
(services/common/server.py): the internal service takes the service token.

Blocking database work runs in worker threads so the event loop keeps
serving watch streams."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import caller
from services.registry import convert
from services.registry.changes import Change, ChangeHub
from services.registry.service import RegistryService

log = logging.getLogger("berth.registry")

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
INTERNAL_SERVICE_NAME = registry_internal_pb2.DESCRIPTOR.services_by_name["RegistryInternal"].full_name
SERVICE_NAMES = (SERVICE_NAME, INTERNAL_SERVICE_NAME)


def _expected(request) -> int | None:  # type: ignore[no-untyped-def]
    """``expected_sequence`` is optional: unset = no check, 0 = expect an
    empty history."""
    return request.expected_sequence if request.HasField("expected_sequence") else None


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, service: RegistryService) -> None:
        self._service = service

    async def CreateProject(self, request, context):  # type: ignore[no-untyped-def]
        project, api_key = await asyncio.to_thread(self._service.create_project, caller(), request.name)
        log.info("project_created", extra={"project": project.id, "project_name": project.name})
        return registry_pb2.CreateProjectResponse(project=project, api_key=api_key)

    async def GetProject(self, request, context):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._service.get_project, caller(), request.project)

    async def ListEnvironments(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        envs, token = await asyncio.to_thread(
            lambda: self._service.list_environments(
                principal, request.project, page_size=request.page_size, page_token=request.page_token
            )
        )
        return registry_pb2.ListEnvironmentsResponse(environments=envs, next_page_token=token)

    async def CreateEnvironment(self, request, context):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._service.create_environment, caller(), request.project, request.name)

    async def DeleteEnvironment(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        env = await asyncio.to_thread(
            self._service.delete_environment,
            principal,
            request.project,
            request.environment,
            force=request.force,
            confirm=request.confirm,
        )
        log.info(
            "environment_deleted",
            extra={"environment": env.id, "actor": principal.actor, "force": request.force},
        )
        return registry_pb2.DeleteEnvironmentResponse(environment=env)

    async def CreateApiKey(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        info, api_key = await asyncio.to_thread(self._service.create_api_key, principal, request.project, request.name)
        log.info("api_key_created", extra={"key": info.id, "key_name": info.name, "actor": principal.actor})
        return registry_pb2.CreateApiKeyResponse(key=info, api_key=api_key)

    async def ListApiKeys(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        keys, token = await asyncio.to_thread(
            lambda: self._service.list_api_keys(
                principal, request.project, page_size=request.page_size, page_token=request.page_token
            )
        )
        return registry_pb2.ListApiKeysResponse(keys=keys, next_page_token=token)

    async def RevokeApiKey(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        info = await asyncio.to_thread(self._service.revoke_api_key, principal, request.project, request.key)
        log.info("api_key_revoked", extra={"key": info.id, "key_name": info.name, "actor": principal.actor})
        return info

    async def ListBindings(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        bindings, token = await asyncio.to_thread(
            lambda: self._service.list_bindings(
                principal, request.project, request.deployment_id, request.environment,
                page_size=request.page_size, page_token=request.page_token,
            )
        )
        return registry_pb2.ListBindingsResponse(bindings=bindings, next_page_token=token)

    async def ScaleBinding(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        binding = await asyncio.to_thread(
            self._service.scale_binding, principal, request.project, request.deployment_id, request.environment,
            request.min_replicas, request.max_replicas,
        )
        log.info("binding_scaled", extra={"deployment": binding.deployment.id, "environment": binding.environment_id,
                                          "min": binding.min_replicas, "max": binding.max_replicas})
        return binding

    async def AdjustReplicas(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        binding = await asyncio.to_thread(
            self._service.adjust_replicas, principal, request.project, request.deployment_id, request.environment,
            request.delta,
        )
        log.info("binding_scaled", extra={"deployment": binding.deployment.id, "environment": binding.environment_id,
                                          "min": binding.min_replicas, "max": binding.max_replicas})
        return binding

    async def TerminateDeployment(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        dep = await asyncio.to_thread(self._service.terminate_deployment, principal, request.project, request.deployment_id)
        log.info("deployment_terminated", extra={"deployment": dep.id, "actor": principal.actor})
        return dep

    async def StartDeployment(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        dep = await asyncio.to_thread(self._service.start_deployment, principal, request.project, request.deployment_id)
        log.info("deployment_started", extra={"deployment": dep.id, "actor": principal.actor})
        return dep

    async def Deploy(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        deployment, move = await asyncio.to_thread(
            lambda: self._service.deploy(
                principal,
                project_ref=request.project,
                image=request.image,
                image_id=request.image_id,
                config=convert.config_from_proto(request.config),
                environment_ref=request.environment,
                min_replicas=request.min_replicas,
                max_replicas=request.max_replicas,
                expected_sequence=_expected(request),
                confirm=request.confirm,
                reason=request.reason,
            )
        )
        log.info("deployed", extra={"deployment": deployment.id, "environment": move.environment.id, "actor": principal.actor})
        return registry_pb2.DeployResponse(deployment=deployment, environment=move.environment, entry=move.entry)

    async def GetDeployment(self, request, context):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._service.get_deployment, caller(), request.project, request.deployment_id)

    async def ListDeployments(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        deps, token = await asyncio.to_thread(
            lambda: self._service.list_deployments(
                principal, request.project, request.environment,
                page_size=request.page_size, page_token=request.page_token,
            )
        )
        return registry_pb2.ListDeploymentsResponse(deployments=deps, next_page_token=token)

    async def Promote(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        move = await asyncio.to_thread(
            lambda: self._service.promote(
                principal,
                project_ref=request.project,
                deployment_id=request.deployment_id,
                target_environment_ref=request.target_environment,
                min_replicas=request.min_replicas,
                max_replicas=request.max_replicas,
                scale_previous_to_zero=request.scale_previous_to_zero,
                expected_sequence=_expected(request),
                confirm=request.confirm,
                reason=request.reason,
            )
        )
        log.info("promoted", extra={"deployment": move.deployment.id, "environment": move.environment.id, "sequence": move.entry.sequence})
        return registry_pb2.PointerMoveResponse(environment=move.environment, entry=move.entry)

    async def Rollback(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        move = await asyncio.to_thread(
            lambda: self._service.rollback(
                principal,
                project_ref=request.project,
                environment_ref=request.environment,
                to_deployment_id=request.to_deployment_id,
                expected_sequence=_expected(request),
                confirm=request.confirm,
                reason=request.reason,
            )
        )
        log.info("rolled_back", extra={"deployment": move.deployment.id, "environment": move.environment.id, "sequence": move.entry.sequence})
        return registry_pb2.PointerMoveResponse(environment=move.environment, entry=move.entry)

    async def ListHistory(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        entries, token = await asyncio.to_thread(
            lambda: self._service.list_history(
                principal, request.project, request.environment,
                page_size=request.page_size, page_token=request.page_token,
            )
        )
        return registry_pb2.ListHistoryResponse(entries=entries, next_page_token=token)


def _event(change: Change) -> registry_internal_pb2.WatchEvent:
    if change.kind == "environment":
        return registry_internal_pb2.WatchEvent(revision=change.revision, environment=change.payload)
    if change.kind == "binding":
        return registry_internal_pb2.WatchEvent(revision=change.revision, binding=change.payload)
    return registry_internal_pb2.WatchEvent(revision=change.revision, environment_deleted=change.payload)


class RegistryInternalServicer(registry_internal_pb2_grpc.RegistryInternalServicer):
    def __init__(self, service: RegistryService, hub: ChangeHub) -> None:
        self._service = service
        self._hub = hub

    async def Authenticate(self, request, context):  # type: ignore[no-untyped-def]
        principal = await asyncio.to_thread(self._service.authenticate, request.api_key)
        return registry_internal_pb2.Principal(
            project_id=principal.project_id,
            project_name=principal.project_name,
            key_name=principal.key_name,
            admin=principal.admin,
        )

    async def ResolveImage(self, request, context):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._service.resolve_image, caller(), request.deployment_id, request.image_id)

    async def Watch(self, request, context) -> AsyncIterator[registry_internal_pb2.WatchEvent]:  # type: ignore[no-untyped-def,override]
        """A snapshot (or, with ``since_revision``, the changes after it when
        this process still holds them), the ``snapshot_complete`` marker
        (``resumed`` tells which of the two came before it), then every later
        change once, in revision order."""
        subscription = self._hub.subscribe()  # before the snapshot: nothing falls in between
        try:
            _, queue = subscription
            replay = self._hub.since(request.since_revision) if request.since_revision > 0 else None
            if replay is not None:
                revision = request.since_revision
                for change in replay:
                    revision = max(revision, change.revision)
                    yield _event(change)
                yield registry_internal_pb2.WatchEvent(revision=revision, snapshot_complete=True, resumed=True)
            else:
                revision, snapshot = await asyncio.to_thread(self._service.snapshot)
                for change in snapshot:
                    yield _event(change)
                yield registry_internal_pb2.WatchEvent(revision=revision, snapshot_complete=True)
            while True:
                change = await queue.get()
                if change.revision <= revision:
                    continue  # already in the snapshot or the replay
                yield _event(change)
        finally:
            self._hub.unsubscribe(subscription)


def add_to_server(server: grpc.aio.Server, service: RegistryService, hub: ChangeHub) -> None:
    """The public and the internal service, on one server."""
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(service), server)
    registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(RegistryInternalServicer(service, hub), server)
