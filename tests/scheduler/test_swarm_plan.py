"""The Swarm runtime's pure parts, on plain data: the service plan (table
driven, like test_plan.py), the task-state mapping, which tasks status
shows, the service spec sent to Swarm, image references, and the watch
folding a manager's reports (a fake one) into events."""
from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from berth import images
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.runtime import ReplicaState, SchedulerConfig
from services.scheduler.swarm_adapter import (
    EPOCH_LABEL,
    NodeInfo,
    ServiceDefinition,
    ServiceInfo,
    TaskInfo,
    _node_info,
    _task_info,
    service_body,
)
from services.scheduler.swarm_plan import (
    CreateService,
    DesiredService,
    ObservedService,
    RemoveService,
    ScaleService,
    ServiceRemoveReason,
    SwarmPlan,
    UpdateService,
    plan,
)
from services.scheduler.swarm_runtime import SwarmRuntime, current_tasks, restarts_in_slot, service_name, task_state

A = ("env_a", "dep_1")
B = ("env_b", "dep_1")


def svc(service_id: str, key: tuple[str, str], spec: str, replicas: int) -> ObservedService:
    return ObservedService(service_id=service_id, name=f"n-{service_id}", key=key, spec_hash=spec, replicas=replicas)


CASES = [
    ("nothing runs, two wanted: create", [DesiredService(A, 2, "h1")], [],
     SwarmPlan(creates=(CreateService(A, 2),))),
    ("nothing runs, none wanted: nothing", [DesiredService(A, 0, "h1")], [], SwarmPlan()),
    ("nothing runs, spec unresolvable: nothing", [DesiredService(A, 2, None)], [], SwarmPlan()),
    ("converged: empty plan", [DesiredService(A, 2, "h1")], [svc("s1", A, "h1", 2)], SwarmPlan()),
    ("more wanted: scale up", [DesiredService(A, 5, "h1")], [svc("s1", A, "h1", 2)],
     SwarmPlan(scales=(ScaleService("s1", A, 5, previous=2),))),
    ("fewer wanted: scale down", [DesiredService(A, 1, "h1")], [svc("s1", A, "h1", 3)],
     SwarmPlan(scales=(ScaleService("s1", A, 1, previous=3),))),
    ("scaled to zero keeps the service", [DesiredService(A, 0, None)], [svc("s1", A, "h1", 2)],
     SwarmPlan(scales=(ScaleService("s1", A, 0, previous=2),))),
    ("new spec: one update carries spec and count", [DesiredService(A, 3, "h2")], [svc("s1", A, "h1", 2)],
     SwarmPlan(updates=(UpdateService("s1", A, 3),))),
    ("spec unresolvable: keep it, follow the count", [DesiredService(A, 4, None)], [svc("s1", A, "h1", 2)],
     SwarmPlan(scales=(ScaleService("s1", A, 4, previous=2),))),
    ("orphan removed", [], [svc("s1", A, "h1", 2)],
     SwarmPlan(removes=(RemoveService("s1", "n-s1", A, ServiceRemoveReason.ORPHAN),))),
    ("duplicate: the one on the desired spec stays",
     [DesiredService(A, 2, "h2")], [svc("s1", A, "h1", 2), svc("s2", A, "h2", 2)],
     SwarmPlan(removes=(RemoveService("s1", "n-s1", A, ServiceRemoveReason.DUPLICATE),))),
    ("duplicate on one spec: the larger stays, then the lower id",
     [DesiredService(A, 3, "h1")], [svc("s2", A, "h1", 3), svc("s1", A, "h1", 1), svc("s3", A, "h1", 3)],
     SwarmPlan(removes=(RemoveService("s1", "n-s1", A, ServiceRemoveReason.DUPLICATE),
                        RemoveService("s3", "n-s3", A, ServiceRemoveReason.DUPLICATE)))),
    ("two bindings of one deployment are two services",
     [DesiredService(A, 1, "h1"), DesiredService(B, 2, "h9")], [svc("s1", A, "h1", 1)],
     SwarmPlan(creates=(CreateService(B, 2),))),
]


