"""The swarm runtime on a real 3-node swarm (tests/support/swarm.py): the
scheduler's SwarmRuntime in process, with an in-memory desired table and
fixed secrets (no registry service), driving the cluster's manager.

Deploy by digest (replicas spread over the nodes, reached at node address
and per-task port, status naming the node), idempotence and adoption by a
new runtime (a restarted scheduler, also mid-scale), services it does not
own left alone, a tag refused, an unpullable digest in the errors with the
registry's reason, a killed node: its replicas leave the endpoints, a
node_down event names them, Swarm replaces them on the other nodes, and the
node rejoining duplicates nothing."""
from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import docker
import pytest
from google.protobuf import timestamp_pb2

from berth.v1 import common_pb2
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventKind, EventStore
from services.scheduler.runtime import BindingState, ReplicaState, SchedulerConfig
from services.scheduler.spec import SecretValue
from services.scheduler.swarm_adapter import SwarmAdapter
from services.scheduler.swarm_runtime import SwarmConfig, SwarmRuntime
from tests.support.docker_engine import build_worker_image, engine
from tests.support.swarm import SwarmCluster

pytestmark = [pytest.mark.docker]

CANARY = "canary-swarm-0b1d-not-a-real-secret"


class FixedSecrets:
    def __init__(self, secrets: list[SecretValue]) -> None:
        self.secrets = secrets

    async def resolve(self, project_id: str, environment_id: str) -> list[SecretValue]:
        return list(self.secrets)


@pytest.fixture(scope="module")
def worker_ref(swarm_cluster: SwarmCluster) -> Iterator[str]:
    """A busybox worker built on the main engine, pushed to the cluster's
    registry: its ``REGISTRY/repo@sha256:...``."""
    main = engine()
    tag, _ = build_worker_image(main, version="swarm-rt")
    try:
        yield swarm_cluster.import_image(tag)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            main.images.remove(tag, force=True)


