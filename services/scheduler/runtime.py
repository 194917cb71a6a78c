"""The seam between the scheduler and what runs replicas.

The servicer, the app, the routers' endpoint stream, status and events talk
to a ``Runtime``; two implement it:

- ``local`` (``reconciler.Reconciler``): containers on one Docker engine;
- ``swarm`` (``swarm_runtime.SwarmRuntime``): one Swarm service per binding
  on a Docker Swarm cluster, driven through the manager.

What both share lives here, once: the replica and binding states and views
the status answers are built from, the endpoint broadcast to the routers,
and ``ScalingRuntime`` — the load signal (summed over the routers that
report), the autoscaler's decision with the keep-warm rule, activations and
the wake-up of the loop. Each implementation supplies ``_slots`` (replica
slots per binding as its engine reports them now) and its own pass.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Protocol

from berth.v1 import common_pb2

from . import docker_adapter as da
from .autoscale import Bounds, LoadTracker, ScalePolicy
from .desired import DesiredTable, binding_key, is_terminated
from .events import EventKind
from .lease import LeaseLost
from .plan import BindingKey, Rest

log = logging.getLogger("berth.scheduler")

# A router (process) silent for this long no longer counts in the in-flight
# load: it stopped, or restarted under another reporter name.
REPORTER_TTL = 10.0

RUNTIMES = ("local", "swarm")


@dataclass(frozen=True)
class SchedulerConfig:
    instance: str = "default"
    reconcile_interval: float = 2.0
    pull_timeout: float = 60.0
    stop_grace: float = 10.0
    # After a live replica leaves the published endpoints, wait this long
    # before stopping it, so routers stop picking it and in-flight requests
    # finish (busybox-like workers die on SIGTERM mid-request).
    drain_delay: float = 2.0
    probe_timeout: float = 1.0
    fast_probe_interval: float = 0.1
    startup_timeout: float = 120.0
    unhealthy_after: int = 3  # consecutive failed probes of a running replica
    quick_exit: float = 10.0  # a replica that ran less than this crashed "quickly"
    crash_loop_after: int = 3
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    pull_retry: float = 5.0
    pull_retry_max: float = 300.0
    target_concurrency: float = 10.0
    scale_down_window: float = 30.0
    # The paused tier (scheduler-wide defaults; a binding's own
    # ``idle_pause_seconds``/``idle_stop_seconds`` win). A min-0 binding with
    # no request in flight and none completed for ``idle_pause`` seconds has
    # its replicas paused (``docker pause``: memory kept, no CPU), and they
    # are stopped after ``idle_window`` seconds idle (the stop window,
    # ``--idle-stop``) or as soon as the host's available memory falls below
    # ``pause_memory_floor`` bytes. ``idle_pause`` 0, or not below the stop
    # window, means no pausing (a runtime that cannot pause, Swarm, stops
    # after the pause window instead).
    idle_window: float = 900.0
    idle_pause: float = 60.0
    pause_memory_floor: int = 256 * 1024 * 1024
    # Warm rollback: a binding that stopped serving keeps its minimum this
    # long (from its last change), so rolling back to it is a pure pointer
    # move; afterwards its minimum counts as 0 and it scales to zero when idle.
    keep_warm: float = 600.0
    host_refresh: float = 60.0


class ReplicaState(str, Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    FAILED = "failed"
    STOPPING = "stopping"  # out of the pool, being stopped
    PAUSED = "paused"  # frozen by the paused tier (memory kept, no CPU); out of the pool


class BindingState(str, Enum):
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    SCALED_TO_ZERO = "scaled_to_zero"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class EndpointSet:
    project_id: str
    environment_id: str
    deployment_id: str
    addresses: tuple[str, ...]
    status: str = ""


@dataclass(frozen=True)
class ReplicaView:
    container_id: str  # the container (local) or the Swarm task (swarm)
    name: str
    index: int
    state: ReplicaState
    started_at: datetime | None
    restarts: int
    address: str
    node: str = ""  # the cluster node it runs on (swarm); empty on one engine


@dataclass(frozen=True)
class BindingView:
    binding: common_pb2.Binding = field(repr=False)
    status: BindingState
    desired: int
    replicas: tuple[ReplicaView, ...]


class EndpointBroadcast:
    """Latest-value broadcast of the endpoint sets.

    Nothing is delivered until the runtime calls :meth:`mark_complete` after
    its first complete observation of the engine (replicas listed and
    probed): a scheduler that just took the lease would otherwise stream an
    empty set and the routers would empty their pools."""

    def __init__(self) -> None:
        self._value: tuple[EndpointSet, ...] = ()
        self._complete = False
        self._queues: set[asyncio.Queue[tuple[EndpointSet, ...] | None]] = set()

    @property
    def current(self) -> tuple[EndpointSet, ...]:
        return self._value

    @property
    def complete(self) -> bool:
        """True once the runtime has observed the engine completely."""
        return self._complete

    def publish(self, value: tuple[EndpointSet, ...]) -> bool:
        if value == self._value:
            return False
        self._value = value
        if self._complete:
            for queue in self._queues:
                self._offer(queue, value)
        return True

    def mark_complete(self) -> None:
        """The first complete observation is published: subscribers waiting
        for it get the current value (even an empty one)."""
        if self._complete:
            return
        self._complete = True
        for queue in self._queues:
            self._offer(queue, self._value)

    def close(self) -> None:
        for queue in self._queues:
            self._offer(queue, None)

    @staticmethod
    def _offer(queue: asyncio.Queue[tuple[EndpointSet, ...] | None], value: tuple[EndpointSet, ...] | None) -> None:
        while not queue.empty():  # only the latest value matters
            queue.get_nowait()
        queue.put_nowait(value)

    async def subscribe(self) -> AsyncIterator[tuple[EndpointSet, ...]]:
        queue: asyncio.Queue[tuple[EndpointSet, ...] | None] = asyncio.Queue(maxsize=1)
        self._queues.add(queue)
        try:
            if self._complete:
                yield self._value
            while True:
                value = await queue.get()
                if value is None:
                    return
                yield value
        finally:
            self._queues.discard(queue)


class Runtime(Protocol):
    """What the servicer and the app need of a runtime."""

    endpoints: EndpointBroadcast

    async def run(self) -> None: ...

    async def close(self) -> None: ...

    def wake(self) -> None: ...

    def report_load(self, loads: Mapping[BindingKey, tuple[int, int]], reporter: str = "") -> None: ...

    def activate(self, key: BindingKey) -> None: ...

    async def resume_paused(self, key: BindingKey) -> bool: ...

    async def status(self, deployment_id: str) -> list[BindingView]: ...

    def binding_status(self, key: BindingKey) -> BindingState | None: ...


def binding_state(
    b: common_pb2.Binding, want: int, replicas: tuple[ReplicaView, ...], problem: EventKind | None
) -> BindingState:
    """A binding's status from its replicas (pure). ``problem``: the kind of
    the binding's standing failure, if any (a pull or scheduling failure
    without enough ready replicas makes it ``failed``)."""
    if is_terminated(b):
        return BindingState.TERMINATED
    live = [r for r in replicas if r.state in (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY,
                                               ReplicaState.UNHEALTHY)]
    ready = len({r.index for r in replicas if r.state is ReplicaState.READY})
    if want == 0:
        return BindingState.RUNNING if live and ready else BindingState.SCALED_TO_ZERO
    if not live and not ready and any(r.state is ReplicaState.PAUSED for r in replicas):
        # Every replica it keeps is paused: present, resumed on the next
        # request (``scaled_to_zero`` stays the word for stopped replicas).
        return BindingState.RUNNING
    if ready >= max(1, b.min_replicas):
        return BindingState.RUNNING  # at least min ready (autoscaling may be adding more)
    if problem in (EventKind.IMAGE_PULL_ERROR, EventKind.SCHEDULING_FAILURE):
        return BindingState.FAILED
    crash_looping = any(r.state is ReplicaState.FAILED for r in replicas)
    if crash_looping:
        return BindingState.DEGRADED if ready else BindingState.FAILED
    if ready or any(r.state in (ReplicaState.UNHEALTHY, ReplicaState.EXITED) for r in replicas):
        return BindingState.DEGRADED
    return BindingState.DEPLOYING


class ScalingRuntime:
    """The part of a runtime both implementations share: the wake-up of the
    loop, the routers' load signal, activations and the replica count each
    binding wants (bounds, autoscaling, keep-warm). A subclass provides
    ``_slots``: the replica slots each binding occupies on its engine now,
    the count the autoscaler starts from."""

    def __init__(self, table: DesiredTable, config: SchedulerConfig) -> None:
        self._table = table
        self.config = config
        self.load = LoadTracker(
            ScalePolicy(
                target_concurrency=config.target_concurrency,
                scale_down_window=config.scale_down_window,
                idle_window=config.idle_window,
            )
        )
        self._in_flight_by_reporter: dict[str, tuple[float, dict[BindingKey, int]]] = {}
        self.endpoints = EndpointBroadcast()
        self._wake = asyncio.Event()
        self._desired: dict[BindingKey, int] = {}
        # The paused tier: when each binding last had a request in flight
        # (summed over the reporters), one completed, or an activation (the
        # tracker's clock); and whether the host is short of memory (set by
        # a runtime that pauses, each pass).
        self._busy_at: dict[BindingKey, float] = {}
        self._memory_low = False

    # A runtime that can pause replicas (the local one: ``docker pause``).
    # One that cannot (Swarm) stops an idle binding after the pause window.
    PAUSES = False

    @property
    def _slots(self) -> dict[BindingKey, int]:
        raise NotImplementedError

    def wake(self) -> None:
        self._wake.set()

    async def reconcile_once(self) -> object:
        """One level-triggered pass: observe, plan, execute."""
        raise NotImplementedError

    def _engine_unreachable(self, message: str) -> None:
        raise NotImplementedError

    async def _reconcile_forever(self) -> None:
        """Passes until cancelled: at once on a wake-up, else every tick. A
        failed pass is logged and the next one starts again from what it
        observes then; a lost lease only means this instance does not lead."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except LeaseLost as exc:
                log.info("not_leading", extra={"error": exc.message})
            except da.EngineUnavailable as exc:
                self._engine_unreachable(exc.message)
            except da.EngineError as exc:
                log.warning("reconcile_failed", extra={"error": exc.message})
            except Exception:
                log.exception("reconcile_crashed")
            await self._sleep_until_woken()

    async def _sleep_until_woken(self) -> None:
        """Waits for a wake-up or the reconcile interval, whichever is first."""
        try:
            # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races the wake-up, gh-86296, and the loop never stops)
            async with asyncio.timeout(self.config.reconcile_interval):
                await self._wake.wait()
        except TimeoutError:
            pass

    # -- load signal --------------------------------------------------------
    def report_load(self, loads: Mapping[BindingKey, tuple[int, int]], reporter: str = "") -> None:
        """A router's report of (in flight, requests completed since its last
        report) per binding; a known binding absent from it had none there.
        Several routers (or router worker processes) report separately: the
        load recorded is the in-flight count summed over every reporter heard
        from within ``REPORTER_TTL`` and this report's completed requests
        (each counted once). Wakes the loop when a binding now wants more
        replicas."""
        now = time.monotonic()
        self._in_flight_by_reporter[reporter] = (now, {k: v[0] for k, v in loads.items()})
        in_flight: dict[BindingKey, int] = {}
        for name, (heard_at, counts) in list(self._in_flight_by_reporter.items()):
            if now - heard_at > REPORTER_TTL:
                del self._in_flight_by_reporter[name]  # gone (or restarted under another name)
                continue
            for key, count in counts.items():
                in_flight[key] = in_flight.get(key, 0) + count
        full = {}
        for b in self._table.bindings():
            key = binding_key(b)
            full[key] = (in_flight.get(key, 0), loads[key][1] if key in loads else 0)
        self.load.report(full)
        busy_now = self.load.now()
        for key, (flying, completed) in full.items():
            if flying > 0 or completed > 0:
                self._busy_at[key] = busy_now
        for key in [k for k in self._busy_at if k not in full]:
            del self._busy_at[key]  # no longer in the table
        slots = self._slots
        for b in self._table.bindings():
            key = binding_key(b)
            if is_terminated(b) or key not in self._desired:
                continue
            if self._decide(b, slots.get(key, 0)) != self._desired[key]:
                self.wake()
                return

    def activate(self, key: BindingKey) -> None:
        """A request is waiting for this binding: at least one replica now."""
        self.load.activate(key)
        self._busy_at[key] = self.load.now()
        self.wake()

    async def resume_paused(self, key: BindingKey) -> bool:
        """Unpauses the binding's paused replicas now and returns once one
        answers (True), for ``Activate``; False when it had none paused (or
        this runtime cannot pause)."""
        return False

    def _decide(self, b: common_pb2.Binding, slots: int) -> int:
        if is_terminated(b):
            return 0
        minimum = 0 if self._cooled(b) else b.min_replicas
        key = binding_key(b)
        pause_after, stop_after = self._idle_windows(b)
        want = self.load.decide(key, Bounds(minimum, b.max_replicas), slots, idle_window=stop_after)
        if minimum > 0:
            return want
        idle = self._idle_for(key)
        if want == 0 and slots > 0 and idle < stop_after and b.max_replicas > 0:
            want = 1  # busy within the stop window (beyond the tracker's samples): kept, maybe paused
        if want > 0 and pause_after is not None and self._memory_low and idle >= pause_after:
            want = 0  # paused, and the host needs the memory: stopped now
        return want

    def _idle_windows(self, b: common_pb2.Binding) -> tuple[float | None, float]:
        """(pause window or None when this binding is not paused, stop
        window) in seconds: the binding's own, else the scheduler's."""
        pause = float(getattr(b, "idle_pause_seconds", 0) or self.config.idle_pause)
        stop = float(getattr(b, "idle_stop_seconds", 0) or self.config.idle_window)
        pausing = 0 < pause < stop
        if not pausing:
            return None, stop
        if not self.PAUSES:
            return None, pause  # cannot pause here: stopped when it would be paused
        return pause, stop

    def _idle_for(self, key: BindingKey) -> float:
        """Seconds since the binding was last busy, counted from this
        process's start at most (what happened before it is unknown)."""
        since = max(self._busy_at.get(key, self.load.observing_since), self.load.observing_since)
        return self.load.now() - since

    def _rest(self, b: common_pb2.Binding) -> Rest:
        """The paused tier's wish for a live binding: ``PAUSE`` once it has
        been idle (nothing in flight on any router, nothing completed, no
        activation) for its whole pause window, ``WAKE`` after activity
        since this process started or when it is not to be paused at all,
        else ``KEEP`` (just after a restart: paused ones stay paused)."""
        pause_after, _ = self._idle_windows(b)
        if pause_after is None or is_terminated(b) or (b.min_replicas > 0 and not self._cooled(b)):
            return Rest.WAKE
        key = binding_key(b)
        if self._idle_for(key) >= pause_after:
            return Rest.PAUSE
        if key in self._busy_at and self._busy_at[key] >= self.load.observing_since:
            return Rest.WAKE
        return Rest.KEEP

    def _cooled(self, b: common_pb2.Binding) -> bool:
        """Not serving, and past the keep-warm window since its last change."""
        if b.serving or not b.HasField("updated_at") or b.updated_at.seconds <= 0:
            return False
        return time.time() - b.updated_at.ToSeconds() >= self.config.keep_warm
