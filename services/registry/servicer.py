"""gRPC handlers of berth.v1.Registry and berth.internal.v1.RegistryInternal:
proto in, use case, proto out. Who may call which is the interceptor's rule
(services/common/server.py): the internal service takes the service token.

Blocking database work runs in worker threads so the event loop keeps
serving watch streams."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from berth import enums
from berth.errors import InvalidArgument
from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import API_KEY_METADATA, Principal, caller
from services.registry import canary as canaries
from services.registry import changes as feed
from services.registry import convert, domain
from services.registry.changes import Change, ChangeHub, ChangeLog
from services.registry.service import RegistryService

log = logging.getLogger("berth.registry")

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
INTERNAL_SERVICE_NAME = registry_internal_pb2.DESCRIPTOR.services_by_name["RegistryInternal"].full_name
SERVICE_NAMES = (SERVICE_NAME, INTERNAL_SERVICE_NAME)


def _expected(request) -> int | None:  # type: ignore[no-untyped-def]
    """``expected_sequence`` is optional: unset = no check, 0 = expect an
    empty history."""
    return request.expected_sequence if request.HasField("expected_sequence") else None


def _bound(request, name: str) -> int | None:  # type: ignore[no-untyped-def]
    """``min_replicas``/``max_replicas`` are optional: unset = the method's
    documented default, 0 = 0."""
    return getattr(request, name) if request.HasField(name) else None


def _idle(request) -> domain.IdleWindows:  # type: ignore[no-untyped-def]
    """``idle_pause_seconds``/``idle_stop_seconds`` are optional: unset =
    unchanged, 0 = the scheduler's default."""
    return domain.IdleWindows(_bound(request, "idle_pause_seconds"), _bound(request, "idle_stop_seconds"))


