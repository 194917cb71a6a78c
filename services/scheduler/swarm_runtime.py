"""The ``swarm`` runtime: each binding is one Swarm service on a Docker
Swarm cluster, driven through a manager (``DOCKER_HOST``).

Two loops, both level-triggered:

- the *pass* (on a desired-state change, an activation, a load change, and
  every ``reconcile_interval``): lists this instance's services by label,
  decides each binding's replica count (the shared autoscaler, keep-warm),
  resolves each wanted binding's spec (image by digest, secrets), asks
  ``swarm_plan.plan`` what to create / update / scale / remove and carries
  it out. Swarm places, restarts and reschedules the tasks.
- the *watch* (every ``watch_interval``): lists the services' tasks and the
  nodes, probes every running task's health path at its node's address and
  the port Swarm published for it, publishes the ready ones to the routers,
  and folds what Swarm reports into events: a task rejected with ``No such
  image`` is an ``image_pull_error`` carrying the registry's own reason (the
  scheduler asks the registry for the manifest), a task pending on ``no
  suitable node`` a ``scheduling_failure`` with Swarm's message, a node that
  went down a ``node_down`` listing the replicas it took, a slot whose tasks
  keep failing a ``crash_loop``.

A task leaves the endpoint set as soon as a probe fails or its node is not
``ready`` — health checking, not only Swarm's view, which needs a few
heartbeats to call a node down. In memory there is only what Swarm cannot
tell: readiness, the failures already recorded, the load signal.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import docker
import docker.errors
import requests.exceptions

from berth import errors, images
from berth.v1 import common_pb2

from . import docker_adapter as da
from . import spec as specs
from . import swarm_plan
from .desired import DesiredTable, binding_key, is_terminated
from .events import EventKind, EventStore, redact
from .lease import Leadership, LeaseLost, epoch_of
from .plan import BindingKey
from .probes import probe_http
from .reconciler import SecretsResolver
from .runtime import (
    BindingState,
    BindingView,
    EndpointSet,
    ReplicaState,
    ReplicaView,
    ScalingRuntime,
    SchedulerConfig,
    binding_state,
)
from .swarm_adapter import (
    API_VERSION,
    SERVICE_LABEL,
    NodeInfo,
    NotAManager,
    ServiceDefinition,
    ServiceInfo,
    SwarmAdapter,
    TaskInfo,
)

log = logging.getLogger("berth.scheduler.swarm")

NO_SUCH_IMAGE = "No such image"
NO_SUITABLE_NODE = "no suitable node"
PENDING_STATES = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready"})
FAILED_STATES = frozenset({"failed", "rejected", "orphaned"})
ENDED_STATES = frozenset({"complete", "shutdown", "remove"}) | FAILED_STATES


@dataclass(frozen=True)
class SwarmConfig:
    watch_interval: float = 0.5  # tasks, nodes and probes
    probe_timeout: float = 0.8
    restart_delay: float = 0.0  # Swarm's restart delay: replacements start at once
    update_monitor: float = 1.0
    reason_ttl: float = 5.0  # how long a registry's answer about a reference is reused
    insecure_registries: tuple[str, ...] = ()  # HOST:PORT spoken to over HTTP


@dataclass
class _Readiness:
    ready: bool = False
    ever_ready: bool = False
    failures: int = 0
    reported: bool = False  # health_check_failed recorded for this streak


@dataclass(frozen=True)
class _Problem:
    kind: EventKind
    message: str


def service_name(instance: str, environment_id: str, deployment_id: str) -> str:
    """A DNS-label-safe, deterministic name: one service per binding (Swarm
    refuses a second of the same name, so two passes never duplicate it)."""
    return f"berth-{instance}-{environment_id}-{deployment_id}".replace("_", "-").lower()[:63]


def _key_of(labels: Mapping[str, str]) -> BindingKey:
    return (labels.get(da.ENVIRONMENT_LABEL, ""), labels.get(da.DEPLOYMENT_LABEL, ""))


def _owned(s: ServiceInfo) -> bool:
    return bool(s.labels.get(da.ENVIRONMENT_LABEL) and s.labels.get(da.DEPLOYMENT_LABEL))


def task_state(t: TaskInfo, *, ready: bool, ever_ready: bool, node_up: bool) -> ReplicaState:
    """Swarm's task state as one of Berth's replica states (pure)."""
    if t.state in PENDING_STATES:
        return ReplicaState.PENDING
    if t.state == "starting":
        return ReplicaState.STARTING
    if t.state == "running":
        if t.desired_state not in ("running", "ready", "accepted"):
            return ReplicaState.STOPPING  # Swarm is stopping it (replaced, scaled away)
        if ready and node_up:
            return ReplicaState.READY
        return ReplicaState.UNHEALTHY if ever_ready or not node_up else ReplicaState.STARTING
    if t.state in FAILED_STATES:
        return ReplicaState.FAILED
    return ReplicaState.EXITED


def current_tasks(tasks: Sequence[TaskInfo], node_up: Callable[[str], bool] = lambda _: True) -> list[TaskInfo]:
    """What ``status`` shows: the tasks Swarm wants running, and those it is
    stopping that still run (replaced or scaled away) on a node that is up;
    not the history, nor what a down node last reported."""
    return [
        t for t in tasks
        if t.desired_state in ("running", "ready", "accepted")
        or (t.state in ("running", "starting") and node_up(t.node_id))
    ]


def restarts_in_slot(tasks: Sequence[TaskInfo], t: TaskInfo) -> int:
    """Earlier tasks of the same slot that Swarm keeps in its history."""
    return sum(
        1 for o in tasks
        if o.service_id == t.service_id and o.slot == t.slot and o.id != t.id
        and (o.created_at or datetime.min.astimezone()) < (t.created_at or datetime.max.astimezone())
    )


class SwarmRuntime(ScalingRuntime):
    def __init__(
        self,
        adapter: SwarmAdapter,
        table: DesiredTable,
        secrets: SecretsResolver,
        events: EventStore,
        config: SchedulerConfig,
        swarm: SwarmConfig | None = None,
        *,
        fence: Leadership | None = None,
    ) -> None:
        super().__init__(table, config)
        self._adapter = adapter
        self._fence = fence  # the lease (lease.py); None: the only scheduler
        self._secrets = secrets
        self._events = events
        self.swarm = swarm or SwarmConfig()
        self._pass_lock = asyncio.Lock()
        self._services: list[ServiceInfo] = []
        self._tasks: list[TaskInfo] = []
        self._nodes: dict[str, NodeInfo] = {}
        self._readiness: dict[str, _Readiness] = {}
        self._problems: dict[BindingKey, _Problem] = {}
        self._statuses: dict[BindingKey, BindingState] = {}
        self._secret_values: dict[BindingKey, frozenset[str]] = {}
        self._noted: set[tuple[str, str]] = set()  # (task id, what) already recorded
        self._down_nodes: set[str] = set()
        self._last_on_node: dict[str, list[TaskInfo]] = {}  # node id -> its live tasks, as last seen
        self._reasons: dict[str, tuple[float, str | None]] = {}
        self._reason_tasks: dict[str, asyncio.Task[None]] = {}
        self._engine_down = ""
        table.on_change(self.wake)

    # -- loops ----------------------------------------------------------------
    async def run(self) -> None:
        """Passes and the watch until cancelled."""
        watch = asyncio.create_task(self._watch_loop(), name="swarm-watch")
        try:
            await self._reconcile_forever()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.observe()
            except asyncio.CancelledError:
                raise
            except da.EngineError as exc:
                log.warning("swarm_watch_failed", extra={"error": exc.message})
            except Exception:
                log.exception("swarm_watch_crashed")
            await asyncio.sleep(max(0.05, self.swarm.watch_interval - (time.monotonic() - started)))

    async def close(self) -> None:
        """Stops the registry look-ups. Services keep running: a restarted
        scheduler adopts them."""
        self.endpoints.close()
        tasks = list(self._reason_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def _slots(self) -> dict[BindingKey, int]:
        slots: dict[BindingKey, int] = {}
        for s in self._services:
            key = _key_of(s.labels)
            slots[key] = max(slots.get(key, 0), s.replicas)
        return slots

    # -- one pass -------------------------------------------------------------
    async def reconcile_once(self) -> swarm_plan.SwarmPlan:
        async with self._pass_lock:
            if self._fence is not None:
                self._fence.ensure_leading()
            services = [s for s in await self._adapter.list_services(self.config.instance) if _owned(s)]
            if self._fence is not None:
                self._check_epochs(services, self._fence)
            if self._engine_down:
                log.info("engine_reachable_again")
                self._engine_down = ""
            self._services = services
            slots = self._slots
            self._desired = {
                binding_key(b): self._decide(b, slots.get(binding_key(b), 0)) for b in self._table.bindings()
            }
            resolved = await self._resolve_specs()
            desired = [
                swarm_plan.DesiredService(
                    key=key, replicas=count, spec_hash=resolved[key].spec_hash if key in resolved else None
                )
                for key, count in self._desired.items()
            ]
            observed = [
                swarm_plan.ObservedService(
                    service_id=s.id, name=s.name, key=_key_of(s.labels),
                    spec_hash=s.labels.get(da.SPEC_HASH_LABEL, ""), replicas=s.replicas,
                )
                for s in services
            ]
            result = swarm_plan.plan(desired, observed, snapshot_complete=self._table.snapshot_complete)
            if not result.empty:
                log.info(
                    "swarm_plan",
                    extra={
                        "creates": [f"{c.key[1]}/{c.key[0]} x{c.replicas}" for c in result.creates],
                        "updates": [f"{u.key[1]}/{u.key[0]} x{u.replicas}" for u in result.updates],
                        "scales": [f"{s.key[1]}/{s.key[0]} {s.previous}->{s.replicas}" for s in result.scales],
                        "removes": [f"{r.name} ({r.reason.value})" for r in result.removes],
                    },
                )
            await self._execute(result, resolved)
            self._publish_endpoints()
            return result

    @staticmethod
    def _check_epochs(services: Sequence[ServiceInfo], fence: Leadership) -> None:
        """A service written in a higher epoch than ours means another
        scheduler acquired the lease since: never touch its work; stand down."""
        newer = max((epoch_of(s.labels) for s in services), default=0)
        if newer > fence.epoch:
            reason = f"a service of epoch {newer} exists; this scheduler's epoch is {fence.epoch}"
            fence.depose(reason)
            raise LeaseLost(f"another scheduler leads: {reason}")
        fence.ensure_leading()

    async def _execute(self, p: swarm_plan.SwarmPlan, resolved: Mapping[BindingKey, specs.ResolvedSpec]) -> None:
        async def create(c: swarm_plan.CreateService) -> None:
            spec = resolved[c.key]
            try:
                service_id = await self._adapter.create(self._definition(spec, c.replicas))
            except da.NameConflict:
                log.info("service_name_conflict", extra={"deployment_id": c.key[1]})  # someone made it: re-read
                self.wake()
                return
            except da.StartFailed as exc:
                self._fail(spec.binding, EventKind.SCHEDULING_FAILURE, exc.message)
                return
            log.info("service_created", extra={"service": service_id[:12], "replicas": c.replicas,
                                               "deployment_id": c.key[1], "environment_id": c.key[0]})

        async def update(u: swarm_plan.UpdateService) -> None:
            spec = resolved[u.key]
            await self._adapter.update(u.service_id, self._definition(spec, u.replicas))
            log.info("service_updated", extra={"service": u.service_id[:12], "replicas": u.replicas})

        async def scale(s: swarm_plan.ScaleService) -> None:
            await self._adapter.scale(s.service_id, s.replicas)
            log.info("service_scaled", extra={"service": s.service_id[:12], "from": s.previous, "to": s.replicas})

        async def remove(r: swarm_plan.RemoveService) -> None:
            await self._adapter.remove(r.service_id)
            log.info("service_removed", extra={"service": r.name, "reason": r.reason.value})

        steps = [
            *(create(c) for c in p.creates if c.key in resolved),
            *(update(u) for u in p.updates if u.key in resolved),
            *(scale(s) for s in p.scales),
            *(remove(r) for r in p.removes),
        ]
        results = await asyncio.gather(*steps, return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, da.EngineUnavailable):
                raise outcome
            if isinstance(outcome, da.EngineError):
                # A lost version race (another update came first) or a vanished
                # service: the next pass re-reads and converges.
                log.warning("swarm_step_failed", extra={"error": outcome.message})
                self.wake()
            elif isinstance(outcome, BaseException):
                raise outcome

    def _definition(self, spec: specs.ResolvedSpec, replicas: int) -> ServiceDefinition:
        b = spec.binding
        resources = b.deployment.config.resources
        name = service_name(self.config.instance, b.environment_id, b.deployment.id)
        labels = {
            da.MANAGED_LABEL: "true",
            da.INSTANCE_LABEL: self.config.instance,
            da.PROJECT_LABEL: b.project_id,
            da.ENVIRONMENT_LABEL: b.environment_id,
            da.DEPLOYMENT_LABEL: b.deployment.id,
            da.SPEC_HASH_LABEL: spec.spec_hash,
            specs.PORT_LABEL: str(spec.port),
            specs.HEALTH_PATH_LABEL: spec.health_path,
        }
        return ServiceDefinition(
            name=name,
            image=spec.image_id,
            labels=labels,
            container_labels={**labels, SERVICE_LABEL: name},
            environment=spec.environment,
            command=tuple(b.deployment.config.command),
            port=spec.port,
            replicas=replicas,
            mem_limit=int(resources.memory_bytes),
            nano_cpus=int(resources.cpus * 1e9) if resources.cpus > 0 else 0,
            stop_grace=self.config.stop_grace,
            restart_delay=self.swarm.restart_delay,
            update_monitor=self.swarm.update_monitor,
        )

    # -- specs ----------------------------------------------------------------
    async def _resolve_specs(self) -> dict[BindingKey, specs.ResolvedSpec]:
        wanted = [b for b in self._table.bindings() if self._desired.get(binding_key(b), 0) > 0]
        secrets_by_env: dict[tuple[str, str], Sequence[specs.SecretValue] | None] = {}
        resolved: dict[BindingKey, specs.ResolvedSpec] = {}
        for b in wanted:
            key = binding_key(b)
            invalid = specs.invalid_config(b.deployment.config, None)
            if invalid is not None:
                self._fail_once(b, EventKind.SCHEDULING_FAILURE, invalid)
                continue
            image = self._image_for(b)
            if image is None:
                continue
            env_key = (b.project_id, b.environment_id)
            if env_key not in secrets_by_env:
                try:
                    secrets_by_env[env_key] = await self._secrets.resolve(b.project_id, b.environment_id)
                except errors.BerthError as exc:
                    log.warning("secrets_unavailable",
                                extra={"environment_id": b.environment_id, "error": type(exc).__name__})
                    secrets_by_env[env_key] = None
            values = secrets_by_env[env_key]
            if values is None:
                continue
            resolved[key] = specs.resolve(b, image, values)
            self._secret_values[key] = self._secret_values.get(key, frozenset()) | {s.value for s in values}
        in_table = {binding_key(b) for b in self._table.bindings()}
        for key in [k for k in self._secret_values if k not in in_table]:
            del self._secret_values[key]
        return resolved

    def _image_for(self, b: common_pb2.Binding) -> str | None:
        """The reference every node runs: the deployment's image by digest.
        A tag could name another image on each node (and later), so it is
        refused: deployments reach a cluster through an image registry."""
        ref = b.deployment.image
        try:
            by_digest = images.parse(ref).by_digest
        except ValueError as exc:
            self._fail_once(b, EventKind.IMAGE_PULL_ERROR, str(exc))
            return None
        if not by_digest:
            self._fail_once(
                b, EventKind.IMAGE_PULL_ERROR,
                f"image {ref!r} is not a reference by digest: the swarm runtime runs only repo@sha256:... "
                "so every node runs the same image; deploy through the image registry "
                "(berth up --image-registry HOST:PORT; berth deploy pushes and records the digest)",
            )
            return None
        return ref

    # -- watch: tasks, nodes, probes, failures --------------------------------
    async def observe(self) -> None:
        """One watch round: re-read services, tasks and nodes; probe; fold
        failures into events; publish the endpoints."""
        services = [s for s in await self._adapter.list_services(self.config.instance) if _owned(s)]
        tasks, nodes = await asyncio.gather(
            self._adapter.list_tasks([s.id for s in services]), self._adapter.list_nodes()
        )
        self._services = services
        self._tasks = tasks
        self._nodes = {n.id: n for n in nodes}
        by_service = {s.id: s for s in services}
        await self._probe(tasks, by_service)
        live = {t.id for t in tasks}
        for gone in [tid for tid in self._readiness if tid not in live]:
            del self._readiness[gone]
        self._note_nodes(tasks, by_service)
        self._note_tasks(tasks, by_service)
        self._clear_recovered(tasks, by_service)
        self._publish_endpoints()
        self.endpoints.mark_complete()  # services, tasks, nodes read and probed

    def _node_up(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        return node is not None and node.state == "ready"

    def _address(self, t: TaskInfo, s: ServiceInfo | None) -> str:
        if s is None:
            return ""
        port = int(s.labels.get(specs.PORT_LABEL) or specs.DEFAULT_PORT)
        published = t.host_ports.get(port)
        node = self._nodes.get(t.node_id)
        if not published or node is None or not node.address:
            return ""
        return f"{node.address}:{published}"

    async def _probe(self, tasks: Sequence[TaskInfo], by_service: Mapping[str, ServiceInfo]) -> None:
        running = [
            t for t in tasks
            if t.state == "running" and t.desired_state == "running" and self._node_up(t.node_id)
            and self._address(t, by_service.get(t.service_id))
        ]

        async def one(t: TaskInfo) -> tuple[bool, str]:
            s = by_service[t.service_id]
            host, _, port = self._address(t, s).rpartition(":")
            result = await probe_http(host, int(port), s.labels.get(specs.HEALTH_PATH_LABEL) or "/",
                                      timeout=self.swarm.probe_timeout)
            return result.ok, result.message

        results = await asyncio.gather(*(one(t) for t in running))
        probed = set()
        sick: dict[str, list[_Readiness]] = {}  # services with a task that just crossed unhealthy_after
        for t, (ok, message) in zip(running, results, strict=True):
            probed.add(t.id)
            state = self._readiness.setdefault(t.id, _Readiness())
            state.ready = ok
            if ok:
                state.ever_ready = True
                state.failures = 0
                state.reported = False
                continue
            if not state.ever_ready:
                continue
            state.failures += 1
            if state.failures >= self.config.unhealthy_after and not state.reported:
                state.reported = True
                self._record_task(
                    t, by_service.get(t.service_id), EventKind.HEALTH_CHECK_FAILED,
                    f"replica {t.slot} (task {t.id[:12]}) failed {state.failures} health checks in a row: "
                    f"{message}; replacing it",
                )
                sick.setdefault(t.service_id, []).append(state)
        for service_id, states in sick.items():
            if not await self._replace_unhealthy(service_id):
                for state in states:  # not replaced: tried again on the next failed check
                    state.reported = False
        for t in tasks:
            if t.id not in probed and t.id in self._readiness:
                self._readiness[t.id].ready = False

    async def _replace_unhealthy(self, service_id: str) -> bool:
        """Replaces a task that runs but fails its health checks (it already
        left the routers' set). Swarm restarts only tasks that exit, its API
        has no per-task restart, and the scheduler speaks only to a manager
        (a node's own engine is not reachable in general); a container
        HEALTHCHECK would need a probe program inside the image (none in a
        ``FROM scratch`` one). So: a forced update of that one service
        (fenced), rolled start-first one task at a time — no request fails,
        at the cost of also renewing its healthy siblings. A standby (not
        leading) leaves it to the leader. False when the write failed (tried
        again on the next failed check)."""
        try:
            await self._adapter.force_update(service_id)
        except LeaseLost:
            return True  # not leading: the leader's own checks replace it
        except da.EngineError as exc:
            log.warning("unhealthy_replace_failed", extra={"service": service_id[:12], "error": exc.message})
            return False
        log.info("unhealthy_replaced", extra={"service": service_id[:12]})
        return True

    def _note_nodes(self, tasks: Sequence[TaskInfo], by_service: Mapping[str, ServiceInfo]) -> None:
        """A node that left ``ready`` is a ``node_down`` event for every
        binding it ran replicas of (once per outage), listing them."""
        for node_id, node in self._nodes.items():
            if node.state == "ready":
                self._down_nodes.discard(node_id)
                self._last_on_node[node_id] = [
                    t for t in tasks if t.node_id == node_id and t.desired_state == "running"
                    and t.state not in ENDED_STATES
                ]
                continue
            if node_id in self._down_nodes:
                continue
            self._down_nodes.add(node_id)
            took = self._last_on_node.get(node_id) or [
                t for t in tasks if t.node_id == node_id and t.state == "running"
            ]
            log.warning("node_down", extra={"node": node.hostname, "state": node.state, "replicas": len(took)})
            per_service: dict[str, list[TaskInfo]] = defaultdict(list)
            for t in took:
                per_service[t.service_id].append(t)
            for service_id, lost in per_service.items():
                s = by_service.get(service_id)
                if s is None:
                    continue
                listed = ", ".join(f"replica {t.slot} (task {t.id[:12]})" for t in sorted(lost, key=lambda t: t.slot))
                self._record_service(
                    s, EventKind.NODE_DOWN,
                    f"node {node.hostname or node_id[:12]} ({node.address}) is {node.state}: it took {listed}; "
                    "Swarm starts replacements on the other nodes",
                    replica=node.hostname or node_id[:12],
                )

    def _note_tasks(self, tasks: Sequence[TaskInfo], by_service: Mapping[str, ServiceInfo]) -> None:
        for t in tasks:
            s = by_service.get(t.service_id)
            if s is None:
                continue
            text = t.error or t.message
            if t.state == "rejected" and NO_SUCH_IMAGE.lower() in text.lower():
                if (t.id, "pull") not in self._noted:
                    self._noted.add((t.id, "pull"))
                    self._pull_failed(s, t)
            elif t.state in PENDING_STATES and NO_SUITABLE_NODE in text:
                if (t.id, text) not in self._noted:
                    self._noted.add((t.id, text))
                    self._record_service(s, EventKind.SCHEDULING_FAILURE,
                                         f"replica {t.slot} cannot be placed: {text}", problem=True)
            elif t.state == "failed" and t.desired_state != "running" and (t.id, "exit") not in self._noted:
                self._noted.add((t.id, "exit"))
                failed = sum(1 for o in tasks if o.service_id == t.service_id and o.slot == t.slot
                             and o.state == "failed")
                if failed >= self.config.crash_loop_after:
                    detail = (f"exit code {t.exit_code}" if t.exit_code is not None else "") + (
                        f": {t.error}" if t.error else "")
                    self._record_task(
                        t, s, EventKind.CRASH_LOOP,
                        f"replica {t.slot} failed {failed} times (Swarm restarts it); last {detail or t.message}",
                    )
        live = {t.id for t in tasks}
        self._noted = {n for n in self._noted if n[0] in live}

    def _pull_failed(self, s: ServiceInfo, t: TaskInfo) -> None:
        """A node could not pull: ask the registry why (off the loop), then record it."""
        key = _key_of(s.labels)
        b = self._table.get(key)
        ref = b.deployment.image if b is not None else ""
        if not ref:
            self._record_service(s, EventKind.IMAGE_PULL_ERROR, t.error or t.message, problem=True)
            return
        cached = self._reasons.get(ref)
        if cached is not None and time.monotonic() - cached[0] < self.swarm.reason_ttl:
            self._record_pull(s, t, ref, cached[1])
            return
        if ref in self._reason_tasks:
            return

        async def ask() -> None:
            try:
                reason = await self._adapter.blocking(
                    functools.partial(images.pull_problem, ref, insecure=self.swarm.insecure_registries)
                )
            finally:
                self._reason_tasks.pop(ref, None)
            self._reasons[ref] = (time.monotonic(), reason)
            self._record_pull(s, t, ref, reason)

        self._reason_tasks[ref] = asyncio.create_task(ask(), name=f"registry reason {ref}")

    def _record_pull(self, s: ServiceInfo, t: TaskInfo, ref: str, reason: str | None) -> None:
        node = self._nodes.get(t.node_id)
        where = f" on node {node.hostname}" if node is not None and node.hostname else ""
        said = (t.error or t.message).replace(f": {ref}", "") + where  # the reference is said once
        message = (f"cannot pull {ref}: {reason} (Swarm: {said})" if reason
                   else f"cannot pull {ref}: {said}; the registry serves its manifest, so the node cannot reach it")
        self._record_service(s, EventKind.IMAGE_PULL_ERROR, message, problem=True)

    def _clear_recovered(self, tasks: Sequence[TaskInfo], by_service: Mapping[str, ServiceInfo]) -> None:
        ready: dict[BindingKey, int] = defaultdict(int)
        for t in tasks:
            s = by_service.get(t.service_id)
            state = self._readiness.get(t.id)
            if s is not None and state is not None and state.ready:
                ready[_key_of(s.labels)] += 1
        for key, count in self._desired.items():
            if count and ready.get(key, 0) >= count:
                self._problems.pop(key, None)

    # -- failures -------------------------------------------------------------
    def _redact(self, message: str, key: BindingKey) -> str:
        return redact(message, self._secret_values.get(key, frozenset()))

    def _fail(self, b: common_pb2.Binding, kind: EventKind, message: str, *, replica: str = "") -> None:
        message = self._redact(message, binding_key(b))
        self._problems[binding_key(b)] = _Problem(kind, message)
        self._events.record(
            kind, message=message, project_id=b.project_id, deployment_id=b.deployment.id,
            environment_id=b.environment_id, environment=b.environment_name, replica=replica,
        )
        log.warning(kind.value, extra={"deployment_id": b.deployment.id, "environment_id": b.environment_id})

    def _fail_once(self, b: common_pb2.Binding, kind: EventKind, message: str) -> None:
        """Records a standing problem when it is new (not on every pass)."""
        if self._problems.get(binding_key(b)) != _Problem(kind, self._redact(message, binding_key(b))):
            self._fail(b, kind, message)

    def _record_service(
        self, s: ServiceInfo, kind: EventKind, message: str, *, replica: str = "", problem: bool = False
    ) -> None:
        key = _key_of(s.labels)
        b = self._table.get(key)
        message = self._redact(message, key)
        if problem:
            self._problems[key] = _Problem(kind, message)
        self._events.record(
            kind, message=message, project_id=s.labels.get(da.PROJECT_LABEL, ""), deployment_id=key[1],
            environment_id=key[0], environment=b.environment_name if b is not None else "", replica=replica,
        )
        log.warning(kind.value, extra={"service": s.name})

    def _record_task(self, t: TaskInfo, s: ServiceInfo | None, kind: EventKind, message: str) -> None:
        if s is not None:
            self._record_service(s, kind, message, replica=str(t.slot))

    def _engine_unreachable(self, message: str) -> None:
        first = not self._engine_down
        self._engine_down = message
        log.warning("engine_unreachable", extra={"error": message})
        for b in self._table.bindings():
            if is_terminated(b) or self._desired.get(binding_key(b), b.min_replicas) <= 0:
                continue
            if first:
                self._fail(b, EventKind.SCHEDULING_FAILURE, f"swarm manager unreachable: {message}")

    # -- endpoints and status -------------------------------------------------
    def _views(self, tasks: Sequence[TaskInfo], s: ServiceInfo) -> tuple[ReplicaView, ...]:
        mine = [t for t in tasks if t.service_id == s.id]
        views = []
        for t in sorted(current_tasks(mine, self._node_up), key=lambda t: (t.slot, t.id)):
            readiness = self._readiness.get(t.id, _Readiness())
            node = self._nodes.get(t.node_id)
            views.append(ReplicaView(
                container_id=t.id,
                name=f"{s.name}.{t.slot}",
                index=t.slot,
                state=task_state(t, ready=readiness.ready, ever_ready=readiness.ever_ready,
                                 node_up=self._node_up(t.node_id)),
                started_at=t.timestamp if t.state == "running" else None,
                restarts=restarts_in_slot(mine, t),
                address=self._address(t, s),
                node=node.hostname if node is not None else "",
            ))
        return tuple(views)

    def _publish_endpoints(self) -> None:
        groups: dict[BindingKey, list[str]] = defaultdict(list)
        project_of: dict[BindingKey, str] = {}
        views_of: dict[BindingKey, tuple[ReplicaView, ...]] = {}
        for s in self._services:
            key = _key_of(s.labels)
            project_of.setdefault(key, s.labels.get(da.PROJECT_LABEL, ""))
            views_of[key] = views_of.get(key, ()) + self._views(self._tasks, s)
            for t in self._tasks:
                if t.service_id != s.id or t.state != "running" or t.desired_state != "running":
                    continue
                if not self._node_up(t.node_id) or not self._readiness.get(t.id, _Readiness()).ready:
                    continue
                address = self._address(t, s)
                if address:
                    groups[key].append(address)
        statuses: dict[BindingKey, str] = {}
        for b in self._table.bindings():
            key = binding_key(b)
            project_of[key] = b.project_id
            problem = self._problems.get(key)
            state = binding_state(b, self._desired.get(key, 0), views_of.get(key, ()),
                                  problem.kind if problem is not None else None)
            self._statuses[key] = state
            statuses[key] = state.value
        value = tuple(
            EndpointSet(
                project_id=project_of.get(key, ""), environment_id=key[0], deployment_id=key[1],
                addresses=tuple(sorted(groups.get(key, ()))), status=statuses.get(key, ""),
            )
            for key in sorted(set(groups) | set(statuses))
        )
        if self.endpoints.publish(value):
            log.info("endpoints_changed", extra={"sets": len(value), "addresses": sum(len(s.addresses) for s in value)})

    async def status(self, deployment_id: str) -> list[BindingView]:
        """Re-reads the deployment's services, their tasks and the nodes."""
        try:
            services = [
                s for s in await self._adapter.list_services(self.config.instance, {da.DEPLOYMENT_LABEL: deployment_id})
                if _owned(s)
            ]
            tasks, nodes = await asyncio.gather(
                self._adapter.list_tasks([s.id for s in services]), self._adapter.list_nodes()
            )
        except da.EngineUnavailable as exc:
            raise errors.Unavailable(
                f"the scheduler cannot reach the swarm manager, so replica status is unknown: {exc.message}",
                hint="check that the manager named by DOCKER_HOST is up; the call can be retried",
            ) from None
        self._nodes = {n.id: n for n in nodes}
        views = []
        for b in self._table.bindings():
            if b.deployment.id != deployment_id:
                continue
            key = binding_key(b)
            mine = [s for s in services if _key_of(s.labels) == key]
            replicas: tuple[ReplicaView, ...] = ()
            for s in mine:
                replicas += self._views(tasks, s)
            desired = self._decide(b, max((s.replicas for s in mine), default=0))
            problem = self._problems.get(key)
            views.append(BindingView(
                binding=b,
                status=binding_state(b, desired, replicas, problem.kind if problem is not None else None),
                desired=desired,
                replicas=replicas,
            ))
        return views

    def binding_status(self, key: BindingKey) -> BindingState | None:
        return self._statuses.get(key)


def insecure_from(registry: str) -> Collection[str]:
    """The image registry ``--image-registry`` names is spoken to over HTTP
    (as the nodes' ``insecure-registries``)."""
    return (registry,) if registry else ()


class SwarmSetupError(Exception):
    """The swarm runtime cannot start: ``message`` says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def check_manager() -> tuple[docker.DockerClient, str]:
    """A client of the manager ``DOCKER_HOST`` names (the Docker SDK's
    ``from_env``) and that manager's node id; ``SwarmSetupError`` saying
    what is wrong when it is no swarm manager or cannot be reached."""
    where = os.environ.get("DOCKER_HOST") or "the default Docker socket"
    try:
        client = docker.from_env(version=API_VERSION, timeout=30)
        return client, SwarmAdapter(client).check_manager()
    except NotAManager as exc:
        raise SwarmSetupError(
            f"--runtime swarm needs DOCKER_HOST to name a swarm manager, but {where}: {exc.message}"
        ) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise SwarmSetupError(
            f"--runtime swarm needs DOCKER_HOST to name a swarm manager, but {where} cannot be reached: {exc}"
        ) from None


def build(
    table: DesiredTable,
    secrets: SecretsResolver,
    events: EventStore,
    config: SchedulerConfig,
    *,
    image_registry: str = "",
    fence: Leadership | None = None,
) -> SwarmRuntime:
    """The swarm runtime on the manager ``DOCKER_HOST`` names, checked to be
    a swarm manager first (``check_manager``)."""
    client, node_id = check_manager()
    log.info("swarm_manager", extra={"docker_host": os.environ.get("DOCKER_HOST", ""), "node_id": node_id,
                                     "image_registry": image_registry})
    return SwarmRuntime(
        SwarmAdapter(client, fence=fence), table, secrets, events, config,
        SwarmConfig(insecure_registries=tuple(insecure_from(image_registry))), fence=fence,
    )
