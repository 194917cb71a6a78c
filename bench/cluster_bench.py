"""The swarm runtime on a real 3-node swarm built on this machine
(tests/support/swarm.py): scaling through Berth, node-failure detection and
replacement, and router throughput to tasks on the cluster (issue 14).

- scale: the scheduler's ``SwarmRuntime`` (in process, as the service runs
  it) with a binding at 1 replica raised to ``min = max = 10`` in its
  desired table; the time until Swarm reports 10 running tasks and until the
  runtime publishes 10 ready endpoints (each task answered its probe at its
  node address and per-task port). Back to 1 between rounds.
- node failure: 6 ready replicas (2 per node); node 3's dockerd killed
  (``kill``) or its cable cut (``link``): seconds until the runtime's
  endpoints leave the node, until Swarm reports it down, and until 6
  replicas are ready again on the other nodes. The node comes back between
  rounds.
- router throughput: ``berth up --runtime swarm`` on the cluster, one
  deployment with 3 replicas (one per node); requests per second and
  p50/p99 through the router (keep-alive clients) against the same clients
  sent straight to the task addresses round robin (no router), and the
  ratio. The router runs on this host, outside the swarm, so every task is
  on "another node" for it: the direct figure is the floor of that path.

Prints figures; asserts nothing. Needs root (network namespaces, dockerd);
everything it makes is torn down at the end, also on Ctrl-C/SIGTERM.

    python bench/cluster_bench.py [--rounds 3] [--duration 5] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402

from berth.v1 import common_pb2  # noqa: E402
from services.scheduler.desired import DesiredTable  # noqa: E402
from services.scheduler.events import EventStore  # noqa: E402
from services.scheduler.runtime import SchedulerConfig  # noqa: E402
from services.scheduler.spec import SecretValue  # noqa: E402
from services.scheduler.swarm_adapter import SwarmAdapter  # noqa: E402
from services.scheduler.swarm_runtime import SwarmConfig, SwarmRuntime  # noqa: E402
from tests.support.docker_engine import build_worker_image, engine  # noqa: E402
from tests.support.platform import RunningPlatform, eventually  # noqa: E402
from tests.support.swarm import SwarmCluster  # noqa: E402

PATH = "/cgi-bin/index.cgi"


class NoSecrets:
    async def resolve(self, project_id: str, environment_id: str) -> list[SecretValue]:
        return []


def binding(image: str, n: int, *, environment_id: str, deployment_id: str) -> common_pb2.Binding:
    return common_pb2.Binding(
        project_id="bench", project_name="bench", environment_id=environment_id, environment_name="bench",
        deployment=common_pb2.Deployment(
            id=deployment_id, project_id="bench", image=image,
            config=common_pb2.WorkerConfig(port=8080, health_path=PATH),
            created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        ),
        min_replicas=n, max_replicas=n, serving=True,
    )


def addresses(rt: SwarmRuntime) -> list[str]:
    return [a for s in rt.endpoints.current for a in s.addresses]


async def wait(condition: Any, timeout: float = 60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return float("nan")


def running_tasks(cluster: SwarmCluster, instance: str) -> int:
    api = cluster.client(0).api
    ids = [s["ID"] for s in api.services(filters={"label": f"berth.instance={instance}"})]
    return sum(1 for t in api.tasks(filters={"service": ids}) if t["Status"]["State"] == "running"
               and t["DesiredState"] == "running") if ids else 0


def fmt(values: list[float]) -> str:
    ok = [v for v in values if v == v]
    if not ok:
        return "n/a"
    return f"median {statistics.median(ok):.2f} s (min {min(ok):.2f}, max {max(ok):.2f}, n={len(ok)})"


async def scale_and_failures(cluster: SwarmCluster, ref: str, rounds: int) -> dict[str, str]:
    instance = f"bench{uuid.uuid4().hex[:6]}"
    env_id, dep_id = f"env_{uuid.uuid4().hex[:12]}", f"dep_{uuid.uuid4().hex[:12]}"
    table = DesiredTable()
    table.replace([], [binding(ref, 1, environment_id=env_id, deployment_id=dep_id)])
    client = docker.DockerClient(base_url=cluster.manager_host, version="1.41", timeout=30)
    rt = SwarmRuntime(SwarmAdapter(client), table, NoSecrets(), EventStore(),
                      SchedulerConfig(instance=instance, reconcile_interval=0.5),
                      SwarmConfig(insecure_registries=(cluster.registry,)))
    task = asyncio.create_task(rt.run())
    figures: dict[str, list[float]] = {k: [] for k in (
        "scale_tasks", "scale_ready", "kill_out", "kill_down", "kill_back", "link_out", "link_down", "link_back")}
    try:
        await wait(lambda: len(addresses(rt)) == 1, 120)
        for _ in range(rounds):
            t0 = time.monotonic()
            table.upsert_binding(binding(ref, 10, environment_id=env_id, deployment_id=dep_id))
            tasks_at = ready_at = float("nan")
            while time.monotonic() - t0 < 60 and (ready_at != ready_at):
                now = time.monotonic() - t0
                if tasks_at != tasks_at and await asyncio.to_thread(running_tasks, cluster, instance) >= 10:
                    tasks_at = now
                if len(addresses(rt)) >= 10:
                    ready_at = time.monotonic() - t0
                await asyncio.sleep(0.02)
            figures["scale_tasks"].append(tasks_at)
            figures["scale_ready"].append(ready_at)
            table.upsert_binding(binding(ref, 1, environment_id=env_id, deployment_id=dep_id))
            await wait(lambda: len(addresses(rt)) == 1 and running_tasks(cluster, instance) == 1, 60)

        table.upsert_binding(binding(ref, 6, environment_id=env_id, deployment_id=dep_id))
        await wait(lambda: len(addresses(rt)) == 6, 60)
        victim = 2
        address = cluster.nodes[victim].address
        for _ in range(rounds):
            for how in ("kill", "link"):
                await wait(lambda: len(addresses(rt)) == 6 and any(a.startswith(address + ":") for a in addresses(rt)),
                           60)
                t0 = time.monotonic()
                if how == "kill":
                    cluster.kill_node(victim)
                else:
                    cluster.link_down(victim)
                out = await wait(lambda: not any(a.startswith(address + ":") for a in addresses(rt)), 30)
                down = await asyncio.to_thread(cluster.wait_node_state, victim, "down", 30)
                await wait(lambda: len(addresses(rt)) == 6, 60)
                figures[f"{how}_out"].append(out)
                figures[f"{how}_down"].append(out + down)
                figures[f"{how}_back"].append(time.monotonic() - t0)
                if how == "kill":
                    cluster.restart_node(victim)
                else:
                    cluster.link_up(victim)
                cluster.wait_node_state(victim, "ready", 60)
                # Let Swarm spread again: the node comes back empty; a fresh scale evens it out.
                table.upsert_binding(binding(ref, 0, environment_id=env_id, deployment_id=dep_id))
                await wait(lambda: running_tasks(cluster, instance) == 0, 60)
                table.upsert_binding(binding(ref, 6, environment_id=env_id, deployment_id=dep_id))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rt.close()
        for s in client.api.services(filters={"label": f"berth.instance={instance}"}):
            client.api.remove_service(s["ID"])
    names = {
        "scale_tasks": "scale 1->10: 10 tasks running (Swarm)",
        "scale_ready": "scale 1->10: 10 ready endpoints (Berth)",
        "kill_out": "dockerd killed: node's tasks out of the endpoints",
        "kill_down": "dockerd killed: Swarm reports the node down",
        "kill_back": "dockerd killed: 6 ready again on the other nodes",
        "link_out": "cable cut: node's tasks out of the endpoints",
        "link_down": "cable cut: Swarm reports the node down",
        "link_back": "cable cut: 6 ready again on the other nodes",
    }
    return {names[k]: fmt(v) for k, v in figures.items()}


def load(targets: list[tuple[str, int, dict[str, str]]], seconds: float, concurrency: int) -> dict[str, float]:
    """Keep-alive clients, each sending GETs to the targets in turn (the
    failure count is bumped from several threads; a lost increment only
    undercounts a figure that is printed, never asserted)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        conns: dict[tuple[str, int], http.client.HTTPConnection] = {}
        mine: list[float] = []
        n = i
        while time.monotonic() < stop:
            host, port, headers = targets[n % len(targets)]
            n += 1
            conn = conns.get((host, port)) or http.client.HTTPConnection(host, port, timeout=10)
            conns[(host, port)] = conn
            t0 = time.perf_counter()
            try:
                conn.request("GET", PATH, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures[0] += 1
                mine.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException):
                failures[0] += 1
                conn.close()
                conns.pop((host, port), None)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "req_per_s": len(latencies) / seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan"),
        "failed": failures[0],
    }


