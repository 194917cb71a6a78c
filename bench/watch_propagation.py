"""Watch propagation across registry instances (issue 15, "Prove it"): two
registry processes on one PostgreSQL database, moves committed through A,
watched on B — against the same moves watched on A itself as the reference.

Two real registry processes (``python -m services.registry`` on free ports)
share a throwaway PostgreSQL cluster (``initdb``/``pg_ctl`` in a temp dir,
``fsync=off`` like the tests' cluster; tests/support/postgres.py). Two
watchers run on B — the platform-wide ``RegistryInternal.Watch`` (service
token: what routers and schedulers follow) and the project-scoped
``Registry.WatchEnvironments`` (a project key) — and the same two on A.

Each move is a Promote through A alternating two deployments in
``staging``, one at a time (the next once every watcher has it). A move's
propagation to a watcher is the time from its history entry's
``created_at`` (stamped by registry A inside the transaction, just before
commit) to the event's arrival in the watcher's thread; one clock (one
machine). A→B crosses the database: A's commit, PostgreSQL's NOTIFY to B's
listening connection, B's tailer reading the ``changes`` table, B's hub and
stream. A→A is the same path without the notification (A's writer wakes its
own tailer).

Prints p50/p99/max per watcher, the ratio of A→B to A→A and the target
(A→B p99 ≤ 50 ms); asserts nothing.

    python bench/watch_propagation.py [--moves 300] [--warmup 20]
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc  # noqa: E402
from berth.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402
from tests.support.postgres import running_cluster  # noqa: E402

ADMIN_KEY = "berth_admin_bench-admin-key"
SERVICE_TOKEN = "berth_svc_bench-service-token"
TARGET_P99_MS = 50.0
STARTUP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    def __init__(self, database_url: str, workdir: Path, name: str) -> None:
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "BERTH_SERVICE_TOKEN": SERVICE_TOKEN, "BERTH_ADMIN_KEY": ADMIN_KEY,
               "BERTH_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.registry", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
             "--database-url", database_url, "--log-file", str(workdir / f"{name}.log")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.internal = registry_internal_pb2_grpc.RegistryInternalStub(self.channel)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"registry {self.name} exited {self.proc.returncode}")
            try:
                answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"registry {self.name} did not serve within {STARTUP_SECONDS} s")

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Watcher:
    """One stream in its own thread; puts (arrival time, environment name,
    sequence) of every move after the opening on ``moves``."""

    def __init__(self, label: str, stream, public: bool) -> None:  # type: ignore[no-untyped-def]
        self.label = label
        self.stream = stream
        self.public = public
        self.moves: queue.Queue[tuple[float, str, int]] = queue.Queue()
        self.ready = threading.Event()
        self.samples: list[float] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        live = False
        try:
            for event in self.stream:
                now = time.time()
                if not live:
                    if event.snapshot_complete:
                        live = True
                        self.ready.set()
                    continue
                if self.public and event.WhichOneof("change") == "moved":
                    self.moves.put((now, event.moved.environment.name, event.moved.entry.sequence))
                elif not self.public and event.WhichOneof("change") == "environment":
                    self.moves.put((now, event.environment.name, event.environment.sequence))
        except grpc.RpcError:
            pass
        finally:
            self.ready.set()

    def arrival(self, sequence: int, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"{self.label}: move {sequence} did not arrive within {timeout} s")
            at, name, seq = self.moves.get(timeout=remaining)
            if name == "staging" and seq == sequence:
                return at


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    with running_cluster() as cluster, tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        url = cluster.create_database()
        a, b = Registry(url, Path(tmp), "a"), Registry(url, Path(tmp), "b")
        try:
            a.wait_serving()
            b.wait_serving()
            key = a.stub.CreateProject(registry_pb2.CreateProjectRequest(name="bench"),
                                       metadata=(("x-api-key", ADMIN_KEY),), timeout=10).api_key
            meta = (("x-api-key", key),)
            deps = [a.stub.Deploy(registry_pb2.DeployRequest(image=f"app:{n}"), metadata=meta, timeout=10).deployment.id
                    for n in range(2)]
            watchers = []
            for reg, where in ((b, "A→B"), (a, "A→A")):
                watchers.append(Watcher(f"{where} Watch (internal)", reg.internal.Watch(
                    registry_internal_pb2.WatchRequest(), metadata=(("x-api-key", SERVICE_TOKEN),)), public=False))
                watchers.append(Watcher(f"{where} WatchEnvironments", reg.stub.WatchEnvironments(
                    registry_pb2.WatchEnvironmentsRequest(), metadata=meta), public=True))
            for w in watchers:
                if not w.ready.wait(30):
                    raise SystemExit(f"{w.label} did not open")
            for n in range(args.warmup + args.moves):
                moved = a.stub.Promote(registry_pb2.PromoteRequest(
                    deployment_id=deps[n % 2], target_environment="staging"), metadata=meta, timeout=10)
                committed = moved.entry.created_at.seconds + moved.entry.created_at.nanos / 1e9
                for w in watchers:
                    at = w.arrival(moved.entry.sequence)
                    if n >= args.warmup:
                        w.samples.append((at - committed) * 1000)
            for w in watchers:
                w.stream.cancel()
        finally:
            a.stop()
            b.stop()

    print(f"watch propagation: {args.moves} moves through registry A (after {args.warmup} warm-up), "
          f"two registry processes on one PostgreSQL 15; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'watcher':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    figures = {}
    for w in watchers:
        p50, p99, top = percentile(w.samples, 50), percentile(w.samples, 99), max(w.samples)
        figures[w.label] = (p50, p99)
        print(f"{w.label:34} {p50:8.2f} {p99:8.2f} {top:8.2f}")
    for kind in ("Watch (internal)", "WatchEnvironments"):
        cross, local = figures[f"A→B {kind}"], figures[f"A→A {kind}"]
        print(f"{kind}: A→B / A→A  p50 ×{cross[0] / local[0]:.2f}  p99 ×{cross[1] / local[1]:.2f}; "
              f"target A→B p99 ≤ {TARGET_P99_MS:g} ms: {'met' if cross[1] <= TARGET_P99_MS else 'NOT met'}")


if __name__ == "__main__":
    main()
