"""The convergence plan: a pure function of desired and observed state.

``plan()`` looks at what should run (``DesiredReplicas`` per binding) and what
the engine reports (``ObservedReplica`` per managed container of this
instance) and returns a ``Plan`` value: which replicas to create and which
containers to remove. It performs no I/O; the reconciler executes the plan.

Rules (per binding, per replica index):
- indexes ``>= desired`` are removed, highest index first (scale down);
- exited/dead/never-started containers are removed and, when the index is
  still wanted, recreated; while the restart backoff holds a slot its exited
  container is kept: it is the record (labels, finish time) the backoff and
  the restart count are derived from, so they survive a scheduler restart.
  The replacement carries ``restarts + 1`` and the consecutive quick-crash
  count in its labels;
- a live container whose spec hash differs from the desired one is replaced
  start-new-then-stop-old: a new container is created under the next
  generation, and the stale one is removed only once a current one is ready,
  so a binding never drops below the replicas it had ready;
- duplicates at one index (e.g. left by a crash mid-replace) keep the best one;
- containers of bindings absent from the desired table are removed, but only
  once the desired table holds a complete snapshot; before that nothing is
  ever removed;
- the paused tier (``DesiredReplicas.rest``): a binding told to ``PAUSE``
  (idle past its pause window, no request in flight) gets its kept replica
  at each wanted index paused once that replica is current, running and
  ready (never one still starting, never a stale one being replaced); a
  binding told to ``WAKE`` (load or an activation) gets every paused
  replica at a wanted index unpaused; ``KEEP`` (nothing known yet, e.g.
  just after a restart) leaves running ones running and paused ones paused.
  A paused replica is a live replica of its slot, never a crash. Stopping
  a paused binding is a scale-down (its count goes to 0 after the stop
  window, or when the host runs short of memory).
A converged state yields an empty plan (idempotence).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

BindingKey = tuple[str, str]  # (environment_id, deployment_id)
SlotKey = tuple[str, str, int]  # (environment_id, deployment_id, replica index)


class ContainerStatus(str, Enum):
    """Docker's ``State.Status`` values."""

    CREATED = "created"
    RUNNING = "running"
    RESTARTING = "restarting"
    PAUSED = "paused"
    REMOVING = "removing"
    EXITED = "exited"
    DEAD = "dead"

    @classmethod
    def parse(cls, value: str) -> ContainerStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.DEAD


LIVE = frozenset({ContainerStatus.RUNNING, ContainerStatus.RESTARTING, ContainerStatus.PAUSED})
GONE = frozenset({ContainerStatus.EXITED, ContainerStatus.DEAD, ContainerStatus.CREATED})


class RemoveReason(str, Enum):
    SCALE_DOWN = "scale_down"
    ORPHAN = "orphan"  # binding absent from the desired table
    REPLACED = "replaced"  # stale spec, a current replica is ready
    EXITED = "exited"  # exited/dead: a restart when the index is still wanted
    NEVER_STARTED = "never_started"  # left in "created"
    DUPLICATE = "duplicate"


class Rest(str, Enum):
    """What the paused tier wants of a binding's replicas."""

    KEEP = "keep"  # leave running ones running and paused ones paused
    PAUSE = "pause"  # idle past the pause window: freeze the ready ones
    WAKE = "wake"  # load or an activation: unpause the paused ones


class PauseReason(str, Enum):
    IDLE = "idle"  # no request in flight and none completed for the pause window


class UnpauseReason(str, Enum):
    ACTIVE = "active"  # load or an activation since it was paused


class CreateReason(str, Enum):
    MISSING = "missing"
    REPLACE = "replace"
    RECREATE = "recreate"


@dataclass(frozen=True)
class DesiredReplicas:
    key: BindingKey
    count: int
    # None: the spec cannot be resolved right now (image pull failed, secrets
    # unavailable): keep what runs, create nothing.
    spec_hash: str | None
    rest: Rest = Rest.KEEP


@dataclass(frozen=True)
class ObservedReplica:
    container_id: str
    name: str
    key: BindingKey
    index: int
    generation: int
    spec_hash: str
    status: ContainerStatus
    ready: bool = False
    restarts: int = 0  # label berth.restarts
    # For an exited container: the quick-crash count its replacement inherits
    # and the time (same clock as ``now``) before which it is not replaced.
    next_crashes: int = 0
    not_before: float = 0.0


@dataclass(frozen=True)
class Create:
    key: BindingKey
    index: int
    generation: int
    reason: CreateReason
    restarts: int = 0
    crashes: int = 0


@dataclass(frozen=True)
class Remove:
    container_id: str
    name: str
    key: BindingKey
    index: int
    reason: RemoveReason


@dataclass(frozen=True)
class Pause:
    container_id: str
    name: str
    key: BindingKey
    index: int
    reason: PauseReason


@dataclass(frozen=True)
class Unpause:
    container_id: str
    name: str
    key: BindingKey
    index: int
    reason: UnpauseReason