@pytest.mark.parametrize(("desired", "observed", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(desired: list[DesiredService], observed: list[ObservedService], expected: SwarmPlan) -> None:
    assert plan(desired, observed, snapshot_complete=True) == expected


def test_nothing_is_removed_before_the_snapshot_is_complete() -> None:
    result = plan([DesiredService(A, 2, "h1")], [svc("s1", A, "h1", 1), svc("s2", B, "h1", 1), svc("s3", A, "h0", 1)],
                  snapshot_complete=False)
    assert result.removes == ()
    assert result.scales == (ScaleService("s1", A, 2, previous=1),)


def test_applying_a_plan_converges_to_an_empty_one() -> None:
    desired = [DesiredService(A, 3, "h2"), DesiredService(B, 0, "h1")]
    observed = [svc("s1", A, "h1", 1), svc("s9", ("env_x", "dep_9"), "h", 1), svc("s2", B, "h1", 2)]
    first = plan(desired, observed, snapshot_complete=True)
    assert not first.empty
    # What the engine holds once the plan ran:
    after = [svc("s1", A, "h2", 3), svc("s2", B, "h1", 0)]
    assert plan(desired, after, snapshot_complete=True).empty


# -- tasks ---------------------------------------------------------------------------------------------------------
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def task(tid: str, slot: int, state: str, desired: str = "running", *, service: str = "s1", age: int = 0,
         node: str = "n1") -> TaskInfo:
    return TaskInfo(id=tid, service_id=service, node_id=node, slot=slot, state=state, desired_state=desired,
                    message="", error="", timestamp=T0, created_at=T0 + timedelta(seconds=age), host_ports={8080: 30001})


@pytest.mark.parametrize(
    ("state", "desired", "ready", "ever", "node_up", "expected"),
    [
        ("pending", "running", False, False, True, ReplicaState.PENDING),
        ("preparing", "running", False, False, True, ReplicaState.PENDING),
        ("starting", "running", False, False, True, ReplicaState.STARTING),
        ("running", "running", False, False, True, ReplicaState.STARTING),
        ("running", "running", True, True, True, ReplicaState.READY),
        ("running", "running", False, True, True, ReplicaState.UNHEALTHY),
        ("running", "running", True, True, False, ReplicaState.UNHEALTHY),  # its node is down
        ("running", "shutdown", True, True, True, ReplicaState.STOPPING),  # being replaced
        ("rejected", "shutdown", False, False, True, ReplicaState.FAILED),
        ("failed", "shutdown", False, True, True, ReplicaState.FAILED),
        ("shutdown", "shutdown", False, True, True, ReplicaState.EXITED),
        ("complete", "shutdown", False, True, True, ReplicaState.EXITED),
    ],
)
def test_task_state(state: str, desired: str, ready: bool, ever: bool, node_up: bool, expected: ReplicaState) -> None:
    assert task_state(task("t", 1, state, desired), ready=ready, ever_ready=ever, node_up=node_up) is expected


def test_status_shows_wanted_and_stopping_tasks_and_counts_earlier_ones() -> None:
    tasks = [
        task("old1", 1, "failed", "shutdown", age=0),
        task("old2", 1, "shutdown", "shutdown", age=1),
        task("cur1", 1, "running", age=2),
        task("cur2", 2, "running", age=0),
        task("gone3", 3, "shutdown", "shutdown", age=0),  # scaled away: not shown
        task("stop4", 4, "running", "shutdown", age=0),  # being stopped: shown (stopping)
    ]
    shown = current_tasks(tasks)
    assert sorted(t.id for t in shown) == ["cur1", "cur2", "stop4"]
    on_a_down_node = current_tasks(tasks, node_up=lambda node: node != "n1")
    assert sorted(t.id for t in on_a_down_node) == ["cur1", "cur2"]
    assert restarts_in_slot(tasks, tasks[2]) == 2
    assert restarts_in_slot(tasks, tasks[3]) == 0


def test_task_and_node_from_engine_json() -> None:
    t = _task_info({
        "ID": "t1", "ServiceID": "s1", "NodeID": "n1", "Slot": 2, "DesiredState": "running",
        "CreatedAt": "2026-01-01T00:00:00.123456789Z",
        "Spec": {"ContainerSpec": {"Labels": {"berth.spec-hash": "h1"}}},
        "Status": {"State": "rejected", "Message": "preparing", "Err": "No such image: r/x@sha256:00",
                   "Timestamp": "2026-01-01T00:00:01Z",
                   "PortStatus": {"Ports": [{"TargetPort": 8080, "PublishedPort": 30005, "PublishMode": "host"},
                                            {"TargetPort": 8080, "PublishedPort": 30005, "PublishMode": "host"}]}},
    })
    assert (t.slot, t.state, t.error, t.host_ports, t.spec_hash) == (2, "rejected", "No such image: r/x@sha256:00",
                                                                     {8080: 30005}, "h1")
    manager = _node_info({"ID": "n1", "Description": {"Hostname": "bsw-1"}, "Spec": {"Availability": "active"},
                          "Status": {"State": "ready", "Addr": "0.0.0.0"},
                          "ManagerStatus": {"Addr": "10.201.3.11:2377"}})
    assert (manager.hostname, manager.address, manager.state) == ("bsw-1", "10.201.3.11", "ready")


# -- the service spec ----------------------------------------------------------------------------------------------
def test_service_body_is_dnsrr_host_ports_start_first_and_carries_the_epoch() -> None:
    d = ServiceDefinition(
        name="berth-i-env-a-dep-1", image="10.0.0.1:5000/app@sha256:" + "a" * 64,
        labels={"berth.managed": "true"}, container_labels={"berth.managed": "true"},
        environment={"PORT": "9000", "TOKEN": "s3cret"}, command=("serve", "--fast"), port=9000, replicas=3,
        mem_limit=64 << 20, nano_cpus=500_000_000, stop_grace=2, restart_delay=0, update_monitor=1,
    )
    body = service_body(d, epoch=7)
    assert body["labels"] == {"berth.managed": "true", EPOCH_LABEL: "7"}
    assert body["endpoint_spec"] == {"Mode": "dnsrr",
                                     "Ports": [{"Protocol": "tcp", "TargetPort": 9000, "PublishMode": "host"}]}
    assert body["mode"] == {"Replicated": {"Replicas": 3}}
    assert body["update_config"]["Order"] == "start-first"
    assert body["update_config"]["Monitor"] == 1_000_000_000
    template = body["task_template"]
    assert template["RestartPolicy"] == {"Condition": "any", "Delay": 0, "MaxAttempts": 0, "Window": 0}
    assert template["ContainerSpec"]["Image"] == d.image
    assert template["ContainerSpec"]["Args"] == ["serve", "--fast"]
    assert template["ContainerSpec"]["Env"] == ["PORT=9000", "TOKEN=s3cret"]
    assert template["Resources"]["Limits"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20}
    assert template["Resources"]["Reservations"] == {"MemoryBytes": 64 << 20}
    assert "s3cret" not in repr(d)
    assert EPOCH_LABEL not in service_body(d, epoch=None)["labels"]


def test_service_names_are_dns_labels() -> None:
    name = service_name("a1b2c3", "env_0123456789ab", "dep_0123456789ab")
    assert name == "berth-a1b2c3-env-0123456789ab-dep-0123456789ab"
    assert len(service_name("x" * 40, "env_0123456789ab", "dep_0123456789ab")) <= 63


# -- image references ----------------------------------------------------------------------------------------------
DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("ref", "registry", "repository", "tag", "digest"),
    [
        ("10.201.3.1:5000/berth/app@" + DIGEST, "10.201.3.1:5000", "berth/app", "", DIGEST),
        ("localhost:5000/app:1.2", "localhost:5000", "app", "1.2", ""),
        ("registry.example/team/app", "registry.example", "team/app", "latest", ""),
        ("busybox", images.DEFAULT_REGISTRY, "library/busybox", "latest", ""),
        ("team/app:v2", images.DEFAULT_REGISTRY, "team/app", "v2", ""),
    ],
)
def test_parse_reference(ref: str, registry: str, repository: str, tag: str, digest: str) -> None:
    r = images.parse(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repository, tag, digest)
    assert r.by_digest == bool(digest)


def test_with_digest_keeps_the_registry() -> None:
    assert images.parse("10.0.0.1:5000/app:1").with_digest(DIGEST) == f"10.0.0.1:5000/app@{DIGEST}"
    assert images.parse("team/app:1").with_digest(DIGEST) == f"team/app@{DIGEST}"


@pytest.mark.parametrize("ref", ["app@sha256:short", "Bad/Upper", ""])
def test_bad_references_are_refused(ref: str) -> None:
    with pytest.raises(ValueError):
        images.parse(ref)


# -- the watch's folding of Swarm's reports into events (a fake manager) -------------------------------------------
class FakeManager:
    """Stands in for SwarmAdapter's reads: what a manager would list."""

    def __init__(self) -> None:
        self.services: list[ServiceInfo] = []
        self.tasks: list[TaskInfo] = []
        self.nodes: list[NodeInfo] = []

    async def list_services(self, instance: str, extra: object = None) -> list[ServiceInfo]:
        return list(self.services)

    async def list_tasks(self, service_ids: object) -> list[TaskInfo]:
        return list(self.tasks)

    async def list_nodes(self) -> list[NodeInfo]:
        return list(self.nodes)


def watched() -> tuple[SwarmRuntime, FakeManager, EventStore]:
    manager = FakeManager()
    labels = {"berth.managed": "true", "berth.instance": "i", "berth.project": "p", "berth.environment": "env_a",
              "berth.deployment": "dep_1", "berth.port": "8080", "berth.health-path": "/"}
    manager.services = [ServiceInfo(id="s1", name="berth-i-env-a-dep-1", labels=labels, replicas=3, version=1,
                                    created_at=T0)]
    manager.nodes = [NodeInfo(id=f"n{i}", hostname=f"node-{i}", address="127.0.0.1", state="ready",
                              availability="active") for i in (1, 2, 3)]
    events = EventStore()
    runtime = SwarmRuntime(manager, DesiredTable(), None, events, SchedulerConfig(instance="i"))  # type: ignore[arg-type]
    return runtime, manager, events


def kinds(events: EventStore) -> list[tuple[str, str, int]]:
    return sorted((e.kind, e.replica, e.count) for e in events.list("dep_1"))


def test_a_node_going_down_is_one_node_down_event_listing_the_replicas_it_took() -> None:
    runtime, manager, events = watched()
    manager.tasks = [task("t1", 1, "running", node="n1"), task("t2", 2, "running", node="n2"),
                     task("t3", 3, "running", node="n2")]

    async def scenario() -> None:
        await runtime.observe()
        assert kinds(events) == []
        manager.nodes[1] = dataclasses.replace(manager.nodes[1], state="down")
        await runtime.observe()
        await runtime.observe()  # still down: not recorded again
        [event] = events.list("dep_1")
        assert event.kind == "node_down" and event.replica == "node-2" and event.count == 1
        assert "replica 2 (task t2)" in event.message and "replica 3 (task t3)" in event.message
        assert "replica 1" not in event.message
        manager.nodes[1] = dataclasses.replace(manager.nodes[1], state="ready")
        await runtime.observe()
        manager.nodes[1] = dataclasses.replace(manager.nodes[1], state="down")
        await runtime.observe()  # a second outage: counted
        assert kinds(events) == [("node_down", "node-2", 2)]

    asyncio.run(scenario())


def test_pending_on_no_suitable_node_and_a_slot_that_keeps_failing_are_folded_events() -> None:
    runtime, manager, events = watched()
    pending = dataclasses.replace(task("t9", 1, "pending"), error="no suitable node (insufficient resources on 3 nodes)")
    failed = [dataclasses.replace(task(f"f{i}", 2, "failed", "shutdown", age=i), error="task: non-zero exit (1)",
                                  exit_code=1) for i in range(3)]
    manager.tasks = [pending, *failed]

    async def scenario() -> None:
        await runtime.observe()
        await runtime.observe()  # the same reports again: nothing new
        found = {e.kind: e for e in events.list("dep_1")}
        assert set(found) == {"scheduling_failure", "crash_loop"}
        assert found["scheduling_failure"].count == 1
        assert "no suitable node (insufficient resources on 3 nodes)" in found["scheduling_failure"].message
        assert found["crash_loop"].replica == "2" and "exit code 1" in found["crash_loop"].message

    asyncio.run(scenario())


def test_a_reference_without_a_registry_host_is_never_looked_up() -> None:
    # No host is guessed: the digest of "busybox:1" cannot be resolved, and
    # nothing is sent anywhere to find out.
    with pytest.raises(images.RegistryError, match="names no registry host"):
        images.resolve_digest("busybox:1")
    assert images.pull_problem("team/app:v2") is not None
    assert images.parse("busybox").with_digest(DIGEST) == "library/busybox@" + DIGEST
