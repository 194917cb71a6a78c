"""The swarm runtime on a real 3-node swarm (tests/support/swarm.py): the
scheduler's SwarmRuntime in process, with an in-memory desired table and
fixed secrets (no registry service), driving the cluster's manager.

Deploy by digest (replicas spread over the nodes, reached at node address
and per-task port, status naming the node), idempotence and adoption by a
new runtime (a restarted scheduler, also mid-scale), services it does not
own left alone, a tag refused, an unpullable digest in the errors with the
registry's reason, a killed node: its replicas leave the endpoints, a
node_down event names them, Swarm replaces them on the other nodes, and the
node rejoining duplicates nothing; a cut-off node (link down) leaves the
endpoints on the scheduler's own health checks, before Swarm calls it down."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import docker
import pytest
import requests
from google.protobuf import timestamp_pb2

from berth import local
from berth.v1 import common_pb2
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventKind, EventStore
from services.scheduler.runtime import BindingState, ReplicaState, SchedulerConfig
from services.scheduler.spec import SecretValue
from services.scheduler.swarm_adapter import SwarmAdapter
from services.scheduler.swarm_runtime import SwarmConfig, SwarmRuntime
from tests.support.docker_engine import build_worker_image, engine, write_worker_context
from tests.support.platform import ROOT, RunningPlatform, eventually, free_port
from tests.support.prober import Prober
from tests.support.swarm import SwarmCluster

pytestmark = [pytest.mark.docker]

CANARY = "canary-swarm-0b1d-not-a-real-secret"


class FixedSecrets:
    def __init__(self, secrets: list[SecretValue]) -> None:
        self.secrets = secrets

    async def resolve(self, project_id: str, environment_id: str) -> list[SecretValue]:
        return list(self.secrets)


@pytest.fixture(scope="module")
def worker_tag(swarm_cluster: SwarmCluster) -> Iterator[str]:
    """A busybox worker built on the main engine (removed after)."""
    main = engine()
    tag, _ = build_worker_image(main, version="swarm-rt")
    try:
        yield tag
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            main.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def worker_ref(swarm_cluster: SwarmCluster, worker_tag: str) -> str:
    """The worker pushed to the cluster's registry: ``REGISTRY/repo@sha256:...``
    (also there by its tag, ``REGISTRY/repo:TAG``)."""
    return swarm_cluster.import_image(worker_tag)


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



def test_a_running_task_failing_its_health_checks_is_replaced(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    """A task whose process keeps running but whose health path hangs (its
    CGI replaced inside the container, through its node's engine) leaves
    the endpoints, a health_check_failed event says so, and the scheduler
    replaces it (a forced, start-first update of its service): the sick task
    shuts down and two new tasks serve."""
    b = binding(worker_ref, min_replicas=2)
    dep = b.deployment.id
    events = EventStore()

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [b])
        rt = runtime(swarm_cluster, table, instance, events)
        async with running(rt):
            await wait_for(lambda: len(addresses(rt, dep)) == 2, timeout=60, what="2 ready tasks")
            [service] = services_of(swarm_cluster, instance, dep)
            sick = running_tasks(swarm_cluster, service["ID"])[0]
            node_of = {swarm_cluster.client(i).info()["Swarm"]["NodeID"]: i for i in range(len(swarm_cluster.nodes))}
            container = swarm_cluster.client(node_of[sick["NodeID"]]).containers.get(
                sick["Status"]["ContainerStatus"]["ContainerID"])
            # The health path now hangs (a probe counts any status below 500 as alive): the
            # process keeps running, so Swarm sees nothing wrong.
            code, output = container.exec_run(
                ["/bin/busybox", "sh", "-c", "printf '#!/bin/sh\\nsleep 120\\n' > /www/cgi-bin/index.cgi"])
            assert code == 0, output
            failed = await wait_for(
                lambda: [e for e in events.list(dep) if e.kind == EventKind.HEALTH_CHECK_FAILED.value],
                timeout=30, what="a health_check_failed event")
            assert sick["ID"][:12] in failed[0].message and "replacing" in failed[0].message

            def replaced() -> bool:
                tasks = running_tasks(swarm_cluster, service["ID"])
                return (len(tasks) == 2 and sick["ID"] not in {t["ID"] for t in tasks}
                        and len(addresses(rt, dep)) == 2)

            await wait_for(replaced, timeout=90, what="the sick task replaced, 2 tasks ready")
            state = swarm_cluster.client(0).api.inspect_task(sick["ID"])
            assert state["DesiredState"] == "shutdown", state["DesiredState"]
            for address in addresses(rt, dep):
                assert "version=swarm-rt" in http_get(address)
            # One replacement, not a loop of them.
            forced = swarm_cluster.client(0).api.inspect_service(service["ID"])["Spec"]["TaskTemplate"]
            assert forced.get("ForceUpdate") == 1, forced.get("ForceUpdate")
            assert len([e for e in events.list(dep) if e.kind == EventKind.HEALTH_CHECK_FAILED.value]) == 1

    asyncio.run(scenario())


def test_a_cut_off_node_leaves_the_endpoints_by_health_checks_and_comes_back_without_duplicates(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    """A cut cable: the node's tasks stop answering (no RST, the probes time
    out) and leave the endpoint set on the scheduler's own health checks."""
    b = binding(worker_ref, min_replicas=3)
    dep = b.deployment.id
    victim = 1
    victim_node = swarm_cluster.nodes[victim]

    def on_victim(rt: SwarmRuntime) -> bool:
        return any(a.startswith(victim_node.address + ":") for a in addresses(rt, dep))

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [b])
        rt = runtime(swarm_cluster, table, instance)
        async with running(rt):
            await wait_for(lambda: len(addresses(rt, dep)) == 3, timeout=60, what="3 ready tasks")
            assert on_victim(rt)
            cut = time.monotonic()
            swarm_cluster.link_down(victim)
            try:
                await wait_for(lambda: not on_victim(rt), timeout=5, what="the cut-off node's task out of the endpoints")
                left = time.monotonic() - cut
                await wait_for(lambda: len(addresses(rt, dep)) == 3, timeout=30, what="a replacement ready")
                print(f"SWARM link down: out of the endpoints after {left:.2f} s, "
                      f"3 ready again after {time.monotonic() - cut:.2f} s")
            finally:
                swarm_cluster.link_up(victim)
            swarm_cluster.wait_node_state(victim, "ready", timeout=60)
            [service] = services_of(swarm_cluster, instance, dep)
            await wait_for(lambda: len(running_tasks(swarm_cluster, service["ID"])) == 3 and len(addresses(rt, dep)) == 3,
                           timeout=30, what="3 running tasks after the link is back")
            assert len(services_of(swarm_cluster, instance, dep)) == 1
            assert (await rt.reconcile_once()).empty

    asyncio.run(scenario())


