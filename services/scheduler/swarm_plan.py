"""The Swarm convergence plan: a pure function of desired and observed state.

On a Swarm cluster each binding is one Swarm service (labelled like the
local runtime's containers, see ``swarm_adapter``). Swarm places, restarts
and reschedules its tasks; Berth decides what the service runs (its spec
hash) and how many replicas it has (the autoscaler's count).

``plan()`` compares ``DesiredService`` per binding with the services this
instance owns (``ObservedService``, listed by label on every pass) and
returns a ``SwarmPlan``: services to create, to update (new spec: Swarm
rolls the tasks start-first), to scale, and to remove. It performs no I/O.

Rules (per binding):
- no service and replicas wanted with a resolvable spec: create it;
- no service and nothing wanted (or the spec cannot be resolved): nothing;
- a service whose spec hash differs from the resolved one: update it (spec
  and replica count in one update);
- a service with the right spec and another replica count: scale it;
- the spec cannot be resolved now (image not runnable, secrets unavailable):
  keep the spec that runs, only the replica count follows the autoscaler;
- several services for one binding (left by a crash or a second scheduler):
  keep one — the one already running the desired spec, else the one with
  the most replicas, else the lowest id — and remove the others;
- services of bindings absent from the desired table are removed, but only
  once the desired table holds a complete snapshot; before that nothing is
  ever removed.
A converged state yields an empty plan (idempotence).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from .plan import BindingKey


class ServiceRemoveReason(str, Enum):
    ORPHAN = "orphan"  # binding absent from the desired table
    DUPLICATE = "duplicate"


class UpdateReason(str, Enum):
    SPEC = "spec"  # new image, config or secrets: Swarm rolls the tasks


@dataclass(frozen=True)
class DesiredService:
    key: BindingKey
    replicas: int
    # None: the spec cannot be resolved right now: keep what runs.
    spec_hash: str | None


@dataclass(frozen=True)
class ObservedService:
    service_id: str
    name: str
    key: BindingKey
    spec_hash: str
    replicas: int


@dataclass(frozen=True)
class CreateService:
    key: BindingKey
    replicas: int


@dataclass(frozen=True)
class UpdateService:
    service_id: str
    key: BindingKey
    replicas: int
    reason: UpdateReason = UpdateReason.SPEC


@dataclass(frozen=True)
class ScaleService:
    service_id: str
    key: BindingKey
    replicas: int
    previous: int


@dataclass(frozen=True)
class RemoveService:
    service_id: str
    name: str
    key: BindingKey
    reason: ServiceRemoveReason


@dataclass(frozen=True)
class SwarmPlan:
    creates: tuple[CreateService, ...] = ()
    updates: tuple[UpdateService, ...] = ()
    scales: tuple[ScaleService, ...] = ()
    removes: tuple[RemoveService, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.creates or self.updates or self.scales or self.removes)


def plan(
    desired: Iterable[DesiredService], observed: Iterable[ObservedService], *, snapshot_complete: bool
) -> SwarmPlan:
    """What to create, update, scale and remove; see the module docstring."""
    wanted = {d.key: d for d in desired}
    by_key: dict[BindingKey, list[ObservedService]] = defaultdict(list)
    for service in observed:
        by_key[service.key].append(service)

    creates: list[CreateService] = []
    updates: list[UpdateService] = []
    scales: list[ScaleService] = []
    removes: list[RemoveService] = []

    for key in sorted(set(wanted) | set(by_key)):
        services = by_key.get(key, [])
        want = wanted.get(key)
        if want is None:
            removes.extend(_remove(s, ServiceRemoveReason.ORPHAN) for s in services)
            continue
        if not services:
            if want.replicas > 0 and want.spec_hash is not None:
                creates.append(CreateService(key=key, replicas=want.replicas))
            continue
        keep = min(
            services,
            key=lambda s: (s.spec_hash != want.spec_hash, -s.replicas, s.service_id),
        )
        removes.extend(_remove(s, ServiceRemoveReason.DUPLICATE) for s in services if s is not keep)
        if want.spec_hash is not None and keep.spec_hash != want.spec_hash:
            updates.append(UpdateService(service_id=keep.service_id, key=key, replicas=want.replicas))
        elif keep.replicas != want.replicas:
            scales.append(
                ScaleService(service_id=keep.service_id, key=key, replicas=want.replicas, previous=keep.replicas)
            )

    if not snapshot_complete:
        removes = []  # nothing is removed before the desired table is whole
    return SwarmPlan(
        creates=tuple(creates),
        updates=tuple(updates),
        scales=tuple(scales),
        removes=tuple(sorted(removes, key=lambda r: (r.key, r.service_id))),
    )


def _remove(s: ObservedService, reason: ServiceRemoveReason) -> RemoveService:
    return RemoveService(service_id=s.service_id, name=s.name, key=s.key, reason=reason)
