"""The swarm harness and the engine alone, without Berth (issue 14): the
floor that Berth's own cluster figures (bench/cluster_bench.py) sit on.

- harness: seconds to build a 3-node swarm with its registry
  (``SwarmCluster.start``) and to tear it down again (``stop``, by step).
- scale: a plain Swarm service (busybox worker imported into the harness's
  registry by digest, endpoint mode dnsrr, per-task host-mode ports, restart
  delay 0) scaled 1→10 with ``service.scale``: seconds until 10 tasks are
  running, and their spread over the nodes. Back to 1 between rounds.
- node failure: 6 replicas (2 per node); node 3's dockerd SIGKILLed
  (``kill``) or its cable to the switch cut (``link``): seconds until the
  manager reports it down (1 s dispatcher heartbeat) and until 6 tasks run
  again on the other nodes; then the node comes back (seconds until Ready)
  and the service is spread again.

Prints figures; asserts nothing. Needs root (network namespaces, dockerd).
Everything it makes is torn down at the end, also on Ctrl-C/SIGTERM.

    python bench/swarm_harness_bench.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docker.types import EndpointSpec, RestartPolicy, ServiceMode  # noqa: E402

from tests.support.docker_engine import RUN_ID, build_worker_image, engine  # noqa: E402
from tests.support.swarm import SwarmCluster  # noqa: E402

PORT = 8080
LIMIT = 120.0  # no wait in this script lasts longer


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def _wait(check: Any, what: str, limit: float = LIMIT) -> float:
    """Seconds until ``check()`` is true (polled every 50 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if check():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {limit:.0f} s")


def _running(service: Any) -> list[dict[str, Any]]:
    return [t for t in service.tasks(filters={"desired-state": "running"}) if t["Status"]["State"] == "running"]


def _scale(service: Any, n: int) -> None:
    service.reload()  # the update names the spec version it replaces
    service.scale(n)


def _settled(service: Any, n: int) -> bool:
    """n tasks running and no other task meant to run."""
    tasks = service.tasks(filters={"desired-state": "running"})
    return len(tasks) == n and all(t["Status"]["State"] == "running" for t in tasks)


def bench_harness(rounds: int) -> None:
    starts, stops = [], []
    phases: dict[str, list[float]] = {}
    for _ in range(rounds):
        cluster = SwarmCluster(nodes=3)
        t0 = time.monotonic()
        try:
            cluster.start()
            starts.append(time.monotonic() - t0)
        finally:
            t1 = time.monotonic()
            cluster.stop()
            stops.append(time.monotonic() - t1)
            for k, v in cluster.teardown_phases.items():
                phases.setdefault(k, []).append(v)
    print(f"harness: 3 nodes + registry + swarm up   {_fmt(starts)}")
    print(f"harness: teardown (nothing left)         {_fmt(stops)}")
    print("          by step: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in phases.items()))


def bench_cluster(rounds: int) -> None:
    main = engine()
    tag, _ = build_worker_image(main, version="bench")
    cluster = SwarmCluster(nodes=3)
    try:
        cluster.start()
        ref = cluster.import_image(tag)
        client = cluster.client(0)
        names = {n.id: n.attrs["Description"]["Hostname"] for n in client.nodes.list()}
        service = client.services.create(
            ref, name=f"bench-{uuid.uuid4().hex[:6]}", env=[f"PORT={PORT}"], labels={"berth.test": RUN_ID},
            endpoint_spec=EndpointSpec(mode="dnsrr", ports=[{"Protocol": "tcp", "TargetPort": PORT, "PublishMode": "host"}]),
            mode=ServiceMode("replicated", replicas=1), restart_policy=RestartPolicy(condition="any", delay=0),
        )
        _wait(lambda: _settled(service, 1), "first task running")
        # Every node pulls once before timing, so scale figures are not pulls.
        _scale(service, 3)
        _wait(lambda: len({t["NodeID"] for t in _running(service)}) == 3, "image on every node")
        _scale(service, 1)
        _wait(lambda: _settled(service, 1), "back to 1")

        scale, spreads = [], []
        for _ in range(rounds):
            t0 = time.monotonic()
            _scale(service, 10)
            _wait(lambda: len(_running(service)) == 10, "10 running")
            scale.append(time.monotonic() - t0)
            spreads.append("/".join(str(c) for _, c in sorted(Counter(names[t["NodeID"]] for t in _running(service)).items())))
            _scale(service, 1)
            _wait(lambda: _settled(service, 1), "back to 1")
        print(f"scale 1->10 (10 tasks running)           {_fmt(scale)}; spread {', '.join(spreads)}")

        victim = 2
        for how in ("kill", "link"):
            down, replaced, ready = [], [], []
            for _ in range(rounds):
                _scale(service, 0)
                _wait(lambda: _settled(service, 0), "scaled to 0")
                _scale(service, 6)
                _wait(lambda: _settled(service, 6), "6 running")
                victim_id = next(i for i, h in names.items() if h == cluster.nodes[victim].name)
                t0 = time.monotonic()
                if how == "kill":
                    cluster.kill_node(victim)
                else:
                    cluster.link_down(victim)
                cluster.wait_node_state(victim, "down", timeout=LIMIT)
                down.append(time.monotonic() - t0)
                _wait(lambda: len([t for t in _running(service) if t["NodeID"] != victim_id]) == 6, "6 running elsewhere")
                replaced.append(time.monotonic() - t0)
                t1 = time.monotonic()
                if how == "kill":
                    cluster.restart_node(victim)
                else:
                    cluster.link_up(victim)
                cluster.wait_node_state(victim, "ready", timeout=LIMIT)
                ready.append(time.monotonic() - t1)
            print(f"node failure ({how}): Down after        {_fmt(down)}")
            print(f"node failure ({how}): 6 running again   {_fmt(replaced)}")
            print(f"node failure ({how}): back Ready after  {_fmt(ready)}")
    finally:
        cluster.stop()
        main.images.remove(tag, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces and dockerd")
    signal.signal(signal.SIGTERM, _sigterm)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    bench_harness(args.rounds)
    bench_cluster(args.rounds)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