def test_no_suitable_node_is_a_scheduling_failure_with_swarms_message(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    """More memory than any node has (the limit is reserved), and every node
    drained: the tasks wait on "no suitable node"; both are
    scheduling_failure events carrying Swarm's words."""
    huge = binding(worker_ref, min_replicas=1)
    huge.deployment.config.resources.memory_bytes = 1 << 50  # 1 PiB
    small = binding(worker_ref, min_replicas=1)
    events = EventStore()
    api = swarm_cluster.client(0).api

    def set_availability(availability: str) -> None:
        for n in api.nodes():
            spec = dict(n["Spec"], Availability=availability)
            api.update_node(n["ID"], n["Version"]["Index"], spec)

    def failures(dep: str) -> list[str]:
        return [e.message for e in events.list(dep) if e.kind == EventKind.SCHEDULING_FAILURE.value]

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [huge])
        rt = runtime(swarm_cluster, table, instance, events)
        async with running(rt):
            [message] = await wait_for(lambda: failures(huge.deployment.id), timeout=10, what="scheduling_failure")
            assert "no suitable node" in message and "insufficient resources" in message, message
            [view] = await rt.status(huge.deployment.id)
            assert view.status is BindingState.FAILED
            assert [r.state for r in view.replicas] == [ReplicaState.PENDING]
            set_availability("drain")
            try:
                table.upsert_binding(small)
                [drained] = await wait_for(lambda: failures(small.deployment.id), timeout=10,
                                           what="scheduling_failure while drained")
                assert "no suitable node" in drained, drained
            finally:
                set_availability("active")
            await wait_for(lambda: len(addresses(rt, small.deployment.id)) == 1, timeout=30,
                           what="placed once the nodes are active")

    asyncio.run(scenario())


