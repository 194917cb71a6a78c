"""Router worker deaths under a prober (issue 12, item 8), as real processes:
a registry (SQLite, empty) and ``python -m services.router --workers 2``.

With the table loaded, a request for an unknown project is answered 404
``unknown_project``; a worker without its table would answer 503
``router_starting``. So every answer tells whether a worker with its table
took the connection, and any failure shows as a non-404 or no answer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import ADMIN_KEY_PREFIX, new_key
from tests.router.backends import wait_until
from tests.support.platform import free_port
from tests.support.prober import Prober

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "berth_svc_test-handover"
ADDRESSED = {"X-Berth-Project": "nope", "X-Berth-Environment": "production"}


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Every process of the group (a supervisor, its workers, orphans)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "BERTH_SERVICE_TOKEN": TOKEN, "BERTH_ADMIN_KEY": new_key(ADMIN_KEY_PREFIX),
           "BERTH_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.registry", "--port", str(port),
         "--database-url", f"sqlite:///{tmp_path / 'registry.db'}", "--log-file", str(tmp_path / "registry.log")],
        cwd=ROOT, env=env, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        def serving() -> bool:
            try:
                with grpc.insecure_channel(address) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until(serving, timeout=30, what="the registry serves")
        yield address
    finally:
        kill_group(proc)


class Routers:
    """Router supervisors on one port (a successor after a predecessor),
    their log in one file; every process group killed at the end."""

    def __init__(self, tmp: Path, registry: str) -> None:
        self.tmp = tmp
        self.registry = registry
        self.port = free_port()
        self.log_path = tmp / "router.log"
        self.groups: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        environment = {**os.environ, "TMPDIR": str(self.tmp), "BERTH_SERVICE_TOKEN": TOKEN, **(env or {})}
        if "BERTH_OWNER" not in (env or {}):
            environment.pop("BERTH_OWNER", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.router", "--port", str(self.port), "--workers", "2",
             "--registry", self.registry, "--scheduler", "127.0.0.1:9", "--secrets", "127.0.0.1:9",
             "--shutdown-grace", "2", "--log-file", str(self.log_path), *extra],
            cwd=ROOT, env=environment, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.groups.append(proc)
        return proc

    def events(self, name: str, pid: int | None = None) -> list[dict[str, object]]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        found = []
        for line in lines:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
        return found

    def worker_pids(self, supervisor: subprocess.Popen[bytes]) -> dict[int, int]:
        """worker index -> pid of the latest worker started by ``supervisor``."""
        pids: dict[int, int] = {}
        children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        mine = set(map(int, children.read_text().split())) if children.exists() else set()
        for event in self.events("worker_started"):
            if int(event["pid"]) in mine:  # type: ignore[call-overload]
                pids[int(event["worker"])] = int(event["pid"])  # type: ignore[call-overload]
        return pids

    def answers_with_table(self, times: int = 20) -> bool:
        """``times`` new connections in a row, each answered by a worker with its table."""
        import http.client

        for _ in range(times):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/", headers=ADDRESSED)
                if conn.getresponse().status != 404:
                    return False
            except OSError:
                return False
            finally:
                conn.close()
        return True

    def close(self) -> None:
        for proc in self.groups:
            kill_group(proc)


@pytest.fixture
def routers(tmp_path: Path, registry: str) -> Iterator[Routers]:
    group = Routers(tmp_path, registry)
    try:
        yield group
    finally:
        group.close()


def prober_for(routers: Routers, seconds: float) -> Prober:
    return Prober("127.0.0.1", routers.port, headers=ADDRESSED, concurrency=8, max_seconds=seconds)


def report(name: str, figures: dict[str, object]) -> None:
    print(f"\nFAULT {name}: {json.dumps(figures)}")


def test_a_restarted_worker_never_answers_router_starting_while_its_sibling_serves(routers: Routers) -> None:
    supervisor = routers.start()
    wait_until(lambda: len(routers.worker_pids(supervisor)) == 2 and routers.answers_with_table(), timeout=30,
               what="both workers serve with their tables")
    victim = routers.worker_pids(supervisor)[1]
    with prober_for(routers, 30) as prober:
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: routers.worker_pids(supervisor).get(1, victim) != victim, timeout=10,
                   what="worker 1 restarted")
        replacement = routers.worker_pids(supervisor)[1]
        wait_until(lambda: any(e.get("worker") == 1 and e.get("table_loaded") for e in routers.events("serving")
                               if e.get("worker") is not None)
                   and len([e for e in routers.events("serving") if e.get("worker") == 1]) >= 2,
                   timeout=20, what="the replacement takes connections")
        serving_again = time.monotonic()
        time.sleep(1.0)
    figures = prober.summary(ok=(404,))
    figures["seconds_to_replacement_serving"] = round(serving_again - killed, 2)
    report("router worker SIGKILL (worker-only harness)", figures)
    statuses = figures["statuses"]
    assert isinstance(statuses, dict)
    starting = [o for o in prober.outcomes if o.detail == "router_starting"]
    assert not starting, f"{len(starting)} answers 503 router_starting"
    # only connections the killed worker held (keep-alive or in flight) may fail: at most one per prober thread
    failed = [o for o in prober.outcomes if o.status != 404]
    assert len(failed) <= 8, figures
    assert all(o.status == 0 for o in failed), figures
    assert statuses.get("404", 0) > 500
    # while the replacement loaded, its sibling accepted on its socket
    assert any(e.get("sibling") == 1 for e in routers.events("covering_sibling")), "no sibling covered socket 1"
    assert alive(replacement)


def test_a_successor_supervisor_takes_over_from_orphans_without_a_failed_request(routers: Routers) -> None:
    first = routers.start("--orphan-timeout", "30")
    wait_until(lambda: len(routers.worker_pids(first)) == 2 and routers.answers_with_table(), timeout=30,
               what="both workers serve with their tables")
    orphans = routers.worker_pids(first)
    shared_dirs_before = set(routers.tmp.glob("berth-router-*"))
    with prober_for(routers, 40) as prober:
        time.sleep(1.0)
        killed = time.monotonic()
        first.kill()  # SIGKILL the supervisor alone: its workers are orphaned
        first.wait()
        wait_until(lambda: len(routers.events("orphaned_offering_socket")) == 2, timeout=5,
                   what="both orphans offer their sockets")
        second = routers.start("--orphan-timeout", "30")  # what berth up does at once
        wait_until(lambda: not any(alive(pid) for pid in orphans.values()), timeout=30,
                   what="the orphans handed over and left")
        handed_over = time.monotonic()
        wait_until(routers.answers_with_table, timeout=10, what="the successor serves")
        time.sleep(1.0)
    figures = prober.summary(ok=(404,))
    figures["seconds_to_orphans_gone"] = round(handed_over - killed, 2)
    report("router supervisor SIGKILL + successor (worker-only harness)", figures)
    assert figures["failed"] == 0, figures
    assert len(routers.events("handed_over")) == 2
    took = routers.events("took_over_orphans")
    assert took and sorted(took[-1]["orphans"]) == sorted(orphans.values())  # type: ignore[call-overload]
    assert len(routers.worker_pids(second)) == 2
    # the last orphan removed its supervisor's shared directory
    wait_until(lambda: not (shared_dirs_before & set(routers.tmp.glob("berth-router-*"))), timeout=5,
               what="the orphans' shared directory removed")


def test_orphans_without_a_successor_serve_then_leave(routers: Routers) -> None:
    first = routers.start("--orphan-timeout", "2")
    wait_until(lambda: len(routers.worker_pids(first)) == 2 and routers.answers_with_table(), timeout=30,
               what="both workers serve with their tables")
    orphans = routers.worker_pids(first)
    first.kill()
    first.wait()
    orphaned = time.monotonic()
    assert routers.answers_with_table()  # still serving, for now
    wait_until(lambda: not any(alive(pid) for pid in orphans.values()), timeout=15, what="the orphans left")
    assert time.monotonic() - orphaned < 8
    with pytest.raises(OSError):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", routers.port, timeout=2)
        try:
            conn.request("GET", "/metrics")
            conn.getresponse()
        finally:
            conn.close()
    assert {e["why"] for e in routers.events("orphan_leaving")} == {"orphan_timeout"}


def test_orphans_of_a_dead_berth_up_leave_at_once(routers: Routers) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from berth import local

        wait_until(lambda: local.process_start_time(owner.pid) is not None, timeout=5)
        first = routers.start("--orphan-timeout", "60", env={"BERTH_OWNER": local.owner_token(owner.pid)})
        wait_until(lambda: len(routers.worker_pids(first)) == 2 and routers.answers_with_table(), timeout=30,
                   what="both workers serve with their tables")
        orphans = routers.worker_pids(first)
        owner.kill()
        owner.wait()
        first.kill()
        first.wait()
        gone_from = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in orphans.values()), timeout=10, what="the orphans left")
        assert time.monotonic() - gone_from < 5
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_supervisor_refuses_a_port_another_process_listens_on(routers: Routers) -> None:
    import socket

    stranger = socket.socket()
    try:
        # SO_REUSEPORT and the same user: exactly what the router's own bind would silently join
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", routers.port))
        stranger.listen()
        proc = routers.start()
        assert proc.wait(30) == 3
        refused = routers.events("cannot_listen")
        assert refused and str(routers.port) in str(refused[0]["error"]) and f"pid {os.getpid()}" in \
            str(refused[0]["error"]), refused
    finally:
        stranger.close()
