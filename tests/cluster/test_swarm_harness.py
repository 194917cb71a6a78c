"""The swarm harness on a real 3-node swarm (no mocks): nodes, registry,
images by digest, host-mode ports under dnsrr, a killed and a cut-off node,
and a teardown / sweep that leave nothing behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests
from docker.types import EndpointSpec, RestartPolicy, ServiceMode

from tests.support.docker_engine import RUN_ID, build_worker_image, engine
from tests.support.platform import ROOT, eventually, free_port
from tests.support.swarm import (
    SwarmCluster,
    cluster_leftovers,
    cluster_processes,
    known_clusters,
    sweep_stale_clusters,
)

pytestmark = [pytest.mark.docker]

WORKER_PORT = 8080


@pytest.fixture(scope="module")
def worker_tag() -> Iterator[str]:
    """A busybox worker built FROM scratch on the main engine (removed after)."""
    main = engine()
    tag, _ = build_worker_image(main, version="swarm1")
    try:
        yield tag
    finally:
        try:
            main.images.remove(tag, force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="module")
def worker_ref(swarm_cluster: SwarmCluster, worker_tag: str) -> str:
    return swarm_cluster.import_image(worker_tag)


def _service_name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:6]}"


def _tasks(service: Any) -> list[dict[str, Any]]:
    service.reload()
    return list(service.tasks())


def _running(service: Any) -> list[dict[str, Any]]:
    return [t for t in _tasks(service) if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]


def _node_index(cluster: SwarmCluster, node_id: str) -> int:
    hostname = cluster.client(0).nodes.get(node_id).attrs["Description"]["Hostname"]
    return [n.name for n in cluster.nodes].index(hostname)


def _host_port(task: dict[str, Any]) -> int:
    ports = task["Status"].get("PortStatus", {}).get("Ports", [])
    published = {p["PublishedPort"] for p in ports if p.get("TargetPort") == WORKER_PORT}
    assert len(published) == 1, ports
    return published.pop()


def _answer(address: str, port: int) -> str:
    response = requests.get(f"http://{address}:{port}/cgi-bin/index.cgi", timeout=5)
    response.raise_for_status()
    return response.text


def test_three_nodes_ready_with_distinct_identities_and_a_registry(swarm_cluster: SwarmCluster):
    cluster = swarm_cluster
    states = cluster.node_states()
    assert set(states) == {n.name for n in cluster.nodes}
    assert all(state == ("ready", "active") for state in states.values()), states
    assert len({n.name for n in cluster.nodes}) == 3 and len({n.address for n in cluster.nodes}) == 3
    engine_ids = {cluster.client(i).info()["ID"] for i in range(3)}
    assert len(engine_ids) == 3, engine_ids
    swarm_node_ids = {cluster.client(i).info()["Swarm"]["NodeID"] for i in range(3)}
    assert len(swarm_node_ids) == 3
    assert cluster.client(0).info()["Swarm"]["ControlAvailable"] is True
    assert cluster.manager_host == cluster.nodes[0].docker_host
    assert all(cluster.client(i).info()["Name"] == cluster.nodes[i].name for i in range(3))
    answer = requests.get(f"http://{cluster.registry}/v2/", timeout=5)
    assert answer.status_code == 200 and answer.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    # Inside each node, the standard socket path is that node's own engine (a
    # container mounting /var/run/docker.sock drives its node, not the machine's).
    for node in cluster.nodes:
        inside = subprocess.run(["nsenter", f"--target={node.pid}", "--mount", "stat", "-L", "-c", "%i",
                                 "/var/run/docker.sock"], capture_output=True, text=True, timeout=10)
        assert inside.stdout.strip() == str(os.stat(node.docker_host.removeprefix("unix://")).st_ino)
    # The machine's own engine never joins.
    assert engine().info()["Swarm"]["LocalNodeState"] == "inactive"


def test_dnsrr_service_with_host_ports_spreads_over_three_nodes(swarm_cluster: SwarmCluster, worker_ref: str):
    cluster = swarm_cluster
    assert "@sha256:" in worker_ref and worker_ref.startswith(cluster.registry + "/")
    published = free_port()
    service = cluster.client(0).services.create(
        worker_ref, name=_service_name("spread"), env=[f"PORT={WORKER_PORT}"],
        endpoint_spec=EndpointSpec(mode="dnsrr", ports={published: (WORKER_PORT, "tcp", "host")}),
        mode=ServiceMode("replicated", replicas=3), labels={"berth.test": RUN_ID},
    )
    try:
        running = eventually(lambda: (lambda r: r if len(r) == 3 else None)(_running(service)), timeout=60,
                             what="3 running tasks")
        nodes = {_node_index(cluster, t["NodeID"]) for t in running}
        assert nodes == {0, 1, 2}
        for t in running:
            assert _host_port(t) == published
        for node in cluster.nodes:
            assert "version=swarm1" in eventually(lambda: _answer(node.address, published), what=f"{node.name} answers")
        # Nodes 2 and 3 never had the image: they pulled exactly this digest from the registry.
        for i in (1, 2):
            digests = {d for image in cluster.client(i).images.list() for d in image.attrs.get("RepoDigests") or []}
            assert worker_ref in digests, digests
    finally:
        service.remove()


def test_killed_node_goes_down_its_task_is_replaced_and_it_comes_back(swarm_cluster: SwarmCluster, worker_ref: str):
    cluster = swarm_cluster
    service = cluster.client(0).services.create(
        worker_ref, name=_service_name("kill"), env=[f"PORT={WORKER_PORT}"],
        endpoint_spec=EndpointSpec(mode="dnsrr", ports=[{"Protocol": "tcp", "TargetPort": WORKER_PORT, "PublishMode": "host"}]),
        mode=ServiceMode("replicated", replicas=2), restart_policy=RestartPolicy(condition="any", delay=0),
        labels={"berth.test": RUN_ID},
    )
    try:
        running = eventually(lambda: (lambda r: r if len(r) == 2 else None)(_running(service)), timeout=60,
                             what="2 running tasks")
        on = sorted(_node_index(cluster, t["NodeID"]) for t in running)
        victim = max(on)  # never node 1: the manager stays up to observe
        assert victim != 0 and len(set(on)) == 2, on
        victim_task = next(t for t in running if _node_index(cluster, t["NodeID"]) == victim)

        cluster.kill_node(victim)
        cluster.wait_node_state(victim, "down", timeout=30)

        def replaced() -> list[dict[str, Any]] | None:
            r = _running(service)
            if len(r) == 2 and victim_task["ID"] not in {t["ID"] for t in r} and all(
                _node_index(cluster, t["NodeID"]) != victim for t in r
            ):
                return r
            return None

        after = eventually(replaced, timeout=60, what="the dead node's task replaced on a live node")
        replacement = next(t for t in after if t["Slot"] == victim_task["Slot"])
        node = cluster.nodes[_node_index(cluster, replacement["NodeID"])]
        assert "version=swarm1" in eventually(lambda: _answer(node.address, _host_port(replacement)),
                                              what="the replacement answers")

        cluster.restart_node(victim)
        cluster.wait_node_state(victim, "ready", timeout=60)
        assert cluster.client(victim).info()["Swarm"]["LocalNodeState"] == "active"
        # Back, and the service still has exactly its two replicas.
        assert len(eventually(lambda: (lambda r: r if len(r) == 2 else None)(_running(service)), what="2 replicas")) == 2
    finally:
        service.remove()


def test_cut_link_makes_a_node_down_and_restoring_it_ready(swarm_cluster: SwarmCluster):
    cluster = swarm_cluster
    node = cluster.nodes[2]
    socket.create_connection((node.address, 7946), timeout=5).close()  # the gossip port (every node) answers from the host
    cluster.link_down(2)
    try:
        cluster.wait_node_state(2, "down", timeout=30)
        with pytest.raises(OSError):
            socket.create_connection((node.address, 7946), timeout=1).close()
        assert cluster.client(2).info()["Swarm"]["LocalNodeState"] == "active"  # its dockerd runs on, cut off
    finally:
        cluster.link_up(2)
    cluster.wait_node_state(2, "ready", timeout=60)
    socket.create_connection((node.address, 7946), timeout=5).close()


def _processes_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_stop_leaves_nothing_behind(worker_tag: str):
    cluster = SwarmCluster(nodes=2)
    with cluster:
        ref = cluster.import_image(worker_tag)
        container = cluster.client(1).containers.run(ref, detach=True, environment={"PORT": str(WORKER_PORT)})
        eventually(lambda: (container.reload(), container.status == "running")[1], what="a container on node 2")
        pids = cluster_processes(cluster.id)
        names = {open(f"/proc/{p}/comm").read().strip() for p in pids}
        # Before: the dockerds, their containerds, a shim, the container, the registry.
        assert {"dockerd", "containerd", "containerd-shim", "docker-registry"} <= names, names  # comm: 15 chars
        leftovers = cluster_leftovers(cluster.id)
        assert all(leftovers[k] for k in ("namespaces", "processes", "mounts", "directories", "cgroups", "links")), leftovers
        container_pid = container.attrs["State"]["Pid"]
        assert container_pid in pids  # found through its node's cgroup
    after = cluster_leftovers(cluster.id)
    assert after == {"namespaces": [], "processes": [], "mounts": [], "directories": [], "cgroups": [], "links": []}
    assert _processes_alive(pids) == []
    assert cluster.id not in known_clusters()


ABANDON = """
import sys, time
from tests.support.swarm import SwarmCluster
cluster = SwarmCluster(nodes=2)
cluster.start()
ref = cluster.import_image(sys.argv[1])
cluster.client(1).containers.run(ref, detach=True, environment={"PORT": "8080"})
print(cluster.id, flush=True)
time.sleep(300)
"""


def test_sweep_removes_an_abandoned_cluster_and_nothing_else(swarm_cluster: SwarmCluster, worker_tag: str):
    proc = subprocess.Popen([sys.executable, "-c", ABANDON, worker_tag], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read() if proc.stderr else ""
        abandoned = line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    before = cluster_leftovers(abandoned)
    # The owner died; its cluster lives on: dockerds, the registry, a container.
    assert all(before[k] for k in ("namespaces", "processes", "mounts", "directories", "cgroups", "links")), before
    container_pids = []
    for d in before["cgroups"]:
        try:
            container_pids += [int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()]
        except OSError:
            pass
    assert container_pids, "the abandoned container's processes are in its node's cgroup"

    t0 = time.monotonic()
    swept = sweep_stale_clusters()
    assert abandoned in swept, swept
    assert swarm_cluster.id not in swept  # a live cluster (its owner is this process) is never swept
    print(f"sweep took {time.monotonic() - t0:.1f} s")
    assert cluster_leftovers(abandoned) == {
        "namespaces": [], "processes": [], "mounts": [], "directories": [], "cgroups": [], "links": []}
    assert _processes_alive([int(p) for p in before["processes"]]) == []
    # The fixture's cluster is untouched and still answers.
    assert swarm_cluster.node_states() and all(s == "ready" for s, _ in swarm_cluster.node_states().values())
    assert swarm_cluster.id in known_clusters()