def test_the_autoscaler_sets_the_count_from_zero_on_activation_and_load_and_two_schedulers_never_duplicate(
        swarm_cluster: SwarmCluster, worker_ref: str, instance: str) -> None:
    b = binding(worker_ref, min_replicas=0, max_replicas=3)
    dep = b.deployment.id
    key = (b.environment_id, dep)

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [b])
        # Two schedulers' passes at once (a second one by mistake): one service, never two.
        first, second = runtime(swarm_cluster, table, instance), runtime(swarm_cluster, table, instance)
        first.activate(key)
        second.activate(key)
        await asyncio.gather(first.reconcile_once(), second.reconcile_once())
        assert len(services_of(swarm_cluster, instance, dep)) == 1
        async with running(first):
            await wait_for(lambda: len(addresses(first, dep)) == 1, timeout=60, what="1 ready after the activation")
            first.report_load({key: (25, 50)}, reporter="router-a")  # 25 in flight at 10 per replica: 3
            await wait_for(lambda: len(addresses(first, dep)) == 3, timeout=60, what="3 ready under load")
        [service] = services_of(swarm_cluster, instance, dep)
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 3

    asyncio.run(scenario())

# -- the whole platform on the cluster, through the CLI and the router -----------------------------------------------
@pytest.fixture
def cluster_platform(swarm_cluster: SwarmCluster, tmp_path: pathlib.Path) -> Iterator[RunningPlatform]:
    """``berth up --runtime swarm`` (by environment, as a user would set it)
    against the cluster's manager, with its registry; its services are
    removed after."""
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    p.env.update({"DOCKER_HOST": swarm_cluster.manager_host, "BERTH_RUNTIME": "swarm",
                  "BERTH_IMAGE_REGISTRY": swarm_cluster.registry, "DOCKER_BUILDKIT": "0"})
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        if (p.data_dir / "instance").exists():
            api = swarm_cluster.client(0).api
            for s in api.services(filters={"label": f"berth.instance={p.instance}"}):
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_service(s["ID"])


