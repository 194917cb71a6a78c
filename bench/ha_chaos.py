"""Two of each service (issue 15): what agreeing routers and address lists
cost, on ``berth up --database-url postgresql://… --instances 2`` (a
throwaway PostgreSQL cluster, busybox workers, the local engine).

1. Routed moves: ``--moves`` REST promotes of staging, alternating the
   router asked. Per move: ms until the answer (``routed`` waits until every
   live router routes by the move) and ms from the answer until the *other*
   router serves the new deployment (read your write across routers: the
   first request already gets it when the wait did its job; the figure
   includes that request's own time). Printed: p50 / p99 / max, how many
   first requests still got the old deployment, and how many answers said
   ``routed: false``.
2. Client calls across a registry kill: a CLI-style client over both
   registries (``berth.client.Client`` with the address list) calls
   ListEnvironments in a loop while one registry is SIGKILLed and restarted
   by ``berth up``: calls, failures (0 expected: retried on the other),
   p50 / p99 / max latency before and during the outage.

The chaos test (tests/e2e/test_ha_chaos.py) prints failover seconds and
failed requests per victim; scheduler failover over many kills is
bench/scheduler_failover.py.

    python bench/ha_chaos.py [--moves 30] [--kill-seconds 8]

Figures only: nothing is asserted. Everything created is removed at the end
(the platform's processes, its containers by ``berth.instance``, the test
images by label, the PostgreSQL cluster)."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from berth import errors, local  # noqa: E402
from berth.client import Client  # noqa: E402
from berth.v1 import registry_pb2  # noqa: E402
from tests.e2e.ha_platform import HaPlatform  # noqa: E402
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context  # noqa: E402
from tests.support.platform import eventually  # noqa: E402
from tests.support.postgres import running_cluster  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def line(name: str, values: list[float]) -> str:
    return (f"{name:38} n={len(values):<5} p50 {pct(values, 50):8.1f}  p99 {pct(values, 99):8.1f}  "
            f"max {max(values) if values else float('nan'):8.1f}")


def routed_moves(ha: HaPlatform, key: str, deployments: list[str], moves: int) -> None:
    headers = {"X-Berth-Project": "bench", "X-Berth-Environment": "staging"}
    answer_ms: list[float] = []
    other_lag_ms: list[float] = []
    not_routed = 0
    behind = 0  # the first request to the other router after the answer still got the old deployment
    session = requests.Session()
    for i in range(moves):
        dep = deployments[i % 2]
        via, other = ha.routers[i % 2], ha.routers[(i + 1) % 2]
        started = time.perf_counter()
        answer = session.post(f"{via}/api/v1/deployments/promote", headers={"X-API-KEY": key}, timeout=30,
                              json={"source_deployment_id": dep, "target_environment_id": "staging"})
        answered = time.perf_counter()
        answer.raise_for_status()
        answer_ms.append((answered - started) * 1000)
        not_routed += not answer.json()["routed"]
        deadline = answered + 10
        polls = 0
        while time.perf_counter() < deadline:
            polls += 1
            seen = session.get(other + "/", headers=headers, timeout=10)
            if seen.headers.get("X-Berth-Deployment") == dep:
                other_lag_ms.append(max(0.0, (time.perf_counter() - answered) * 1000))
                break
            time.sleep(0.002)
        else:
            other_lag_ms.append(10_000.0)
        behind += polls > 1
    print("\n1. routed moves through two routers (ms)")
    print(line("answer (routed waits for both)", answer_ms))
    print(line("other router serves it, after answer", other_lag_ms))
    print(f"   routed false: {not_routed} of {moves}; the first request to the other router after the answer "
          f"got the old deployment: {behind} of {moves} (the lag includes that request's own time)")


def calls_across_a_registry_kill(ha: HaPlatform, key: str, kill_seconds: float) -> None:
    endpoints = local.endpoints(ha.data_dir)
    results: list[tuple[float, float, str]] = []  # (start, ms, outcome)
    stop = threading.Event()

    def loop() -> None:
        with Client(api_key=key, endpoints=endpoints) as client:
            limit = time.monotonic() + kill_seconds + 60
            while not stop.is_set() and time.monotonic() < limit:
                started = time.monotonic()
                try:
                    client.call(client.registry.ListEnvironments, registry_pb2.ListEnvironmentsRequest(), timeout=10)
                    outcome = "ok"
                except errors.BerthError as exc:
                    outcome = type(exc).__name__
                results.append((started, (time.monotonic() - started) * 1000, outcome))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(3)
        killed_at = time.monotonic()
        record = ha.kill("registry-1")
        ha.wait_restarted("registry-1", record.pid)
        time.sleep(max(0.0, killed_at + kill_seconds - time.monotonic()))
    finally:
        stop.set()
        thread.join(30)
    before = [ms for t, ms, o in results if t < killed_at and o == "ok"]
    during = [ms for t, ms, o in results if t >= killed_at and o == "ok"]
    failed = [o for _, _, o in results if o != "ok"]
    print(f"\n2. ListEnvironments over both registries, registry-1 SIGKILLed at +3 s (ms); {len(results)} calls, "
          f"{len(failed)} failed {sorted(set(failed)) or ''}")
    print(line("before the kill", before))
    print(line(f"the {kill_seconds:g} s after it", during))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=30)
    parser.add_argument("--kill-seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores)")
    with running_cluster() as pg, tempfile.TemporaryDirectory(prefix="berth-ha-bench-") as tmp:
        ha = HaPlatform(pathlib.Path(tmp) / "data", pg.create_database(), instances=2)
        ha.data_dir.mkdir()
        try:
            started = time.monotonic()
            ha.start()
            ha.wait_all_healthy()
            print(f"berth up --instances 2: healthy after {time.monotonic() - started:.1f} s")
            key = ha.cli_json("projects", "create", "bench")["api_key"]
            deployments = []
            for version in ("v1", "v2"):
                write_worker_context(str(pathlib.Path(tmp) / version), version=version)
                deployments.append(ha.cli_json("deploy", str(pathlib.Path(tmp) / version), "--project", "bench",
                                               api_key=key)["deployment"]["id"])
            for dep in deployments:
                requests.post(f"{ha.routers[0]}/api/v1/deployments/promote", headers={"X-API-KEY": key},
                              timeout=30, json={"source_deployment_id": dep, "target_environment_id": "staging"}
                              ).raise_for_status()
            eventually(lambda: all(
                requests.get(r + "/", timeout=10, headers={"X-Berth-Project": "bench", "X-Berth-Environment":
                                                           "staging"}).status_code == 200 for r in ha.routers),
                timeout=120, what="staging served by both routers")
            routed_moves(ha, key, deployments, args.moves)
            calls_across_a_registry_kill(ha, key, args.kill_seconds)
            print(f"\nload average {os.getloadavg()[0]:.2f}")
        finally:
            ha.stop()
            local.stop_processes(local.recorded_processes(ha.data_dir / local.RUN_DIR), timeout=5)
            ha.remove_containers()
            remove_labelled(engine(), TEST_LABEL)


if __name__ == "__main__":
    main()