def throughput(cluster: SwarmCluster, ref: str, tmp: Path, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    p = RunningPlatform(tmp / "data")
    p.data_dir.mkdir(parents=True)
    p.env.update({"DOCKER_HOST": cluster.manager_host, "BERTH_RUNTIME": "swarm",
                  "BERTH_IMAGE_REGISTRY": cluster.registry})
    try:
        p.start()
        key = p.cli_json("projects", "create", "bench")["api_key"]
        deployed = p.cli_json("deploy", "--image", ref, "--project", "bench", "--min-replicas", "3",
                              "--max-replicas", "3", "--health-path", PATH, api_key=key)
        status = p.cli_json("deployment", "status", deployed["deployment"]["id"], "--project", "bench", api_key=key)
        tasks = [r["address"] for r in status["bindings"][0]["replicas"]]
        eventually(lambda: p.get("bench", "preview", PATH).status_code == 200, what="routed")
        router_port = int(p.router.rsplit(":", 1)[1])
        via = [("127.0.0.1", router_port, {"X-Berth-Project": "bench", "X-Berth-Environment": "preview"})]
        direct: list[tuple[str, int, dict[str, str]]] = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]), {}) for a in tasks]
        results: dict[str, list[dict[str, float]]] = {"router": [], "direct": []}
        for _ in range(rounds):  # in turns: the machine's drift hits both alike
            results["router"].append(load(via, seconds, concurrency))
            results["direct"].append(load(direct, seconds, concurrency))
        summary: dict[str, Any] = {}
        for name, runs in results.items():
            summary[name] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        summary["router/direct req/s (median of rounds)"] = round(statistics.median(
            r["req_per_s"] / d["req_per_s"] for r, d in zip(results["router"], results["direct"], strict=True)), 2)
        summary["tasks"] = tasks
        return summary
    finally:
        p.stop()
        instance = p.instance if (p.data_dir / "instance").exists() else ""
        api = cluster.client(0).api
        for s in api.services(filters={"label": f"berth.instance={instance}"}) if instance else []:
            api.remove_service(s["ID"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    logging.getLogger("berth").setLevel(logging.ERROR)  # the runtime's warnings (node_down...) are expected here
    main_engine = engine()
    tag, _ = build_worker_image(main_engine, version="bench")
    cluster = SwarmCluster(nodes=3)
    try:
        cluster.start()
        ref = cluster.import_image(tag)
        print(f"load average {os.getloadavg()[0]:.2f}; cluster {cluster.id}, image {ref}", flush=True)
        figures = asyncio.run(scale_and_failures(cluster, ref, args.rounds))
        for name, value in figures.items():
            print(f"{name}: {value}", flush=True)
        with tempfile.TemporaryDirectory(prefix="berth-cluster-bench-") as tmp:
            result = throughput(cluster, ref, Path(tmp), args.rounds, args.duration, args.concurrency)
        print("throughput:", json.dumps(result), flush=True)
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        cluster.stop()
        try:
            main_engine.images.remove(tag, force=True)
        except docker.errors.APIError:
            pass


if __name__ == "__main__":
    main()
