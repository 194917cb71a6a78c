"""Observe -> plan -> execute.

Each pass lists this instance's managed containers by label (the engine is
the truth; nothing here is cached as truth), probes running replicas, decides
each binding's replica count (bounds + autoscaling on the router's load
reports, starting from the replicas that exist), resolves each wanted
binding's spec (image id, secrets), asks ``plan.plan`` what to change and
carries it out. Passes run on every desired-state change, after a new replica
becomes ready, on an activation, and on a periodic tick.

What survives a restart lives on the containers: replica index, generation,
spec hash, restart count (``berth.restarts``) and consecutive quick crashes
(``berth.crashes``); an exited container is kept until its restart backoff is
due, so the backoff is derived from its finish time. In memory there is only
what the engine cannot tell and may be lost: readiness and consecutive probe
failures, the load signal, pull/start retry timers and the last failure of
each binding (for status).

With several schedulers on one engine only the lease holder reconciles
(``lease.py``): a pass starts only while the lease is held, the adapter
fences every engine write, and a pass that sees a container created in a
higher epoch than its own stops there and deposes this scheduler.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from berth import errors
from berth.v1 import common_pb2

from . import docker_adapter as da
from . import spec as specs
from .desired import DesiredTable, binding_key, is_terminated
from .events import EventKind, EventStore, redact
from .lease import Leadership, LeaseLost, epoch_of
from .plan import (
    GONE,
    LIVE,
    BindingKey,
    ContainerStatus,
    Create,
    DesiredReplicas,
    ObservedReplica,
    Pause,
    Plan,
    Remove,
    RemoveReason,
    Rest,
    SlotKey,
    Unpause,
    plan,
)
from .probes import probe_http
from .runtime import (
    REPORTER_TTL,
    BindingState,
    BindingView,
    EndpointBroadcast,
    EndpointSet,
    ReplicaState,
    ReplicaView,
    ScalingRuntime,
    SchedulerConfig,
    binding_state,
)

log = logging.getLogger("berth.scheduler.reconciler")

__all__ = [
    "REPORTER_TTL", "BindingState", "BindingView", "EndpointBroadcast", "EndpointSet", "Reconciler",
    "ReplicaState", "ReplicaView", "SchedulerConfig", "SecretsResolver",
]


class SecretsResolver(Protocol):
    async def resolve(self, project_id: str, environment_id: str) -> Sequence[specs.SecretValue]: ...


# Records the image id resolved for a deployment registered by reference.
ImageRecorder = Callable[[str, str], Awaitable[None]]


@dataclass
class _Readiness:
    ready: bool = False
    ever_ready: bool = False
    failures: int = 0  # consecutive failed probes
    message: str = ""


@dataclass
class _StartBackoff:
    """Start failures leave no container to carry a label: kept in memory."""

    failures: int = 0
    not_before: float = 0.0  # wall clock


@dataclass(frozen=True)
class _Problem:
    kind: EventKind
    message: str


@dataclass
class _PullFailure:
    message: str
    not_before: float
    backoff: float


def _int_label(labels: Mapping[str, str], name: str, default: int = 0) -> int:
    try:
        return int(labels.get(name, default))
    except ValueError:
        return default


def _labels_ok(labels: Mapping[str, str]) -> bool:
    try:
        int(labels.get(da.REPLICA_LABEL, ""))
        int(labels.get(da.GENERATION_LABEL, "0"))
    except ValueError:
        return False
    return bool(labels.get(da.ENVIRONMENT_LABEL) and labels.get(da.DEPLOYMENT_LABEL))


def _key_of(c: da.ContainerInfo) -> BindingKey:
    return (c.labels[da.ENVIRONMENT_LABEL], c.labels[da.DEPLOYMENT_LABEL])


def _index_of(c: da.ContainerInfo) -> int:
    return int(c.labels[da.REPLICA_LABEL])


def _address_of(c: da.ContainerInfo) -> str:
    port = c.labels.get(specs.PORT_LABEL) or str(specs.DEFAULT_PORT)
    return f"{c.ip}:{port}" if c.ip else ""


def _slots_in_use(containers: Sequence[da.ContainerInfo]) -> int:
    """Replica slots a binding occupies on the engine now: the count the
    autoscaler starts from (so a restart neither loses nor doubles them)."""
    return len({_index_of(c) for c in containers if ContainerStatus.parse(c.status) is not ContainerStatus.REMOVING})


def _check_epochs(observed: Sequence[da.ContainerInfo], fence: Leadership) -> None:
    """A container created in a higher epoch than ours means another
    scheduler acquired the lease since: never touch its work; stand down."""
    newer = max((epoch_of(c.labels) for c in observed), default=0)
    if newer > fence.epoch:
        reason = f"a container of epoch {newer} exists; this scheduler's epoch is {fence.epoch}"
        fence.depose(reason, seen_epoch=newer)
        raise LeaseLost(f"another scheduler leads: {reason}")
    fence.ensure_leading()  # still, after the listing


def restart_delay(crashes: int, base: float, cap: float) -> float:
    """Exponential backoff before restarting after ``crashes`` quick exits."""
    if crashes <= 0:
        return 0.0
    return min(cap, base * 2 ** (crashes - 1))


# A replica thawed by the paused tier gets this long to answer again before
# it is left to the regular probes (which replace it if it never does).
RESUME_TIMEOUT = 5.0


class Reconciler(ScalingRuntime):
    """The ``local`` runtime: replicas as containers on one Docker engine.

    The paused tier: an idle min-0 binding's replicas are paused (out of the
    routers' pool first, then ``docker pause`` after the drain delay, unless
    a request or an activation came meanwhile), unpaused on activity (at
    once by ``resume_paused`` for an ``Activate``, else by the next pass),
    and stopped after the stop window or when the host is short of memory
    (``ScalingRuntime._decide``). A replica Docker reports ``paused`` is a
    live replica of its slot (labels say whose), adopted as it is after a
    restart."""

    PAUSES = True

    def __init__(
        self,
        adapter: da.DockerAdapter,
        table: DesiredTable,
        secrets: SecretsResolver,
        events: EventStore,
        config: SchedulerConfig,
        *,
        record_image: ImageRecorder | None = None,
        fence: Leadership | None = None,
    ) -> None:
        super().__init__(table, config)
        self._adapter = adapter
        self._fence = fence  # the lease (lease.py); None: the only scheduler
        self._secrets = secrets
        self._events = events
        self._record_image = record_image
        self._pass_lock = asyncio.Lock()
        self._observed: list[da.ContainerInfo] = []
        self._statuses: dict[BindingKey, BindingState] = {}
        self._readiness: dict[str, _Readiness] = {}
        self._draining: set[str] = set()
        self._noted_exits: set[str] = set()
        self._start_backoff: dict[SlotKey, _StartBackoff] = {}
        self._problems: dict[BindingKey, _Problem] = {}
        # Every secret value resolved for a binding while it is in the table
        # (old values too: a replica started before a rotation still holds
        # them), so engine text about its replicas can be redacted.
        self._secret_values: dict[BindingKey, frozenset[str]] = {}
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._pull_failures: dict[str, _PullFailure] = {}
        self._recorded_images: set[str] = set()
        self._startup_probes: dict[str, asyncio.Task[None]] = {}
        self._host: da.HostResources | None = None
        self._host_checked = 0.0
        self._engine_down: str = ""
        # The paused tier: one pause/unpause at a time per binding; replicas
        # leaving the pool to be paused; when each replica was last thawed
        # here (a listing begun before that still says "paused"); activity
        # during a pause's drain cancels it.
        self._rest_locks: dict[BindingKey, asyncio.Lock] = {}
        self._pausing: set[str] = set()
        self._thawed_at: dict[str, float] = {}
        self._pause_cancel: dict[BindingKey, asyncio.Event] = {}
        table.on_change(self.wake)

    # -- loop ---------------------------------------------------------------
    async def run(self) -> None:
        """Reconciles until cancelled: at once on a wake-up, else every tick."""
        await self._reconcile_forever()

    async def close(self) -> None:
        """Stops background probes and pulls. Replicas keep running: they
        outlive the control plane and a restarted scheduler adopts them."""
        self.endpoints.close()
        tasks = [*self._startup_probes.values(), *self._pulls.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- load signal (report_load, activate, _decide: ScalingRuntime) ---------
    @property
    def _slots(self) -> dict[BindingKey, int]:
        by_key: dict[BindingKey, list[da.ContainerInfo]] = defaultdict(list)
        for c in self._observed:
            by_key[_key_of(c)].append(c)
        return {k: _slots_in_use(v) for k, v in by_key.items()}

    # -- one pass -----------------------------------------------------------
    async def reconcile_once(self) -> Plan:
        async with self._pass_lock:
            if self._fence is not None:
                self._fence.ensure_leading()
            listed_at = time.monotonic()
            observed = [c for c in await self._adapter.list_managed(self.config.instance) if _labels_ok(c.labels)]
            observed = [self._as_thawed(c, listed_at) for c in observed]
            if self._fence is not None:
                _check_epochs(observed, self._fence)
            if self._engine_down:
                log.info("engine_reachable_again")
                self._engine_down = ""
            self._observed = observed
            await self._probe_running(observed)
            live_ids = {c.id for c in observed}
            for gone in [cid for cid in self._readiness if cid not in live_ids and cid not in self._startup_probes]:
                del self._readiness[gone]
            self._draining &= live_ids
            self._noted_exits &= live_ids
            self._pausing &= live_ids
            self._thawed_at = {cid: t for cid, t in self._thawed_at.items() if cid in live_ids}
            self._check_memory(observed)

            slots = self._slots
            self._desired = {binding_key(b): self._decide(b, slots.get(binding_key(b), 0)) for b in self._table.bindings()}
            now = time.time()
            replicas = [self._observed_replica(c) for c in observed]
            self._note_exits(observed, replicas)
            resolved = await self._resolve_specs()
            desired = [
                DesiredReplicas(
                    key=key, count=count, spec_hash=resolved[key].spec_hash if key in resolved else None,
                    rest=self._rest_of(key),
                )
                for key, count in self._desired.items()
            ]
            result = plan(
                desired,
                replicas,
                snapshot_complete=self._table.snapshot_complete,
                now=now,
                not_before={slot: b.not_before for slot, b in self._start_backoff.items()},
            )
            self._clear_recovered(replicas, desired)
            self._publish_endpoints()
            self.endpoints.mark_complete()  # listed and probed: routers may trust it now
            if not result.empty:
                log.info(
                    "plan",
                    extra={
                        "creates": [f"{c.key[1]}/{c.key[0]}#{c.index} ({c.reason.value})" for c in result.creates],
                        "removes": [f"{r.name} ({r.reason.value})" for r in result.removes],
                        "pauses": [f"{r.name} ({r.reason.value})" for r in result.pauses],
                        "unpauses": [f"{r.name} ({r.reason.value})" for r in result.unpauses],
                    },
                )
            await self._execute(result, resolved, {c.id: c for c in observed})
            return result

    # -- paused tier ----------------------------------------------------------
    def _rest_of(self, key: BindingKey) -> Rest:
        b = self._table.get(key)
        return Rest.WAKE if b is None else self._rest(b)

    def _as_thawed(self, c: da.ContainerInfo, listed_at: float) -> da.ContainerInfo:
        """A listing begun before this scheduler thawed a replica still says
        "paused": it runs."""
        thawed = self._thawed_at.get(c.id)
        if c.status == ContainerStatus.PAUSED.value and thawed is not None and thawed >= listed_at:
            return dataclasses.replace(c, status=ContainerStatus.RUNNING.value)
        return c

    def _check_memory(self, observed: Sequence[da.ContainerInfo]) -> None:
        """Whether the host needs the memory paused replicas hold (checked
        only while some replica is paused)."""
        floor = self.config.pause_memory_floor
        if floor <= 0 or not any(c.status == ContainerStatus.PAUSED.value for c in observed):
            self._memory_low = False
            return
        available = self._adapter.memory_available()
        low = available is not None and available < floor
        if low and not self._memory_low:
            log.warning("memory_low_stopping_paused", extra={"available": available, "floor": floor})
        self._memory_low = low

    def _rest_lock(self, key: BindingKey) -> asyncio.Lock:
        lock = self._rest_locks.get(key)
        if lock is None:
            lock = self._rest_locks[key] = asyncio.Lock()
        return lock

    def _set_observed(self, c: da.ContainerInfo, status: ContainerStatus) -> None:
        self._observed = [
            dataclasses.replace(o, status=status.value) if o.id == c.id else o for o in self._observed
        ]

    def report_load(self, loads: Mapping[BindingKey, tuple[int, int]], reporter: str = "") -> None:
        """As ``ScalingRuntime.report_load``; a binding with load and a
        paused replica wakes the loop (which thaws it) at once."""
        super().report_load(loads, reporter)
        busy = {key for key, (in_flight, requests) in loads.items() if in_flight > 0 or requests > 0}
        if busy and any(c.status == ContainerStatus.PAUSED.value and _key_of(c) in busy for c in self._observed):
            self.wake()

    def activate(self, key: BindingKey) -> None:
        super().activate(key)
        cancel = self._pause_cancel.get(key)
        if cancel is not None:
            cancel.set()  # a pause draining now is called off

    async def resume_paused(self, key: BindingKey) -> bool:
        """``Activate``'s fast path: thaws the binding's paused replicas at
        once (not at the next pass) and returns when one answers its probe
        again and is back in the routers' pool; False when none was paused
        (or none answered)."""
        if not any(_key_of(c) == key and c.status == ContainerStatus.PAUSED.value for c in self._observed):
            return False
        async with self._rest_lock(key):
            paused = [c for c in self._observed if _key_of(c) == key and c.status == ContainerStatus.PAUSED.value]
            if not paused:
                return any(
                    _key_of(c) == key and self._readiness.get(c.id, _Readiness()).ready for c in self._observed
                )
            results = await asyncio.gather(*(self._thaw(c, "activation") for c in paused))
            return any(results)

    async def _pause(self, p: Pause, c: da.ContainerInfo | None) -> None:
        """Out of the pool, the drain delay (called off by activity), then
        frozen."""
        if c is None:
            return
        async with self._rest_lock(p.key):
            cancel = self._pause_cancel[p.key] = asyncio.Event()
            try:
                self._pausing.add(c.id)
                self._publish_endpoints()
                if self.config.drain_delay > 0:
                    try:
                        async with asyncio.timeout(self.config.drain_delay):
                            await cancel.wait()
                    except TimeoutError:
                        pass
                b = self._table.get(p.key)
                if cancel.is_set() or b is None or self._rest(b) is not Rest.PAUSE:
                    log.info("pause_called_off", extra={"container": c.name})
                    return
                try:
                    await self._adapter.pause(c.id)
                except LeaseLost:
                    return
                except da.ContainerGone:
                    return
                except da.EngineError as exc:
                    log.warning("pause_failed", extra={"container": c.name, "error": exc.message})
                    return
                self._thawed_at.pop(c.id, None)
                self._set_observed(c, ContainerStatus.PAUSED)
                state = self._readiness.setdefault(c.id, _Readiness())
                state.ready = False
                log.info("paused", extra={"container": c.name, "reason": p.reason.value})
            finally:
                self._pausing.discard(c.id)
                if self._pause_cancel.get(p.key) is cancel:
                    del self._pause_cancel[p.key]
                self._publish_endpoints()

    async def _unpause(self, u: Unpause, c: da.ContainerInfo | None) -> None:
        if c is None:
            return
        async with self._rest_lock(u.key):
            current = next((o for o in self._observed if o.id == c.id), c)
            if current.status != ContainerStatus.PAUSED.value:
                return  # thawed meanwhile (``resume_paused``)
            await self._thaw(current, u.reason.value)

    async def _thaw(self, c: da.ContainerInfo, reason: str) -> bool:
        """Unpauses (fenced) and probes until it answers (bounded by
        ``RESUME_TIMEOUT``): it was ready when paused, so no startup probe,
        but it is routed again only once it answers. Call with the
        binding's rest lock held."""
        try:
            await self._adapter.unpause(c.id)
        except (LeaseLost, da.ContainerGone):
            return False
        except da.EngineError as exc:
            log.warning("unpause_failed", extra={"container": c.name, "error": exc.message})
            return False
        self._thawed_at[c.id] = time.monotonic()
        self._set_observed(c, ContainerStatus.RUNNING)
        port = int(c.labels.get(specs.PORT_LABEL) or specs.DEFAULT_PORT)
        path = c.labels.get(specs.HEALTH_PATH_LABEL) or "/"
        deadline = time.monotonic() + RESUME_TIMEOUT
        state = self._readiness.setdefault(c.id, _Readiness())
        while True:
            result = await probe_http(c.ip, port, path, timeout=self.config.probe_timeout)
            if result.ok:
                state.ready = state.ever_ready = True
                state.failures = 0
                state.message = result.message
                log.info("unpaused", extra={"container": c.name, "reason": reason})
                self._publish_endpoints()
                return True
            state.message = result.message
            if time.monotonic() >= deadline:
                # Left to the regular probes: ever ready, so failures count
                # and a replica that never answers is replaced.
                state.ever_ready = True
                log.warning("unpaused_not_answering", extra={"container": c.name, "error": result.message})
                self.wake()
                return False
            await asyncio.sleep(self.config.fast_probe_interval / 4)

    def _observed_replica(self, c: da.ContainerInfo) -> ObservedReplica:
        status = ContainerStatus.parse(c.status)
        crashes = _int_label(c.labels, da.CRASHES_LABEL)
        next_crashes, not_before = 0, 0.0
        if status in GONE and status is not ContainerStatus.CREATED:
            ran = (
                (c.finished_at - c.started_at).total_seconds()
                if c.started_at and c.finished_at and c.finished_at >= c.started_at
                else 0.0
            )
            next_crashes = crashes + 1 if ran < self.config.quick_exit else 0
            if next_crashes and c.finished_at is not None:
                not_before = c.finished_at.timestamp() + restart_delay(
                    next_crashes, self.config.restart_backoff, self.config.restart_backoff_max
                )
        return ObservedReplica(
            container_id=c.id,
            name=c.name,
            key=_key_of(c),
            index=_index_of(c),
            generation=_int_label(c.labels, da.GENERATION_LABEL),
            spec_hash=c.labels.get(da.SPEC_HASH_LABEL, ""),
            status=status,
            ready=self._readiness.get(c.id, _Readiness()).ready,
            restarts=_int_label(c.labels, da.RESTARTS_LABEL),
            next_crashes=next_crashes,
            not_before=not_before,
        )

    def _note_exits(self, observed: list[da.ContainerInfo], replicas: list[ObservedReplica]) -> None:
        """Events for replicas that exited on their own (first sight only)."""
        live_slots = {(r.key, r.index) for r in replicas if r.status in LIVE}
        for c, r in zip(observed, replicas, strict=True):
            if r.status not in GONE or r.status is ContainerStatus.CREATED or c.id in self._noted_exits:
                continue
            self._noted_exits.add(c.id)
            if (r.key, r.index) in live_slots or self._desired.get(r.key, 0) <= r.index:
                continue  # replaced or scaled away: not a crash of a wanted replica
            detail = f"exit code {c.exit_code}" + (f": {c.error}" if c.error else "")
            if c.oom_killed:
                self._record_for_container(
                    c, EventKind.OOM_KILLED, f"replica {r.index} was killed for exceeding its memory limit ({detail})"
                )
            if r.next_crashes >= self.config.crash_loop_after:
                self._record_for_container(
                    c,
                    EventKind.CRASH_LOOP,
                    f"replica {r.index} exited {r.next_crashes} times in quick succession; last {detail}",
                )

    async def _probe_running(self, observed: list[da.ContainerInfo]) -> None:
        running = [
            c for c in observed if c.status == ContainerStatus.RUNNING.value and c.id not in self._startup_probes
        ]
        results = await asyncio.gather(*(self._probe(c) for c in running))
        now = datetime.now().astimezone()
        for c, (ok, message) in zip(running, results, strict=True):
            state = self._readiness.setdefault(c.id, _Readiness())
            state.ready, state.message = ok, message
            if ok:
                state.ever_ready = True
                state.failures = 0
                continue
            # Count failures of replicas that were ready once, or that had
            # their whole startup time (adopted after a restart).
            old = c.started_at is not None and (now - c.started_at).total_seconds() > self.config.startup_timeout
            if not (state.ever_ready or old):
                continue
            state.failures += 1
            if state.failures >= self.config.unhealthy_after:
                self._record_for_container(
                    c,
                    EventKind.HEALTH_CHECK_FAILED,
                    f"replica {c.labels.get(da.REPLICA_LABEL, '')} failed {state.failures} health checks "
                    f"in a row: {message}; replacing it",
                )
                await self._stop_unhealthy(c)
        for c in observed:
            if c.status != ContainerStatus.RUNNING.value and c.id in self._readiness:
                self._readiness[c.id].ready = False

    async def _stop_unhealthy(self, c: da.ContainerInfo) -> None:
        """Out of the pool, then stopped: the exited container is replaced
        by the next pass (with the restart backoff)."""
        self._draining.add(c.id)
        self._publish_endpoints()
        try:
            await self._adapter.stop(c.id, grace=self.config.stop_grace)
        except LeaseLost:
            return  # not leading: the leader decides
        except da.EngineError as exc:
            log.warning("stop_failed", extra={"container": c.name, "error": exc.message})
        self.wake()

    async def _probe(self, c: da.ContainerInfo) -> tuple[bool, str]:
        port = int(c.labels.get(specs.PORT_LABEL) or specs.DEFAULT_PORT)
        result = await probe_http(
            c.ip, port, c.labels.get(specs.HEALTH_PATH_LABEL) or "/", timeout=self.config.probe_timeout
        )
        return result.ok, result.message

    def _publish_endpoints(self) -> None:
        """One set per binding (empty when nothing is ready) with its status,
        so the router can fall back when a binding has ``failed``."""
        groups: dict[BindingKey, list[str]] = defaultdict(list)
        project_of: dict[BindingKey, str] = {}
        by_key: dict[BindingKey, list[da.ContainerInfo]] = defaultdict(list)
        for c in self._observed:
            key = _key_of(c)
            by_key[key].append(c)
            project_of.setdefault(key, c.labels.get(da.PROJECT_LABEL, ""))
            if c.status != ContainerStatus.RUNNING.value or c.id in self._draining or c.id in self._pausing:
                continue
            if not self._readiness.get(c.id, _Readiness()).ready:
                continue
            address = _address_of(c)
            if address:
                groups[key].append(address)
        statuses: dict[BindingKey, str] = {}
        for b in self._table.bindings():
            key = binding_key(b)
            project_of[key] = b.project_id
            state = self._binding_state(b, self._desired.get(key, 0), self._views(key, by_key.get(key, [])))
            self._statuses[key] = state
            statuses[key] = state.value
        value = tuple(
            EndpointSet(
                project_id=project_of.get(key, ""),
                environment_id=key[0],
                deployment_id=key[1],
                addresses=tuple(sorted(groups.get(key, ()))),
                status=statuses.get(key, ""),
            )
            for key in sorted(set(groups) | set(statuses))
        )
        if self.endpoints.publish(value):
            log.info("endpoints_changed", extra={"sets": len(value), "addresses": sum(len(s.addresses) for s in value)})

    def _clear_recovered(self, replicas: list[ObservedReplica], desired: list[DesiredReplicas]) -> None:
        for want in desired:
            ready = {r.index for r in replicas if r.key == want.key and r.ready and r.index < want.count}
            if want.count and len(ready) >= want.count:
                self._problems.pop(want.key, None)

    def _engine_unreachable(self, message: str) -> None:
        """Every binding that wants replicas gets a ``scheduling_failure``
        (folded: one row per binding, counted per failed pass)."""
        first = not self._engine_down
        self._engine_down = message
        log.warning("engine_unreachable", extra={"error": message})
        for b in self._table.bindings():
            if is_terminated(b) or self._desired.get(binding_key(b), b.min_replicas) <= 0:
                continue
            if first or self._problems.get(binding_key(b)) != _Problem(EventKind.SCHEDULING_FAILURE, message):
                self._fail(b, EventKind.SCHEDULING_FAILURE, message)

    # -- specs --------------------------------------------------------------
    async def _host_resources(self) -> da.HostResources | None:
        if self._host is None or time.monotonic() - self._host_checked > self.config.host_refresh:
            self._host = await self._adapter.host_resources()
            self._host_checked = time.monotonic()
        return self._host

    async def _resolve_specs(self) -> dict[BindingKey, specs.ResolvedSpec]:
        wanted = [b for b in self._table.bindings() if self._desired.get(binding_key(b), 0) > 0]
        secrets_by_env: dict[tuple[str, str], Sequence[specs.SecretValue] | None] = {}
        resolved: dict[BindingKey, specs.ResolvedSpec] = {}
        for b in wanted:
            invalid = specs.invalid_config(b.deployment.config, await self._host_resources())
            if invalid is not None:
                if self._problems.get(binding_key(b)) != _Problem(EventKind.SCHEDULING_FAILURE, invalid):
                    self._fail(b, EventKind.SCHEDULING_FAILURE, invalid)
                continue
            image_id = await self._image_for(b)
            if image_id is None:
                continue
            env_key = (b.project_id, b.environment_id)
            if env_key not in secrets_by_env:
                try:
                    secrets_by_env[env_key] = await self._secrets.resolve(b.project_id, b.environment_id)
                except errors.BerthError as exc:
                    # Infrastructure, not the deployment's fault: keep what runs, retry next pass.
                    log.warning(
                        "secrets_unavailable",
                        extra={"environment_id": b.environment_id, "error": type(exc).__name__},
                    )
                    secrets_by_env[env_key] = None
            values = secrets_by_env[env_key]
            if values is None:
                continue
            resolved[binding_key(b)] = specs.resolve(b, image_id, values)
            key = binding_key(b)
            self._secret_values[key] = self._secret_values.get(key, frozenset()) | {s.value for s in values}
        in_table = {binding_key(b) for b in self._table.bindings()}
        for key in [k for k in self._secret_values if k not in in_table]:
            del self._secret_values[key]
        return resolved

    async def _image_for(self, b: common_pb2.Binding) -> str | None:
        """The image id to run, or None (pull pending or failed)."""
        dep = b.deployment
        if dep.image_id and await self._adapter.image_id(dep.image_id):
            self._clear_problem(b, EventKind.IMAGE_PULL_ERROR)
            return dep.image_id
        ref = dep.image
        if not ref:
            message = f"image {dep.image_id} is not present on this engine"
            if self._problems.get(binding_key(b)) != _Problem(EventKind.IMAGE_PULL_ERROR, message):
                self._fail(b, EventKind.IMAGE_PULL_ERROR, message)
            return None
        local = await self._adapter.image_id(ref)
        if local is None:
            failure = self._pull_failures.get(ref)
            if failure is not None:
                # The reference's last pull failed and its backoff runs: a
                # binding that did not have the reason yet (added since) gets
                # its own event now, not at the next pull.
                redacted = self._redact(failure.message, binding_key(b))
                if self._problems.get(binding_key(b)) != _Problem(EventKind.IMAGE_PULL_ERROR, redacted):
                    self._fail(b, EventKind.IMAGE_PULL_ERROR, failure.message)
            if ref not in self._pulls and (failure is None or failure.not_before <= time.monotonic()):
                self._pulls[ref] = asyncio.create_task(self._pull(ref), name=f"pull {ref}")
            return None
        if dep.image_id and local != dep.image_id:
            self._fail(
                b, EventKind.IMAGE_PULL_ERROR, f"{ref} resolves to {local}, but the deployment is pinned to {dep.image_id}"
            )
            return None
        self._clear_problem(b, EventKind.IMAGE_PULL_ERROR)
        if not dep.image_id and self._record_image is not None and dep.id not in self._recorded_images:
            try:
                await self._record_image(dep.id, local)
                self._recorded_images.add(dep.id)
            except errors.BerthError as exc:
                log.warning("resolve_image_failed", extra={"deployment_id": dep.id, "error": exc.message})
        return local

    def _clear_problem(self, b: common_pb2.Binding, kind: EventKind) -> None:
        problem = self._problems.get(binding_key(b))
        if problem is not None and problem.kind is kind:
            del self._problems[binding_key(b)]

    async def _pull(self, ref: str) -> None:
        try:
            log.info("pull_started", extra={"image": ref})
            await self._adapter.pull(ref, timeout=self.config.pull_timeout)
            self._pull_failures.pop(ref, None)
            log.info("pull_done", extra={"image": ref})
        except LeaseLost:
            return  # not leading: the leader pulls
        except da.EngineError as exc:
            previous = self._pull_failures.get(ref)
            backoff = min(self.config.pull_retry_max, previous.backoff * 2) if previous else self.config.pull_retry
            self._pull_failures[ref] = _PullFailure(exc.message, time.monotonic() + backoff, backoff)
            log.warning("pull_failed", extra={"image": ref, "error": exc.message})
            for b in self._table.bindings():
                if b.deployment.image == ref and self._desired.get(binding_key(b), 0) > 0:
                    self._fail(b, EventKind.IMAGE_PULL_ERROR, exc.message)
        finally:
            self._pulls.pop(ref, None)
            self.wake()

    # -- execute ------------------------------------------------------------
    async def _execute(
        self, p: Plan, resolved: dict[BindingKey, specs.ResolvedSpec], observed: dict[str, da.ContainerInfo]
    ) -> None:
        # Graceful drain: live replicas leave the router's pool first.
        leaving = {
            r.container_id
            for r in p.removes
            if r.reason not in (RemoveReason.EXITED, RemoveReason.NEVER_STARTED)
        }
        newly_draining = leaving - self._draining
        if newly_draining:
            self._draining |= leaving
            self._publish_endpoints()

        async def removes() -> None:
            if newly_draining and self.config.drain_delay > 0:
                await asyncio.sleep(self.config.drain_delay)
            await asyncio.gather(*(self._remove(r, observed.get(r.container_id)) for r in p.removes))

        creates = [self._create(c, resolved[c.key]) for c in p.creates if c.key in resolved]
        rest = [self._pause(x, observed.get(x.container_id)) for x in p.pauses]
        rest += [self._unpause(x, observed.get(x.container_id)) for x in p.unpauses]
        await asyncio.gather(removes(), *creates, *rest)

    async def _remove(self, r: Remove, info: da.ContainerInfo | None) -> None:
        probe = self._startup_probes.pop(r.container_id, None)
        if probe is not None:
            probe.cancel()
        grace = 0.0 if r.reason in (RemoveReason.EXITED, RemoveReason.NEVER_STARTED) else self.config.stop_grace
        paused = info is not None and info.status == ContainerStatus.PAUSED.value
        try:
            await self._adapter.remove(r.container_id, grace=grace, paused=paused)
        except da.ContainerGone:
            pass  # vanished meanwhile: done
        except da.EngineError as exc:
            log.warning("remove_failed", extra={"container": r.name, "error": exc.message})
            return
        self._readiness.pop(r.container_id, None)
        log.info("removed", extra={"container": r.name, "reason": r.reason.value})

    async def _create(self, c: Create, spec: specs.ResolvedSpec) -> None:
        run = specs.run_spec(
            self.config.instance, spec, c.index, c.generation, restarts=c.restarts, crashes=c.crashes
        )
        b = spec.binding
        slot = (c.key[0], c.key[1], c.index)
        try:
            info = await self._adapter.run(run)
        except da.NameConflict:
            log.info("name_conflict", extra={"container": run.name})  # someone made it: re-read
            self.wake()
            return
        except da.StartFailed as exc:
            message = self._redact(exc.message, binding_key(b), spec.secret_values)
            record = self._start_backoff.setdefault(slot, _StartBackoff())
            record.failures += 1
            record.not_before = time.time() + restart_delay(
                record.failures, self.config.restart_backoff, self.config.restart_backoff_max
            )
            self._fail(b, EventKind.SCHEDULING_FAILURE, message, replica=str(c.index))
            return
        except da.EngineError as exc:
            log.warning("create_failed", extra={"container": run.name,
                                                "error": self._redact(exc.message, binding_key(b), spec.secret_values)})
            return
        self._start_backoff.pop(slot, None)
        self._clear_problem(b, EventKind.SCHEDULING_FAILURE)
        self._readiness[info.id] = _Readiness()
        log.info("created", extra={"container": run.name, "id": info.id[:12], "reason": c.reason.value})
        self._startup_probes[info.id] = asyncio.create_task(
            self._startup_probe(info, spec.port, spec.health_path), name=f"probe {run.name}"
        )

    async def _startup_probe(self, info: da.ContainerInfo, port: int, path: str) -> None:
        """Probes a new replica every ~100 ms until it is ready; one that
        never gets ready within the startup timeout is replaced."""
        deadline = time.monotonic() + self.config.startup_timeout
        message = ""
        try:
            while time.monotonic() < deadline:
                result = await probe_http(info.ip, port, path, timeout=self.config.probe_timeout)
                if result.ok:
                    state = self._readiness.setdefault(info.id, _Readiness())
                    state.ready = state.ever_ready = True
                    state.failures = 0
                    state.message = result.message
                    log.info("ready", extra={"container": info.name})
                    # Route it now rather than after the pass that created it
                    # (which may still be creating its siblings).
                    if all(c.id != info.id for c in self._observed):
                        self._observed.append(info)
                    self._publish_endpoints()
                    return
                message = result.message
                await asyncio.sleep(self.config.fast_probe_interval)
            self._record_for_container(
                info,
                EventKind.HEALTH_CHECK_FAILED,
                f"not ready within {self.config.startup_timeout:g} s: {message}; replacing it",
            )
            await self._stop_unhealthy(info)
        finally:
            self._startup_probes.pop(info.id, None)
            self.wake()

    # -- failures -----------------------------------------------------------
    def _redact(self, message: str, key: BindingKey, also: Sequence[str] = ()) -> str:
        """Engine text without the binding's secret values (``events.redact``)."""
        return redact(message, self._secret_values.get(key, frozenset()) | set(also))

    def _fail(self, b: common_pb2.Binding, kind: EventKind, message: str, *, replica: str = "") -> None:
        message = self._redact(message, binding_key(b))
        self._problems[binding_key(b)] = _Problem(kind, message)
        self._events.record(
            kind,
            message=message,
            project_id=b.project_id,
            deployment_id=b.deployment.id,
            environment_id=b.environment_id,
            environment=b.environment_name,
            replica=replica,
        )
        log.warning(kind.value, extra={"deployment_id": b.deployment.id, "environment_id": b.environment_id})

    def _record_for_container(self, c: da.ContainerInfo, kind: EventKind, message: str) -> None:
        env_id, dep_id = _key_of(c)
        b = self._table.get((env_id, dep_id))
        message = self._redact(message, (env_id, dep_id))
        self._events.record(
            kind,
            message=message,
            project_id=c.labels.get(da.PROJECT_LABEL, ""),
            deployment_id=dep_id,
            environment_id=env_id,
            environment=b.environment_name if b is not None else "",
            replica=c.labels.get(da.REPLICA_LABEL, ""),
        )
        log.warning(kind.value, extra={"container": c.name})

    # -- status -------------------------------------------------------------
    async def status(self, deployment_id: str) -> list[BindingView]:
        """Re-reads the deployment's containers from the engine and derives
        each binding's status. An unreachable engine is UNAVAILABLE."""
        try:
            listed = await self._adapter.list_managed(self.config.instance, {da.DEPLOYMENT_LABEL: deployment_id})
        except da.EngineUnavailable as exc:
            raise errors.Unavailable(
                f"the scheduler cannot reach its Docker engine, so replica status is unknown: {exc.message}",
                hint="check that the Docker engine is running; the call can be retried",
            ) from None
        containers = [c for c in listed if _labels_ok(c.labels)]
        views = []
        for b in self._table.bindings():
            if b.deployment.id != deployment_id:
                continue
            key = binding_key(b)
            mine = [c for c in containers if _key_of(c) == key]
            replicas = self._views(key, mine)
            desired = self._decide(b, _slots_in_use(mine))
            views.append(
                BindingView(binding=b, status=self._binding_state(b, desired, replicas), desired=desired, replicas=replicas)
            )
        return views

    def binding_status(self, key: BindingKey) -> BindingState | None:
        """The status from the last pass (for Activate's answer)."""
        return self._statuses.get(key)

    def _views(self, key: BindingKey, containers: Sequence[da.ContainerInfo]) -> tuple[ReplicaView, ...]:
        mine = sorted(containers, key=lambda c: (_index_of(c), c.name))
        return tuple(
            ReplicaView(
                container_id=c.id,
                name=c.name,
                index=_index_of(c),
                state=self._replica_state(c),
                started_at=c.started_at,
                restarts=_int_label(c.labels, da.RESTARTS_LABEL),
                address=_address_of(c),
            )
            for c in mine
        )

    def _replica_state(self, c: da.ContainerInfo) -> ReplicaState:
        status = ContainerStatus.parse(c.status)
        readiness = self._readiness.get(c.id, _Readiness())
        if status is ContainerStatus.CREATED:
            return ReplicaState.PENDING
        if status is ContainerStatus.RUNNING:
            if c.id in self._draining or c.id in self._pausing:
                return ReplicaState.STOPPING
            if readiness.ready:
                return ReplicaState.READY
            return ReplicaState.UNHEALTHY if readiness.ever_ready else ReplicaState.STARTING
        if status in (ContainerStatus.RESTARTING,):
            return ReplicaState.STARTING
        if status is ContainerStatus.PAUSED:
            return ReplicaState.PAUSED
        if c.oom_killed or c.error or _int_label(c.labels, da.CRASHES_LABEL) + 1 >= self.config.crash_loop_after:
            return ReplicaState.FAILED
        return ReplicaState.EXITED

    def _binding_state(self, b: common_pb2.Binding, want: int, replicas: tuple[ReplicaView, ...]) -> BindingState:
        problem = self._problems.get(binding_key(b))
        return binding_state(b, want, replicas, problem.kind if problem is not None else None)