# A WatchEnvironments stream re-checks its key this often even when no
# revocation came through the feed (a safety net; revocations end streams at
# once).
KEY_RECHECK_SECONDS = 30.0


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, service: RegistryService, stream: ChangeStream) -> None:
        self._service = service
        self._stream = stream

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
            _bound(request, "min_replicas"), _bound(request, "max_replicas"), _idle(request),
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
                min_replicas=_bound(request, "min_replicas"),
                max_replicas=_bound(request, "max_replicas"),
                expected_sequence=_expected(request),
                confirm=request.confirm,
                reason=request.reason,
                idle=_idle(request),
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
                min_replicas=_bound(request, "min_replicas"),
                max_replicas=_bound(request, "max_replicas"),
                scale_previous_to_zero=request.scale_previous_to_zero,
                expected_sequence=_expected(request),
                confirm=request.confirm,
                reason=request.reason,
                skip_gate=request.skip_gate,
                idle=_idle(request),
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

    # ---- canaries ----

    async def StartCanary(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        t = request.thresholds
        env, entry = await asyncio.to_thread(
            lambda: self._service.start_canary(
                principal, project_ref=request.project, deployment_id=request.deployment_id,
                environment_ref=request.environment,
                steps=[(s.weight, s.bake_seconds) for s in request.steps],
                thresholds=canaries.Thresholds(t.max_error_rate_increase, t.max_latency_ratio, t.min_requests),
                min_replicas=_bound(request, "min_replicas"), max_replicas=_bound(request, "max_replicas"),
                expected_sequence=_expected(request), confirm=request.confirm, reason=request.reason,
                skip_gate=request.skip_gate,
            )
        )
        log.info("canary_started", extra={"environment": env.id, "sequence": entry.sequence})
        return registry_pb2.CanaryResponse(environment=env, entry=entry)

    async def GetCanary(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        env = await asyncio.to_thread(
            lambda: self._service.get_canary(principal, request.project, request.environment)
        )
        return registry_pb2.CanaryResponse(environment=env)

    async def _canary_action(self, request, action: str):  # type: ignore[no-untyped-def]
        principal = caller()
        env, entry = await asyncio.to_thread(
            lambda: self._service.canary_action(
                principal, project_ref=request.project, environment_ref=request.environment, action=action,
                expected_sequence=_expected(request), reason=request.reason, confirm=getattr(request, "confirm", False),
            )
        )
        log.info("canary_" + action, extra={"environment": env.id, "sequence": entry.sequence})
        return registry_pb2.CanaryResponse(environment=env, entry=entry)

    async def PauseCanary(self, request, context):  # type: ignore[no-untyped-def]
        return await self._canary_action(request, "pause")

    async def ResumeCanary(self, request, context):  # type: ignore[no-untyped-def]
        return await self._canary_action(request, "resume")

    async def AbortCanary(self, request, context):  # type: ignore[no-untyped-def]
        return await self._canary_action(request, "abort")

    async def PromoteCanaryNow(self, request, context):  # type: ignore[no-untyped-def]
        return await self._canary_action(request, "promote")

    async def ListHistory(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        entries, token = await asyncio.to_thread(
            lambda: self._service.list_history(
                principal, request.project, request.environment,
                page_size=request.page_size, page_token=request.page_token,
            )
        )
        return registry_pb2.ListHistoryResponse(entries=entries, next_page_token=token)

    async def RecordExperimentRun(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        cases = [
            domain.CaseResult(name=c.name, passed=c.passed, status=c.status, latency_ms=c.latency_ms, reason=c.reason)
            for c in request.cases
        ]
        run = await asyncio.to_thread(
            lambda: self._service.record_experiment_run(
                principal, request.project, name=request.name, deployment_id=request.deployment_id,
                dataset_digest=request.dataset_digest, cases=cases,
            )
        )
        log.info("experiment_run_recorded", extra={"run": run.id, "deployment": run.deployment_id,
                                                   "experiment": run.name, "pass_rate": run.pass_rate})
        return run

    async def ListExperimentRuns(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        runs, token = await asyncio.to_thread(
            lambda: self._service.list_experiment_runs(
                principal, request.project, request.deployment_id, request.name,
                page_size=request.page_size, page_token=request.page_token,
            )
        )
        return registry_pb2.ListExperimentRunsResponse(runs=runs, next_page_token=token)

    async def GetExperimentRun(self, request, context):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self._service.get_experiment_run, caller(), request.project, request.run_id)

    async def SetEnvironmentGate(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        gate = await asyncio.to_thread(
            lambda: self._service.set_environment_gate(
                principal, request.project, request.environment, experiment=request.experiment,
                threshold=request.threshold, dataset_digest=request.dataset_digest,
            )
        )
        log.info("gate_set", extra={"environment": gate.environment_id, "experiment": gate.experiment,
                                    "threshold": gate.threshold, "actor": principal.actor})
        return gate

    async def ClearEnvironmentGate(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        cleared = await asyncio.to_thread(
            self._service.clear_environment_gate, principal, request.project, request.environment
        )
        log.info("gate_cleared", extra={"environment": request.environment, "cleared": cleared,
                                        "actor": principal.actor})
        return registry_pb2.ClearEnvironmentGateResponse(cleared=cleared)

    async def ListEnvironmentGates(self, request, context):  # type: ignore[no-untyped-def]
        gates = await asyncio.to_thread(self._service.list_environment_gates, caller(), request.project)
        return registry_pb2.ListEnvironmentGatesResponse(gates=gates)


    async def WatchEnvironments(self, request, context) -> AsyncIterator[registry_pb2.EnvironmentEvent]:  # type: ignore[no-untyped-def,override]
        """One project's changes: a snapshot (or, with ``since_revision``, the
        changes after it), the ``snapshot_complete`` marker, then each change
        as it commits, filtered here. A revoked key ends the stream with
        UNAUTHENTICATED."""
        principal = caller()
        api_key = dict(context.invocation_metadata() or ()).get(API_KEY_METADATA, "")
        since = request.since_revision
        if since < 0:
            raise InvalidArgument(
                f"since_revision must be 0 (start with a snapshot) or a revision a watch event carried, not {since}",
                field="since_revision", reason="INVALID_REVISION",
            )
        project_id, _ = await asyncio.to_thread(self._service.watch_project, principal, request.project)
        if since > 0:
            current = await asyncio.to_thread(self._service.current_revision)
            if since > current:
                raise InvalidArgument(
                    f"since_revision {since} is newer than any revision this registry has issued ({current}); "
                    "it comes from another database: watch from 0 for a snapshot",
                    field="since_revision", reason="INVALID_REVISION", metadata={"current_revision": str(current)},
                )
        async with self._stream.open(since, project_id) as (opening, resumed, revision, live):
            for change in opening:
                event = _public_event(change, snapshot=not resumed)
                if event is not None:
                    yield event
            yield registry_pb2.EnvironmentEvent(revision=revision, snapshot_complete=True, resumed=resumed)
            while True:
                try:
                    async with asyncio.timeout(KEY_RECHECK_SECONDS):
                        change = await live.get()
                except TimeoutError:
                    await self._recheck(principal, api_key)
                    continue
                if change.project_id != project_id or change.revision <= revision:
                    continue
                if change.kind == feed.KEY_REVOKED:
                    await self._recheck(principal, api_key)
                    continue
                event = _public_event(change, snapshot=False)
                if event is not None:
                    yield event

    async def _recheck(self, principal: Principal, api_key: str) -> None:
        """Raises Unauthenticated once a project key is revoked."""
        if not (principal.admin or principal.service):
            await asyncio.to_thread(self._service.authenticate, api_key)


def _public_event(change: Change, *, snapshot: bool) -> registry_pb2.EnvironmentEvent | None:
    event = registry_pb2.EnvironmentEvent(revision=change.revision)
    if change.kind == feed.ENVIRONMENT:
        if snapshot:
            event.environment.CopyFrom(change.payload)
        elif change.action == feed.MOVED:
            event.moved.environment.CopyFrom(change.payload)
            event.moved.entry.CopyFrom(change.detail)
        else:
            event.created.CopyFrom(change.payload)
    elif change.kind == feed.BINDING:
        event.binding.CopyFrom(change.payload)
    elif change.kind == feed.ENVIRONMENT_DELETED:
        event.deleted.CopyFrom(change.detail)
    else:
        return None
    return event


def _internal_event(change: Change) -> registry_internal_pb2.WatchEvent | None:
    if change.kind == feed.ENVIRONMENT:
        return registry_internal_pb2.WatchEvent(revision=change.revision, environment=change.payload)
    if change.kind == feed.BINDING:
        return registry_internal_pb2.WatchEvent(revision=change.revision, binding=change.payload)
    if change.kind == feed.ENVIRONMENT_DELETED:
        return registry_internal_pb2.WatchEvent(revision=change.revision, environment_deleted=change.payload)
    return None  # key revocations are for WatchEnvironments only


class ChangeStream:
    """Opens a watch: subscribes to the hub, then reads what comes before
    the live changes — the changes after ``since`` from the ``changes``
    table, or a snapshot."""

    def __init__(self, service: RegistryService, hub: ChangeHub, log_: ChangeLog) -> None:
        self._service = service
        self._hub = hub
        self._log = log_

    @contextlib.asynccontextmanager
    async def open(
        self, since: int, project_id: str | None = None
    ) -> AsyncIterator[tuple[list[Change], bool, int, asyncio.Queue[Change]]]:
        """Yields (opening changes, resumed, the revision they cover, the
        live queue). Skip live changes at or below that revision: they are
        in the opening already."""
        subscription = self._hub.subscribe()  # before the read: nothing falls in between
        try:
            # From the table, not this process's memory: it holds what any
            # process committed before this read, even what the tailer has
            # not published here yet (a watch opened after a write returned
            # sees that write before its marker).
            replay = None
            if since > 0:
                replay = await asyncio.to_thread(lambda: self._log.replay(since, project_id=project_id))
            if replay is not None:
                revision = max([since, *(c.revision for c in replay)])
                yield replay, True, revision, subscription[1]
            else:
                revision, snapshot = await asyncio.to_thread(self._service.snapshot, project_id)
                yield snapshot, False, revision, subscription[1]
        finally:
            self._hub.unsubscribe(subscription)


class RegistryInternalServicer(registry_internal_pb2_grpc.RegistryInternalServicer):
    def __init__(self, service: RegistryService, stream: ChangeStream) -> None:
        self._service = service
        self._stream = stream

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

    async def AdvanceCanary(self, request, context):  # type: ignore[no-untyped-def]
        principal = caller()
        action = enums.label(registry_internal_pb2.AdvanceCanaryRequest.Action, request.action)
        env, entry = await asyncio.to_thread(
            lambda: self._service.advance_canary(
                principal, project_id=request.project, environment_id=request.environment,
                expected_sequence=request.expected_sequence, step=request.step, action=action,
                analysis=request.analysis,
            )
        )
        if entry is not None:
            log.info("canary_advanced", extra={"environment": env.id, "sequence": entry.sequence, "action": action})
            return registry_pb2.CanaryResponse(environment=env, entry=entry)
        return registry_pb2.CanaryResponse(environment=env)

    async def Watch(self, request, context) -> AsyncIterator[registry_internal_pb2.WatchEvent]:  # type: ignore[no-untyped-def,override]
        """A snapshot (or, with ``since_revision``, the changes after it while
        the feed still holds them), the ``snapshot_complete`` marker
        (``resumed`` tells which of the two came before it), then every later
        change once, in revision order, whichever registry process committed
        it."""
        async with self._stream.open(request.since_revision) as (opening, resumed, revision, live):
            for change in opening:
                event = _internal_event(change)
                if event is not None:
                    yield event
            yield registry_internal_pb2.WatchEvent(revision=revision, snapshot_complete=True, resumed=resumed)
            while True:
                change = await live.get()
                if change.revision <= revision:
                    continue  # already in the snapshot or the replay
                event = _internal_event(change)
                if event is not None:
                    yield event


def add_to_server(server: grpc.aio.Server, service: RegistryService, hub: ChangeHub, log_: ChangeLog) -> None:
    """The public and the internal service, on one server."""
    stream = ChangeStream(service, hub, log_)
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(service, stream), server)
    registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(RegistryInternalServicer(service, stream), server)