@pytest.fixture
def instance(swarm_cluster: SwarmCluster) -> Iterator[str]:
    """A platform instance of its own per test; its services are removed after."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    api = swarm_cluster.client(0).api
    for s in api.services(filters={"label": f"berth.instance={name}"}):
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_service(s["ID"])


def binding(image: str, *, min_replicas: int, max_replicas: int | None = None, deployment_id: str = "",
            environment_id: str = "") -> common_pb2.Binding:
    return common_pb2.Binding(
        project_id="proj-1", project_name="shop",
        environment_id=environment_id or f"env_{uuid.uuid4().hex[:12]}", environment_name="staging",
        deployment=common_pb2.Deployment(
            id=deployment_id or f"dep_{uuid.uuid4().hex[:12]}", project_id="proj-1", image=image,
            config=common_pb2.WorkerConfig(port=8080, health_path="/cgi-bin/index.cgi",
                                           variables={"SHOW_SECRET": "API_TOKEN"}),
            created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        ),
        min_replicas=min_replicas, max_replicas=max_replicas if max_replicas is not None else min_replicas,
        serving=True,
    )


def runtime(cluster: SwarmCluster, table: DesiredTable, instance: str, events: EventStore | None = None,
            ) -> SwarmRuntime:
    client = docker.DockerClient(base_url=cluster.manager_host, version="1.41", timeout=30)
    config = SchedulerConfig(instance=instance, reconcile_interval=0.5, stop_grace=2.0)
    return SwarmRuntime(SwarmAdapter(client), table, FixedSecrets([SecretValue("API_TOKEN", CANARY, 1)]),
                        events or EventStore(), config,
                        SwarmConfig(watch_interval=0.25, insecure_registries=(cluster.registry,)))


@contextlib.asynccontextmanager
async def running(rt: SwarmRuntime) -> AsyncIterator[SwarmRuntime]:
    task = asyncio.create_task(rt.run())
    try:
        yield rt
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await rt.close()


async def wait_for(condition, *, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last {last!r}")


def addresses(rt: SwarmRuntime, deployment_id: str) -> list[str]:
    return sorted(a for s in rt.endpoints.current if s.deployment_id == deployment_id for a in s.addresses)


def services_of(cluster: SwarmCluster, instance: str, deployment_id: str) -> list[dict]:  # type: ignore[type-arg]
    return cluster.client(0).api.services(
        filters={"label": ["berth.managed=true", f"berth.instance={instance}", f"berth.deployment={deployment_id}"]}
    )


def running_tasks(cluster: SwarmCluster, service_id: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in cluster.client(0).api.tasks(filters={"service": service_id})
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]


def http_get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/cgi-bin/index.cgi", timeout=5) as response:
        return response.read().decode()


def test_deploy_by_digest_spreads_over_nodes_and_adopts_after_restart(swarm_cluster: SwarmCluster, worker_ref: str,
                                                                      instance: str) -> None:
    b = binding(worker_ref, min_replicas=3)
    dep = b.deployment.id
    node_addresses = {n.address for n in swarm_cluster.nodes}
    # A service Berth does not own (no berth.managed), labelled like a binding otherwise.
    foreign = swarm_cluster.client(0).services.create(
        worker_ref, name=f"foreign-{instance}", labels={"berth.instance": instance, "berth.deployment": dep},
        endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
    )

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [b])
        first = runtime(swarm_cluster, table, instance)
        async with running(first):
            ready = await wait_for(lambda: len(addresses(first, dep)) == 3 and addresses(first, dep),
                                   timeout=60, what="3 ready tasks")
        hosts = {a.rsplit(":", 1)[0] for a in ready}
        assert hosts == node_addresses, "one replica on each node"
        for address in ready:
            body = await asyncio.to_thread(http_get, address)
            assert f"deployment={dep}" in body and f"secret={CANARY}" in body
        [service] = services_of(swarm_cluster, instance, dep)
        labels = service["Spec"]["Labels"]
        assert labels["berth.managed"] == "true" and labels["berth.environment"] == b.environment_id
        assert service["Spec"]["EndpointSpec"]["Mode"] == "dnsrr"

        [view] = await first.status(dep)
        assert view.status is BindingState.RUNNING
        assert [r.state for r in view.replicas] == [ReplicaState.READY] * 3
        assert {r.node for r in view.replicas} == {n.name for n in swarm_cluster.nodes}
        assert sorted(r.address for r in view.replicas) == ready

        # Converged: a pass changes nothing; a new runtime (a restarted
        # scheduler) adopts the service as it is.
        assert (await first.reconcile_once()).empty
        second = runtime(swarm_cluster, table, instance)
        assert (await second.reconcile_once()).empty
        await second.observe()
        await wait_for(lambda: addresses(second, dep) == ready, what="the adopted tasks ready again")
        [again] = services_of(swarm_cluster, instance, dep)
        assert again["ID"] == service["ID"] and again["Version"]["Index"] == service["Version"]["Index"]

        # Scaling: the scheduler stops right after asking for 6 (mid-scale);
        # a new one adopts 6 (it starts from the count the service has) and
        # never makes a second service.
        table.upsert_binding(binding(worker_ref, min_replicas=6, deployment_id=dep, environment_id=b.environment_id))
        assert [s.replicas for s in (await second.reconcile_once()).scales] == [6]
        third = runtime(swarm_cluster, table, instance)
        async with running(third):
            await wait_for(lambda: len(addresses(third, dep)) == 6, timeout=60, what="6 ready tasks")
            assert (await third.reconcile_once()).empty
        [scaled] = services_of(swarm_cluster, instance, dep)
        assert scaled["ID"] == service["ID"]
        assert scaled["Spec"]["Mode"]["Replicated"]["Replicas"] == 6
        assert len(running_tasks(swarm_cluster, scaled["ID"])) == 6

        # Lower bounds scale it down.
        table.upsert_binding(binding(worker_ref, min_replicas=2, deployment_id=dep, environment_id=b.environment_id))
        fourth = runtime(swarm_cluster, table, instance)
        await fourth.reconcile_once()
        await wait_for(lambda: len(running_tasks(swarm_cluster, scaled["ID"])) == 2, what="2 tasks")

        # The binding leaves the table: its service goes, the foreign one stays.
        table.replace([], [])
        removed = await fourth.reconcile_once()
        assert [r.service_id for r in removed.removes] == [service["ID"]]
        assert services_of(swarm_cluster, instance, dep) == []

    asyncio.run(scenario())
    foreign.reload()
    assert foreign.attrs["Spec"]["Labels"]["berth.deployment"] == dep
    foreign.remove()


def test_a_tag_is_refused_and_an_unpullable_digest_is_an_image_pull_error_with_the_registry_reason(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    repo = worker_ref.split("@", 1)[0]
    missing_digest = f"{repo}@sha256:{'0' * 64}"
    missing_repo = f"{swarm_cluster.registry}/no-such-repo@sha256:{'1' * 64}"
    no_registry = f"{swarm_cluster.registry.rsplit(':', 1)[0]}:1/app@sha256:{'2' * 64}"  # nothing listens there
    tagged = binding(f"{repo}:latest", min_replicas=1)
    bad_digest = binding(missing_digest, min_replicas=1)
    bad_repo = binding(missing_repo, min_replicas=1)
    unreachable = binding(no_registry, min_replicas=1)
    events = EventStore()

    async def scenario() -> dict[str, list[str]]:
        table = DesiredTable()
        table.replace([], [tagged, bad_digest, bad_repo, unreachable])
        rt = runtime(swarm_cluster, table, instance, events)

        def pull_errors(dep: str) -> list[str]:
            return [e.message for e in events.list(dep) if e.kind == EventKind.IMAGE_PULL_ERROR.value]

        started = time.monotonic()
        async with running(rt):
            await wait_for(lambda: all(pull_errors(x.deployment.id) for x in (tagged, bad_digest, bad_repo, unreachable)),
                           timeout=10, what="image_pull_error for the four bindings")
            elapsed = time.monotonic() - started
            [view] = await rt.status(bad_digest.deployment.id)
            assert view.status is BindingState.FAILED
        print(f"SWARM image_pull_error within {elapsed:.2f} s")
        assert services_of(swarm_cluster, instance, tagged.deployment.id) == [], "a tag is never run"
        return {x.deployment.id: pull_errors(x.deployment.id) for x in (tagged, bad_digest, bad_repo, unreachable)}

    found = asyncio.run(scenario())
    assert "not a reference by digest" in found[tagged.deployment.id][0]
    assert "manifest unknown" in found[bad_digest.deployment.id][0]
    assert "No such image" in found[bad_digest.deployment.id][0]
    # distribution answers "manifest unknown" for a digest of a repository it does not have
    assert "manifest unknown" in found[bad_repo.deployment.id][0]
    assert "connection refused" in found[unreachable.deployment.id][0].lower()
    print("SWARM pull reasons", found)


def test_a_killed_node_leaves_the_endpoints_its_replicas_are_replaced_and_it_rejoins_without_duplicates(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    b = binding(worker_ref, min_replicas=3)
    dep = b.deployment.id
    victim = 2
    victim_node = swarm_cluster.nodes[victim]
    events = EventStore()

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [b])
        rt = runtime(swarm_cluster, table, instance, events)
        async with running(rt):
            await wait_for(lambda: len(addresses(rt, dep)) == 3, timeout=60, what="3 ready tasks")
            assert any(a.startswith(victim_node.address + ":") for a in addresses(rt, dep))
            killed = time.monotonic()
            swarm_cluster.kill_node(victim)
            await wait_for(lambda: not any(a.startswith(victim_node.address + ":") for a in addresses(rt, dep)),
                           timeout=5, what="the dead node's task out of the endpoints")
            left = time.monotonic() - killed
            await wait_for(lambda: len(addresses(rt, dep)) == 3, timeout=30, what="a replacement ready")
            replaced = time.monotonic() - killed
            assert not any(a.startswith(victim_node.address + ":") for a in addresses(rt, dep))
            downs = await wait_for(lambda: [e for e in events.list(dep) if e.kind == EventKind.NODE_DOWN.value],
                                   timeout=15, what="a node_down event")
            assert victim_node.name in downs[0].message and "replica" in downs[0].message
            print(f"SWARM node kill: out of the endpoints after {left:.2f} s, 3 ready again after {replaced:.2f} s")

            swarm_cluster.restart_node(victim)
            swarm_cluster.wait_node_state(victim, "ready", timeout=60)
            [service] = services_of(swarm_cluster, instance, dep)

            def settled() -> bool:
                return len(running_tasks(swarm_cluster, service["ID"])) == 3 and len(addresses(rt, dep)) == 3

            await wait_for(settled, timeout=30, what="3 running tasks after the rejoin")
            # Given time to do wrong, it still runs exactly three.
            await asyncio.sleep(3)
            assert len(running_tasks(swarm_cluster, service["ID"])) == 3
            assert len(services_of(swarm_cluster, instance, dep)) == 1
            assert (await rt.reconcile_once()).empty

    asyncio.run(scenario())
