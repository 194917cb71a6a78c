"""Fault tests on a real platform (issue 12, "Prove it"): ``berth up`` on
free ports, a busybox worker deployed with two replicas, a prober at
concurrency 8 against the router, and SIGKILL in turn of the registry, the
secrets service, the scheduler, the router supervisor and one router worker.
After each kill: seconds until the replacement serves and ``/healthz`` is
200, and the requests that failed meanwhile. Nothing may fail except
requests on connections the killed router worker held, and nothing may be
lost from the registry or secrets.

``pytest -s`` shows the figures; they are printed as one JSON line too
(``FAULTS {...}``)."""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth import local
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context
from tests.support.platform import RunningPlatform, eventually
from tests.support.prober import Prober

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

SETTLE = 2.0  # seconds the prober keeps going after the platform is healthy again
TARGETS = ("registry", "secrets", "scheduler", "router", "router-worker")


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[RunningPlatform]:
    p = RunningPlatform(tmp_path / "data")
    p.data_dir.mkdir()
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


def records(p: RunningPlatform) -> dict[str, local.ProcessRecord]:
    return {r.name: r for r in local.recorded_processes(p.data_dir / local.RUN_DIR) if r.running()}


def router_worker(p: RunningPlatform) -> local.ProcessRecord:
    """A worker of the current router supervisor (not an orphan on its way out)."""
    def find() -> local.ProcessRecord | None:
        now = records(p)
        supervisor = now["router"].pid
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        workers = [r for name, r in now.items() if name.startswith("router-worker-") and str(r.pid) in children]
        return workers[0] if workers else None

    found: local.ProcessRecord = eventually(find, timeout=10, what="a worker of the current router supervisor")
    return found


def grpc_serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def healthz(p: RunningPlatform) -> bool:
    try:
        return requests.get(p.router + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_sigkill_each_platform_process_under_a_prober(platform: RunningPlatform, tmp_path: Path) -> None:
    key = platform.cli_json("projects", "create", "faults")["api_key"]
    platform.cli("secrets", "set", "--project", "faults", "--name", "CANARY", "--type", "token", "--stdin",
                 api_key=key, input="canary-value\n")
    write_worker_context(str(tmp_path / "worker"), version="v1")
    deployed = platform.cli_json("deploy", str(tmp_path / "worker"), "--project", "faults",
                                 "--min-replicas", "2", "--max-replicas", "2", api_key=key)
    deployment_id = deployed["deployment"]["id"]
    platform.cli_json("promote", deployment_id, "--to", "staging", "--project", "faults", api_key=key)

    def state() -> dict[str, object]:
        return {
            "secrets": platform.cli_json("secrets", "list", "--project", "faults", api_key=key)["secrets"],
            "preview": platform.cli_json("history", "--environment", "preview", "--project", "faults",
                                         api_key=key)["entries"],
            "staging": platform.cli_json("history", "--environment", "staging", "--project", "faults",
                                         api_key=key)["entries"],
            "deployments": [d["id"] for d in
                            platform.cli_json("deployments", "--project", "faults", api_key=key)["deployments"]],
        }

    before = state()
    eventually(lambda: platform.get("faults", "preview").status_code == 200, what="the worker answers")
    eventually(lambda: healthz(platform), what="/healthz 200")

    port = int(platform.router.rsplit(":", 1)[1])
    figures: dict[str, dict[str, object]] = {}
    prober = Prober("127.0.0.1", port, headers={"X-Berth-Project": "faults", "X-Berth-Environment": "preview"},
                    concurrency=8, max_seconds=300)
    with prober:
        time.sleep(3.0)
        figures["baseline"] = prober.summary()
        for target in TARGETS:
            victim = router_worker(platform) if target == "router-worker" else records(platform)[target]
            killed = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)

            def recovered(target: str = target, victim: local.ProcessRecord = victim) -> bool:
                if victim.running():
                    return False
                now = records(platform)
                if target == "router-worker":
                    if not any(n.startswith("router-worker-") and r.pid != victim.pid for n, r in now.items()):
                        return False
                elif target not in now or now[target].pid == victim.pid:
                    return False
                if target in ("registry", "secrets", "scheduler") and \
                        not grpc_serving(f"127.0.0.1:{platform.ports[target]}"):
                    return False
                if target.startswith("router"):  # every worker recorded is the new supervisor's: orphans are gone
                    supervisor = now["router"].pid
                    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
                    workers = [r.pid for n, r in now.items() if n.startswith("router-worker-")]
                    if not workers or any(str(pid) not in children for pid in workers):
                        return False
                return healthz(platform)

            eventually(recovered, timeout=60, interval=0.05, what=f"healthy again after killing {target}")
            healthy = time.monotonic()
            time.sleep(SETTLE)
            window = prober.summary(killed, time.monotonic())
            window["seconds_to_healthy"] = round(healthy - killed, 2)
            figures[target] = window
    figures["total"] = prober.summary()
    print("\nFAULTS " + json.dumps(figures))
    for name, window in figures.items():
        print(f"  {name:14} requests {window['requests']:>6}  failed {window['failed']:>3}  "
              f"healthy after {window.get('seconds_to_healthy', '-')} s  {window['failures'] or ''}")

    assert figures["baseline"]["failed"] == 0, figures["baseline"]
    for target in ("registry", "secrets", "scheduler", "router"):
        assert figures[target]["failed"] == 0, (target, figures[target])
    worker = figures["router-worker"]
    # only requests on connections the killed worker held: at most one per prober thread, none answered 5xx
    assert isinstance(worker["failed"], int) and worker["failed"] <= 8, worker
    assert all(key.startswith("0 ") for key in worker["failures"]), worker  # type: ignore[union-attr]
    for target in TARGETS:
        assert isinstance(figures[target]["requests"], int) and figures[target]["requests"] > 50, (target, figures)

    assert state() == before  # nothing lost: the secret, both histories, the deployments