class Sampler:
    """GETs through the router, one connection per request, recording
    (time, status, the answering container's hostname): shows which task,
    hence which node, took each request."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port, self.headers = port, headers
        self.samples: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 180
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = requests.get(f"http://127.0.0.1:{self.port}/cgi-bin/index.cgi", headers=self.headers, timeout=10)
                host = next((line.split("=", 1)[1] for line in r.text.splitlines() if line.startswith("secret=")), "")
                self.samples.append((time.monotonic(), r.status_code, host))
            except requests.RequestException:
                self.samples.append((time.monotonic(), 0, ""))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_platform_on_the_cluster_deploy_promote_rollback_scale_and_node_kill_under_load(
        swarm_cluster: SwarmCluster, worker_tag: str, worker_ref: str, cluster_platform: RunningPlatform,
        tmp_path: pathlib.Path) -> None:
    p = cluster_platform
    key = p.cli_json("projects", "create", "fleet")["api_key"]
    run = functools.partial(p.cli_json, api_key=key)
    # v1 by digest (pushed by the harness); SHOW_SECRET=HOSTNAME makes each answer name its container.
    v1 = run("deploy", "--image", worker_ref, "--project", "fleet", "--min-replicas", "3", "--max-replicas", "3",
             "--health-path", "/cgi-bin/index.cgi", "--var", "SHOW_SECRET=HOSTNAME")
    v1_id = v1["deployment"]["id"]
    assert v1["deployment"]["image"] == worker_ref and v1["status"] == "running"
    status = run("deployment", "status", v1_id, "--project", "fleet")
    replicas = status["bindings"][0]["replicas"]
    assert len(replicas) == 3 and {r["node"] for r in replicas} == {n.name for n in swarm_cluster.nodes}
    assert all(r["state"] == "ready" for r in replicas)
    human = p.cli("deployment", "status", v1_id, "--project", "fleet", api_key=key).stdout
    assert "NODE" in human and swarm_cluster.nodes[0].name in human

    # v2 built from a directory: built against DOCKER_HOST (the manager), pushed, registered by digest;
    # the CLI finds the registry in the platform file berth up wrote (BERTH_IMAGE_REGISTRY unset here).
    write_worker_context(str(tmp_path / "worker"), version="v2")
    v2 = run("deploy", str(tmp_path / "worker"), "--project", "fleet", "-e", "staging", "--min-replicas", "2",
             "--max-replicas", "2", "--health-path", "/cgi-bin/index.cgi", "--var", "SHOW_SECRET=HOSTNAME",
             env_extra={"BERTH_IMAGE_REGISTRY": ""})
    v2_id = v2["deployment"]["id"]
    assert v2["deployment"]["image"].startswith(f"{swarm_cluster.registry}/berth-fleet@sha256:")
    assert v2["status"] == "running"

    port = int(p.router.rsplit(":", 1)[1])
    headers = {"X-Berth-Project": "fleet", "X-Berth-Environment": "preview"}
    eventually(lambda: p.get("fleet", "preview", "/cgi-bin/index.cgi").status_code == 200, what="preview answers")
    prober = Prober("127.0.0.1", port, path="/cgi-bin/index.cgi", headers=headers, concurrency=6, max_seconds=240)
    figures: dict[str, object] = {}
    with prober:
        time.sleep(2)
        t0 = time.monotonic()
        run("promote", v2_id, "--to", "preview", "--project", "fleet")
        eventually(lambda: f"deployment={v2_id}" in p.get("fleet", "preview", "/cgi-bin/index.cgi").text,
                   what="v2 serves")
        back = run("rollback", "--environment", "preview", "--project", "fleet")
        assert back["entry"]["deployment_id"] == v1_id, back

        def serves_v1() -> bool:
            text = p.get("fleet", "preview", "/cgi-bin/index.cgi").text
            assert f"deployment={v1_id}" in text, text
            return True

        eventually(serves_v1, what="v1 again")
        run("deployment", "scale", v1_id, "--min-replicas", "6", "--max-replicas", "6", "-e", "preview",
            "--project", "fleet")

        def ready(n: int) -> bool:
            b = run("deployment", "status", v1_id, "--project", "fleet", "-e", "preview")["bindings"][0]
            return sum(r["state"] == "ready" for r in b["replicas"]) == n and len(b["replicas"]) == n

        eventually(lambda: ready(6), timeout=60, what="6 ready")
        run("deployment", "scale", v1_id, "--min-replicas", "3", "--max-replicas", "3", "-e", "preview",
            "--project", "fleet")
        eventually(lambda: ready(3), timeout=60, what="3 ready")
        time.sleep(2)
        figures["promote_rollback_scale"] = prober.summary(t0, time.monotonic())
    print("SWARM", json.dumps(figures))
    assert figures["promote_rollback_scale"]["failed"] == 0, figures  # type: ignore[index]

    # One node's dockerd killed under load.
    victim = 1
    [service] = [s for s in swarm_cluster.client(0).api.services(filters={"label": f"berth.deployment={v1_id}"})
                 if s["Spec"]["Labels"].get("berth.environment") == v1["environment"]["id"]]
    tasks = swarm_cluster.client(0).api.tasks(filters={"service": service["ID"], "desired-state": "running"})
    node_ids = {n.attrs["Description"]["Hostname"]: n.id for n in swarm_cluster.client(0).nodes.list()}
    on_victim = {t["Status"]["ContainerStatus"]["ContainerID"][:12] for t in tasks
                 if t["NodeID"] == node_ids[swarm_cluster.nodes[victim].name]}
    assert on_victim, "a replica runs on the node to kill"
    prober = Prober("127.0.0.1", port, path="/cgi-bin/index.cgi", headers=headers, concurrency=6, max_seconds=120)
    with prober, Sampler(port, headers) as sampler:
        time.sleep(2)
        assert any(h in on_victim for _, _, h in sampler.samples), "the victim's replica took requests before"
        killed = time.monotonic()
        swarm_cluster.kill_node(victim)
        eventually(lambda: ready(3) and not any(
            r["node"] == swarm_cluster.nodes[victim].name and r["state"] == "ready"
            for r in run("deployment", "status", v1_id, "--project", "fleet", "-e", "preview")["bindings"][0]["replicas"]
        ), timeout=30, what="3 ready on the other nodes")
        replaced = time.monotonic() - killed
        time.sleep(3)
        last_on_victim = max((t for t, _, h in sampler.samples if h in on_victim and t >= killed), default=killed)
        figures["node_kill"] = {**prober.summary(killed, time.monotonic()),
                                "last_request_on_dead_node_s": round(last_on_victim - killed, 2),
                                "replaced_s": round(replaced, 2)}
    errors_ = run("deployment", "errors", v1_id, "--project", "fleet")["errors"]
    print("SWARM", json.dumps(figures))
    assert last_on_victim - killed < 5.0, figures
    assert any(e["kind"] == "node_down" and swarm_cluster.nodes[victim].name in e["message"] for e in errors_), errors_

    # The node rejoins: no duplicate replicas.
    swarm_cluster.restart_node(victim)
    swarm_cluster.wait_node_state(victim, "ready", timeout=60)
    time.sleep(5)
    running_now = [t for t in swarm_cluster.client(0).api.tasks(filters={"service": service["ID"]})
                   if t["Status"]["State"] == "running"]
    assert len(running_now) == 3, running_now
    assert ready(3)

    # The scheduler killed right after a scale: the one berth up restarts adopts the service mid-scale.
    run("deployment", "scale", v1_id, "--min-replicas", "5", "--max-replicas", "5", "-e", "preview",
        "--project", "fleet")
    [scheduler] = [r for r in local.recorded_processes(p.data_dir / local.RUN_DIR)
                   if r.name.startswith("scheduler") and r.running()]
    os.kill(scheduler.pid, signal.SIGKILL)
    eventually(lambda: ready(5), timeout=90, what="5 ready after the scheduler's restart")
    [after] = [s for s in swarm_cluster.client(0).api.services(filters={"label": f"berth.deployment={v1_id}"})
               if s["Spec"]["Labels"].get("berth.environment") == v1["environment"]["id"]]
    assert after["ID"] == service["ID"] and after["Spec"]["Mode"]["Replicated"]["Replicas"] == 5
    assert len([t for t in swarm_cluster.client(0).api.tasks(filters={"service": service["ID"]})
                if t["Status"]["State"] == "running"]) == 5

    # --image by tag: pinned once to the digest the registry names for it; an unknown tag is refused.
    tagged = f"{worker_ref.split('@')[0]}:{worker_tag.rsplit(':', 1)[1]}"
    pinned = run("deploy", "--image", tagged, "--project", "fleet", "-e", "staging", "--no-wait")
    assert pinned["deployment"]["image"] == worker_ref
    refused = p.cli("deploy", "--image", f"{worker_ref.split('@')[0]}:no-such-tag", "--project", "fleet",
                    "--output", "json", api_key=key, check=False)
    assert refused.returncode != 0 and "manifest unknown" in refused.stderr, refused.stderr

    # An unpullable digest: in deployment errors within 10 s, in the registry's words.
    missing = f"{worker_ref.split('@')[0]}@sha256:{'0' * 64}"
    bad = run("deploy", "--image", missing, "--project", "fleet", "-e", "staging", "--no-wait")
    seen = eventually(lambda: [e for e in run("deployment", "errors", bad["deployment"]["id"], "--project", "fleet")
                               ["errors"] if e["kind"] == "image_pull_error"], timeout=10, what="image_pull_error")
    assert "manifest unknown" in seen[0]["message"]


# -- README "Run on a cluster", as written ----------------------------------------------------------------------------
README_DOCKER_HOST = "tcp://swarm-manager.internal:2375"
README_REGISTRY = "registry.internal:5000"


def cluster_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- cluster:start -->", 1)[1].split("<!-- cluster:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in body.strip().splitlines() if line.strip()]


def test_readme_run_on_a_cluster_as_written(swarm_cluster: SwarmCluster, tmp_path: pathlib.Path) -> None:
    """The block runs line by line in one bash (set -e) with three rewrites
    only: the example manager and registry become the harness's, the
    router's default address the test's free port. The manager's engine gets
    the example's base image first (the README says it needs it)."""
    commands = cluster_commands()
    assert f"export DOCKER_HOST={README_DOCKER_HOST}" in commands
    assert f"export BERTH_IMAGE_REGISTRY={README_REGISTRY}" in commands
    ports = {name: free_port() for name in ("ROUTER", "REGISTRY", "SECRETS", "SCHEDULER")}
    script = "\n".join(
        c.replace(README_DOCKER_HOST, swarm_cluster.manager_host)
         .replace(README_REGISTRY, swarm_cluster.registry)
         .replace("http://127.0.0.1:8080", f"http://127.0.0.1:{ports['ROUTER']}")
        for c in commands
    )
    seed = subprocess.run(["bash", str(ROOT / "scripts" / "seed-base-images.sh"), "busybox"],
                          capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr
    swarm_cluster.client(0).images.load(b"".join(engine().images.get("busybox:1.36").save(named=True)))
    data_dir = tmp_path / "berth-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERTH_", "DOCKER_"))}
    env.update({"BERTH_DATA_DIR": str(data_dir), "DOCKER_BUILDKIT": "0"})
    env.update({f"BERTH_{name}_PORT": str(port) for name, port in ports.items()})
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
    finally:
        subprocess.run([str(ROOT / ".venv" / "bin" / "berth"), "down"], env=env, capture_output=True, timeout=60)
        instance = (data_dir / "instance").read_text().strip() if (data_dir / "instance").exists() else ""
        api = swarm_cluster.client(0).api
        services = api.services(filters={"label": f"berth.instance={instance}"}) if instance else []
        for s in services:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_service(s["ID"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "NODE" in out and all(n.name in out for n in swarm_cluster.nodes), out  # 3 replicas, one per node
    assert "Hello" in out or "hello" in out, out  # the worker answered through the router
    assert "No errors" in out, out
    assert len(services) == 1 and services[0]["Spec"]["Mode"]["Replicated"]["Replicas"] == 5
    assert services[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].startswith(
        f"{swarm_cluster.registry}/berth-hello@sha256:")