@dataclass(frozen=True)
class Plan:
    creates: tuple[Create, ...] = ()
    removes: tuple[Remove, ...] = ()
    # Slots held back by the restart backoff (reported, not acted on).
    deferred: tuple[SlotKey, ...] = field(default=())
    pauses: tuple[Pause, ...] = ()
    unpauses: tuple[Unpause, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.creates and not self.removes and not self.pauses and not self.unpauses


def plan(
    desired: Iterable[DesiredReplicas],
    observed: Iterable[ObservedReplica],
    *,
    snapshot_complete: bool,
    now: float = 0.0,
    not_before: Mapping[SlotKey, float] | None = None,
) -> Plan:
    """Computes what to create and remove; see the module docstring."""
    wanted = {d.key: d for d in desired}
    by_key: dict[BindingKey, list[ObservedReplica]] = defaultdict(list)
    for replica in observed:
        if replica.status is ContainerStatus.REMOVING:
            continue  # already going away
        by_key[replica.key].append(replica)
    backoff = not_before or {}

    creates: list[Create] = []
    removes: list[Remove] = []
    deferred: list[SlotKey] = []
    pauses: list[Pause] = []
    unpauses: list[Unpause] = []

    for key in sorted(set(wanted) | set(by_key)):
        replicas = by_key.get(key, [])
        want = wanted.get(key)
        if want is None:
            removes.extend(_remove(r, RemoveReason.ORPHAN) for r in replicas)
            continue
        by_index: dict[int, list[ObservedReplica]] = defaultdict(list)
        for r in replicas:
            by_index[r.index].append(r)
        for index in sorted(set(by_index) | set(range(want.count))):
            here = by_index.get(index, [])
            if index >= want.count:
                removes.extend(_remove(r, RemoveReason.SCALE_DOWN) for r in here)
                continue
            slot_creates, slot_removes, blocked = _converge_slot(want, index, here, now, backoff)
            creates.extend(slot_creates)
            removes.extend(slot_removes)
            if blocked:
                deferred.append((key[0], key[1], index))
            removed = {r.container_id for r in slot_removes}
            slot_pause, slot_unpause = _rest_slot(want, [r for r in here if r.container_id not in removed])
            pauses.extend(slot_pause)
            unpauses.extend(slot_unpause)

    if not snapshot_complete:
        removes = []  # nothing is removed before the desired table is whole
    removes.sort(key=lambda r: (r.key, -r.index, r.container_id))
    creates.sort(key=lambda c: (c.key, c.index))
    return Plan(
        creates=tuple(creates), removes=tuple(removes), deferred=tuple(deferred),
        pauses=tuple(pauses), unpauses=tuple(unpauses),
    )


def _rest_slot(want: DesiredReplicas, kept: list[ObservedReplica]) -> tuple[list[Pause], list[Unpause]]:
    """The paused tier at one wanted slot (``kept``: its replicas the plan
    does not remove)."""
    if want.rest is Rest.WAKE:
        return [], [
            Unpause(r.container_id, r.name, r.key, r.index, UnpauseReason.ACTIVE)
            for r in kept if r.status is ContainerStatus.PAUSED
        ]
    if want.rest is Rest.PAUSE:
        live = [r for r in kept if r.status in LIVE]
        # Only a slot whose every live replica is current (or whose spec
        # cannot be resolved now: what runs is kept as it is): a replacement
        # in progress finishes first (the stale one goes once the new one is ready).
        if live and all(want.spec_hash is None or r.spec_hash == want.spec_hash for r in live):
            return [
                Pause(r.container_id, r.name, r.key, r.index, PauseReason.IDLE)
                for r in live if r.status is ContainerStatus.RUNNING and r.ready
            ], []
    return [], []


def _converge_slot(
    want: DesiredReplicas,
    index: int,
    here: list[ObservedReplica],
    now: float,
    backoff: Mapping[SlotKey, float],
) -> tuple[list[Create], list[Remove], bool]:
    creates: list[Create] = []
    removes: list[Remove] = []
    gone = [r for r in here if r.status in GONE]
    live = [r for r in here if r.status in LIVE]
    latest_gone = max(gone, key=lambda r: r.generation, default=None)
    slot_not_before = max(
        backoff.get((want.key[0], want.key[1], index), 0.0), latest_gone.not_before if latest_gone else 0.0
    )
    held = not live and want.spec_hash is not None and slot_not_before > now

    for r in gone:
        if held and r is latest_gone and r.status is not ContainerStatus.CREATED:
            continue  # kept as the record of the crash until the backoff is due
        why = RemoveReason.NEVER_STARTED if r.status is ContainerStatus.CREATED else RemoveReason.EXITED
        removes.append(_remove(r, why))

    if want.spec_hash is None:
        current, stale = live, []
    else:
        current = [r for r in live if r.spec_hash == want.spec_hash]
        stale = [r for r in live if r.spec_hash != want.spec_hash]

    if current:
        # Keep the best current replica: ready first, then the newest generation.
        keep = max(current, key=lambda r: (r.ready, r.generation))
        removes.extend(_remove(r, RemoveReason.DUPLICATE) for r in current if r is not keep)
        if keep.ready:
            removes.extend(_remove(r, RemoveReason.REPLACED) for r in stale)
        return creates, removes, False

    if want.spec_hash is None:
        return creates, removes, False
    if slot_not_before > now:
        return creates, removes, True
    generation = max((r.generation for r in here), default=-1) + 1
    if stale:
        reason = CreateReason.REPLACE
        restarts, crashes = max(r.restarts for r in stale), 0
    elif latest_gone is not None:
        reason = CreateReason.RECREATE
        restarts, crashes = latest_gone.restarts + 1, latest_gone.next_crashes
    else:
        reason = CreateReason.MISSING
        restarts, crashes = 0, 0
    creates.append(
        Create(key=want.key, index=index, generation=generation, reason=reason, restarts=restarts, crashes=crashes)
    )
    return creates, removes, False


def _remove(r: ObservedReplica, reason: RemoveReason) -> Remove:
    return Remove(container_id=r.container_id, name=r.name, key=r.key, index=r.index, reason=reason)
