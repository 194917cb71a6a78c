"""``python -m services.router --workers 2``: several router processes on one
port, as real processes over real sockets. No registry or scheduler runs:
each worker answers 503 "router_starting" (its table not loaded) while its
watches retry, which is all these tests need."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.router.workers import SharedState, listening_sockets, worker_count
from tests.router.backends import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_worker_count_flag() -> None:
    assert worker_count("3") == 3
    assert worker_count("auto") == min(8, os.cpu_count() or 1)
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="--workers"):
            worker_count(bad)


def test_listening_sockets_share_one_port() -> None:
    sockets = listening_sockets("127.0.0.1", 0, 3)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1 and ports != {0}
    finally:
        for s in sockets:
            s.close()


def test_shared_revisions_gate_until_every_worker_has_caught_up(tmp_path: Path) -> None:
    directory = SharedState.create(2)
    try:
        first, second = SharedState(directory, 0, 2), SharedState(directory, 1, 2)
        second.publish_revision(0, loaded=False)
        assert first.not_loaded() == [0, 1]  # nobody published yet / worker 1 still loading
        first.publish_revision(7)
        assert first.not_loaded() == [1]

        async def scenario() -> None:
            assert not await first.wait_for_revision(7, 0.05)  # worker 1 is still at 0
            waiting = asyncio.ensure_future(first.wait_for_revision(7, 5))
            await asyncio.sleep(0.02)
            assert not waiting.done()
            second.publish_revision(8)
            assert await asyncio.wait_for(waiting, 1)
            assert second.not_loaded() == []

        asyncio.run(scenario())
        assert first.revisions() == second.revisions() == [7, 8]
        second.publish_metrics({"requests": [], "fallbacks": [], "in_flight": [], "in_flight_total": 2, "held": 0})
        assert first.peer_metrics() == [{"requests": [], "fallbacks": [], "in_flight": [], "in_flight_total": 2,
                                         "held": 0}]
        assert second.peer_metrics() == []  # worker 0 has not published yet
        first.close()
        second.close()
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


class RouterProcess:
    """The router started with ``--workers 2`` on port 0, its log captured."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log_path = tmp / "router.log"
        env = {**os.environ, "TMPDIR": str(tmp), "BERTH_SERVICE_TOKEN": "test-token"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.router", "--port", "0", "--workers", "2",
             "--registry", "127.0.0.1:9", "--scheduler", "127.0.0.1:9", "--secrets", "127.0.0.1:9",
             "--shutdown-grace", "2"],
            cwd=ROOT, env=env, stderr=open(self.log_path, "wb"), start_new_session=True,  # noqa: SIM115
        )
        wait_until(lambda: len(self.events("serving")) == 3, timeout=30)  # the supervisor and both workers
        self.port = self.events("serving")[0]["port"]

    def events(self, name: str) -> list[dict[str, object]]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == name]

    def worker_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for event in self.events("worker_started"):
            pids[int(event["worker"])] = int(event["pid"])  # type: ignore[call-overload]
        return pids

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, body = self.get_full(path, headers)
        return status, body

    def get_full(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterProcess]:
    router = RouterProcess(tmp_path)
    yield router
    router.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def metric(text: str, name: str, **label_values: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(label_values.items()))
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} ([\d.e+]+)$" if wanted else rf"^{name} ([\d.e+]+)$",
                      text, re.M)
    return float(match.group(1)) if match else 0.0


def test_two_workers_share_the_port_add_up_metrics_and_are_restarted(router: RouterProcess) -> None:
    pids = router.worker_pids()
    assert sorted(pids) == [0, 1] and all(alive(p) for p in pids.values())

    # Every request on its own connection: the kernel spreads them over both workers.
    requests = 200
    for _ in range(requests):
        status, headers, body = router.get_full("/", {"X-Berth-Project": "shop", "X-Berth-Environment": "production"})
        # never "no such project" while the table is not loaded
        assert status == 503 and json.loads(body)["error"]["code"] == "router_starting", body
        assert headers["Retry-After"] == "1"
    status, body = router.get("/healthz")
    assert status == 503
    assert {"router worker 0 has not loaded its routing table",
            "router worker 1 has not loaded its routing table"} <= set(json.loads(body)["not_ready"])
    shared = next(router.tmp.glob("berth-router-*"))

    def served() -> list[int]:  # 5xx answers per worker, as each last published them
        counts = []
        for i in (0, 1):
            path = shared / f"metrics-{i}.json"
            snapshot = json.loads(path.read_text()) if path.exists() else {"requests": []}
            counts.append(sum(int(r[4]) for r in snapshot["requests"] if r[3] == "5xx"))
        return counts

    def total_seen() -> float:
        _, text = router.get("/metrics")
        return metric(text.decode(), "berth_router_requests_total", project="", environment="", deployment="",
                      status_class="5xx")

    # /metrics from any worker reports the whole router (others' figures within a second)
    wait_until(lambda: sum(served()) >= requests, timeout=10)
    assert all(n > 0 for n in served()), served()  # each worker answered some
    wait_until(lambda: total_seen() == sum(served()), timeout=10)
    _, text = router.get("/metrics")
    assert metric(text.decode(), "berth_router_workers") == 2.0

    # A worker that dies is replaced on its socket; the port keeps answering meanwhile.
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: len(router.events("worker_exited")) == 1, timeout=10)
    for _ in range(20):
        status, _ = router.get("/", {"X-Berth-Project": "shop", "X-Berth-Environment": "production"})
        assert status == 503
    wait_until(lambda: router.worker_pids()[1] != pids[1] and len(router.events("serving")) == 4, timeout=20)
    assert router.worker_pids()[0] == pids[0]

    # SIGTERM: the workers stop, then the supervisor, which removes the shared files.
    router.stop()
    assert router.proc.returncode == 0
    assert not any(alive(p) for p in router.worker_pids().values())
    assert not shared.exists()
    assert sum(1 for e in router.events("stopped")) == 3


def test_workers_do_not_outlive_a_killed_supervisor(router: RouterProcess) -> None:
    pids = router.worker_pids()
    router.proc.kill()  # SIGKILL: no chance to stop them itself
    router.proc.wait()
    wait_until(lambda: not any(alive(p) for p in pids.values()), timeout=15)
    with pytest.raises(OSError):  # nothing left listening on the port
        router.get("/metrics")
