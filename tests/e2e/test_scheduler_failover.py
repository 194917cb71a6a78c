"""Scheduler leader election and fencing on real processes (issue 15): a
registry and a secrets service on a throwaway PostgreSQL, two schedulers on
the same database and the same Docker engine, a busybox worker deployed
through the CLI.

- Failover: the leader is SIGKILLed; the standby leads (reports SERVING for
  the scheduler's services) within a bound, adopts the replicas that run —
  the same containers, none duplicated, none orphaned — and acts in its own
  epoch. The seconds from the kill to the new leader are printed.
- Fencing: the leader is stopped (SIGSTOP) until its lease expires and the
  standby leads; the binding is scaled so the new leader creates a replica
  (which an old leader still believing in 2 replicas would remove); then
  SIGCONT: the old leader makes no engine change (Docker's own event log for
  the platform's containers stays empty) and reports itself standby.

``pytest -s`` shows the figures (``FAILOVER {...}`` lines)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.platform import PDEATHSIG_WRAPPER
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.remote import credentials
from tests.support.docker_engine import build_worker_image, engine
from tests.support.platform import eventually, free_port
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEDULER_SERVICE = "berth.v1.Scheduler"
LEASE = 3.0  # seconds; the default is 5
READY = getattr(scheduler_pb2.Replica, "STATE_READY", "ready")  # an enum now, a string before
TAKEOVER_BOUND = 30.0  # a correctness timeout, not a performance target (bench/scheduler_failover.py)


class Relay:
    """A TCP relay on 127.0.0.1 to ``target`` that can hold its traffic
    (``hold``/``flow``): a scheduler's links to the registry and to the
    database cut for a while — a partitioned leader, whose desired state is
    stale and whose lease renewals hang."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.flowing.clear()

    def flow(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self._closed.set()
        self.flowing.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the target is gone (stopping): refuse this one
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while not self._closed.is_set():
                self.flowing.wait()
                for key, _ in selector.select(timeout=0.2):
                    if not self.flowing.is_set():
                        break  # held: leave the bytes where they are
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            a.close()
            b.close()


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: pathlib.Path

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class ControlPlane:
    """Registry, secrets and N schedulers as separate processes on one
    PostgreSQL database; every container they run carries this plane's own
    ``berth.instance``."""

    root: pathlib.Path
    database_url: str
    lease: float = LEASE
    # The test process's pid in the name: ``sweep_stale`` knows whose replicas these are.
    instance: str = field(default_factory=lambda: f"failover{os.getpid()}x{uuid.uuid4().hex[:8]}")
    token: str = field(default_factory=lambda: f"berth_svc_{uuid.uuid4().hex}")
    admin_key: str = field(default_factory=lambda: f"berth_admin_{uuid.uuid4().hex}")
    procs: dict[str, Proc] = field(default_factory=dict)
    relays: dict[str, list[Relay]] = field(default_factory=dict)
    api_key: str = ""
    project: str = ""

    def __post_init__(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "cli").mkdir(exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("BERTH_REGISTRY_ADDR", "BERTH_SECRETS_ADDR", "BERTH_SCHEDULER_ADDR", "BERTH_PORT",
                                 "BERTH_DATABASE_URL", "BERTH_SCHEDULER_DATABASE_URL")}
        self.env.update(BERTH_DATA_DIR=str(self.root / "data"), BERTH_SERVICE_TOKEN=self.token,
                        BERTH_ADMIN_KEY=self.admin_key, PYTHONUNBUFFERED="1")
        self.registry_port, self.secrets_port = free_port(), free_port()

    # -- processes ------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], port: int) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            # Dies with this process (PR_SET_PDEATHSIG), even when it is killed.
            process = subprocess.Popen(
                [sys.executable, "-S", "-c", PDEATHSIG_WRAPPER, str(os.getpid()), sys.executable, "-m", *args,
                 "--port", str(port)],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, process, port, log)
        self.procs[name] = proc
        return proc

    def start_services(self) -> None:
        self._spawn("registry", ["services.registry", "--database-url", self.database_url], self.registry_port)
        self._spawn("secrets", ["services.secrets", "--database-url", self.database_url,
                                "--registry", f"127.0.0.1:{self.registry_port}"], self.secrets_port)
        for name in ("registry", "secrets"):
            self.wait_health(self.procs[name], "", timeout=60)

    def start_scheduler(self, name: str, port: int | None = None) -> Proc:
        """A scheduler reaching the registry and the database through relays
        of its own (``partition``)."""
        base, _, database = self.database_url.rpartition("/")
        host, _, db_port = base.rpartition(":")
        registry, db = Relay(self.registry_port), Relay(int(db_port))
        self.relays[name] = [registry, db]
        return self._spawn(name, [
            "services.scheduler", "--registry", f"127.0.0.1:{registry.port}",
            "--secrets", f"127.0.0.1:{self.secrets_port}", "--instance", self.instance,
            "--database-url", f"{host}:{db.port}/{database}", "--lease-duration", str(self.lease),
            "--instance-name", name,
            "--reconcile-interval", "0.5", "--stop-grace", "1", "--drain-delay", "0.2",
        ], port or free_port())

    def schedulers(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n.startswith("sched") and p.alive()]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive():
                proc.process.send_signal(signal.SIGCONT)  # (a stopped one too)
                proc.process.kill()
                proc.process.wait(30)
        for relays in self.relays.values():
            for relay in relays:
                relay.close()

    def partition(self, proc: Proc, cut: bool) -> None:
        """Holds (or lets flow again) its traffic to the registry and the database."""
        for relay in self.relays[proc.name]:
            relay.hold() if cut else relay.flow()

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.tail()}" for p in self.procs.values())

    # -- health and leadership ----------------------------------------------------
    @staticmethod
    def health(proc: Proc, service: str) -> int | None:
        try:
            with grpc.insecure_channel(proc.addr) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=0.5)
                return int(answer.status)
        except grpc.RpcError:
            return None

    def wait_health(self, proc: Proc, service: str, timeout: float) -> None:
        def serving() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
            return self.health(proc, service) == health_pb2.HealthCheckResponse.SERVING

        eventually(serving, timeout=timeout, interval=0.05, what=f"{proc.name} serving {service or 'the process'}")

    def leads(self, proc: Proc) -> bool:
        return self.health(proc, SCHEDULER_SERVICE) == health_pb2.HealthCheckResponse.SERVING

    def leaders(self) -> list[Proc]:
        return [p for p in self.schedulers() if self.leads(p)]

    def one_leader(self, timeout: float = 60) -> Proc:
        found = eventually(lambda: self.leaders() if len(self.leaders()) == 1 else None, timeout=timeout,
                           interval=0.05, what="exactly one scheduler leading")
        return found[0]

    # -- the user's side -------------------------------------------------------------
    def cli(self, *args: str, scheduler: Proc | None = None) -> Any:
        env = {**self.env, "BERTH_REGISTRY_ADDR": f"127.0.0.1:{self.registry_port}",
               "BERTH_SECRETS_ADDR": f"127.0.0.1:{self.secrets_port}", "BERTH_DATA_DIR": str(self.root / "cli"),
               "BERTH_API_KEY": self.api_key, "BERTH_PROJECT": self.project}
        if scheduler is not None:
            env["BERTH_SCHEDULER_ADDR"] = scheduler.addr
        result = subprocess.run([sys.executable, "-m", "berth.cli", *args, "--output", "json"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"berth {' '.join(args)} failed: {result.stderr}{self.logs()}")
        return json.loads(result.stdout)["data"]

    def create_project(self) -> None:
        created = self.cli("projects", "create", f"failover-{uuid.uuid4().hex[:6]}")
        self.api_key, self.project = created["api_key"], created["project"]["name"]

    def status(self, proc: Proc, deployment_id: str) -> scheduler_pb2.DeploymentStatus:
        with grpc.insecure_channel(proc.addr) as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetDeploymentStatus(
                scheduler_pb2.GetDeploymentStatusRequest(deployment_id=deployment_id),
                metadata=credentials(self.api_key), timeout=5)

    def ready(self, proc: Proc, deployment_id: str, count: int) -> scheduler_pb2.DeploymentStatus | None:
        try:
            status = self.status(proc, deployment_id)
        except grpc.RpcError:
            return None
        [binding] = status.bindings
        ready = sorted(r.index for r in binding.replicas if r.state == READY)
        return status if ready == list(range(count)) and len(binding.replicas) == count else None

    def refusal(self, standby: Proc, deployment_id: str, leader: Proc) -> grpc.RpcError | None:
        """The standby's answer to a status call, once it names ``leader``."""
        try:
            self.status(standby, deployment_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and f"the leader is {leader.name}" in exc.details():
                return exc
            return None
        raise AssertionError(f"{standby.name} answered status although {leader.name} leads")

    # -- the engine's truth ----------------------------------------------------------
    def containers(self) -> list[docker.models.containers.Container]:
        return engine().containers.list(all=True, filters={"label": f"berth.instance={self.instance}"},
                                        ignore_removed=True)

    def replicas(self) -> list[tuple[int, str, str, int]]:
        """(replica index, container id, status, epoch) of every container of this plane."""
        return sorted((int(c.labels["berth.replica"]), c.id, c.status, int(c.labels.get("berth.epoch", "0")))
                      for c in self.containers())

    def remove_containers(self) -> None:
        for c in self.containers():
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass


_OWNED = re.compile(r"^failover(\d+)x[0-9a-f]+$")


def sweep_stale() -> None:
    """Removes the replicas of planes whose test process is gone (a run
    killed before its cleanup); never another live run's."""
    client = engine()
    for c in client.containers.list(all=True, filters={"label": "berth.managed=true"}, ignore_removed=True):
        match = _OWNED.match(c.labels.get("berth.instance", ""))
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its run is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            c.remove(force=True)
        except docker.errors.APIError:
            pass


def lease_row(database_url: str, instance: str) -> tuple[str, int]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT holder, epoch FROM scheduler_leases WHERE name = %s", (instance,)).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


@pytest.fixture(scope="module")
def worker_tag() -> Iterator[str]:
    client = engine()
    tag, image_id = build_worker_image(client, version="failover")
    yield tag
    try:
        client.images.remove(image_id, force=True)
    except docker.errors.APIError:
        pass


@pytest.fixture
def plane(tmp_path: pathlib.Path, postgres_url: str) -> Iterator[ControlPlane]:  # noqa: F811
    sweep_stale()
    p = ControlPlane(tmp_path, postgres_url)
    try:
        p.start_services()
        p.create_project()
        yield p
    except BaseException:
        sys.stderr.write(p.logs())
        raise
    finally:
        p.stop()
        p.remove_containers()


def deploy(plane: ControlPlane, tag: str, replicas: int, leader: Proc) -> str:
    created = plane.cli("deploy", "--image", tag, "--env", "preview", "--min-replicas", str(replicas),
                        "--max-replicas", str(replicas), "--no-wait")
    deployment_id = created["deployment"]["id"]
    eventually(lambda: plane.ready(leader, deployment_id, replicas), timeout=90, interval=0.2,
               what=f"{replicas} ready replicas")
    return str(deployment_id)


def test_standby_takes_over_within_seconds_and_adopts_what_runs(plane: ControlPlane, worker_tag: str) -> None:
    first, second = plane.start_scheduler("sched-a"), plane.start_scheduler("sched-b")
    for proc in (first, second):
        plane.wait_health(proc, "", timeout=60)  # both up, desired state loaded
    leader = plane.one_leader()
    standby = second if leader is first else first
    deployment_id = deploy(plane, worker_tag, 2, leader)
    holder, epoch = lease_row(plane.database_url, plane.instance)
    assert holder == leader.name

    # The standby serves gRPC but sends status to the leader, by name.
    refusal = eventually(lambda: plane.refusal(standby, deployment_id, leader), timeout=20,
                         what="a refusal naming the leader")
    assert refusal.code() == grpc.StatusCode.UNAVAILABLE
    assert "is a standby" in refusal.details()
    assert plane.health(standby, SCHEDULER_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    # `berth deployment status` says which instance leads.
    shown = plane.cli("deployment", "status", deployment_id, scheduler=leader)
    assert shown["scheduler_leader"] == {"instance": leader.name, "epoch": epoch}

    before = plane.replicas()
    assert [i for i, *_ in before] == [0, 1] and {e for *_, e in before} == {epoch}

    leader.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    leader.process.wait(10)
    eventually(lambda: plane.leads(standby), timeout=TAKEOVER_BOUND, interval=0.02, what="the standby leading")
    took = time.monotonic() - killed
    print(f"\nFAILOVER {json.dumps({'lease_s': plane.lease, 'takeover_s': round(took, 2)})}")

    # Adopted: the same two containers, nothing created or removed.
    status = eventually(lambda: plane.ready(standby, deployment_id, 2), timeout=60, what="status from the new leader")
    assert status.scheduler_leader.instance == standby.name and status.scheduler_leader.epoch == epoch + 1
    time.sleep(4 * 0.5)  # a few passes of the new leader (interval 0.5 s)
    assert plane.replicas() == before, "the new leader changed replicas that were running fine"
    assert lease_row(plane.database_url, plane.instance) == (standby.name, epoch + 1)

    # It acts in its own epoch.
    plane.cli("deployment", "scale", deployment_id, "--min-replicas", "3", "--max-replicas", "3")
    eventually(lambda: plane.ready(standby, deployment_id, 3), timeout=60, what="3 ready replicas")
    after = plane.replicas()
    assert [i for i, *_ in after] == [0, 1, 2], after  # no duplicate index, no orphan
    assert after[:2] == before and after[2][3] == epoch + 1


def test_a_paused_old_leader_makes_no_engine_change_after_resuming(plane: ControlPlane, worker_tag: str) -> None:
    first, second = plane.start_scheduler("sched-a"), plane.start_scheduler("sched-b")
    for proc in (first, second):
        plane.wait_health(proc, "", timeout=60)
    old = plane.one_leader()
    new = second if old is first else first
    deployment_id = deploy(plane, worker_tag, 2, old)
    _, old_epoch = lease_row(plane.database_url, plane.instance)

    # Cut it from the registry and the database, then stop it: when it
    # resumes, its desired state is stale (2 replicas) while the engine runs
    # 3, and its lease renewals hang; only its own clock and the epochs on
    # the containers tell it to keep its hands off.
    plane.partition(old, cut=True)
    old.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        eventually(lambda: plane.leads(new), timeout=TAKEOVER_BOUND, interval=0.02, what="the standby leading")
        took = time.monotonic() - stopped
        # The new leader acts: a third replica. The old one, when it resumes,
        # still believes in 2 replicas and, unfenced, would remove it.
        plane.cli("deployment", "scale", deployment_id, "--min-replicas", "3", "--max-replicas", "3")
        eventually(lambda: plane.ready(new, deployment_id, 3), timeout=60, what="3 ready replicas under the new leader")
        before = plane.replicas()
        assert [i for i, *_ in before] == [0, 1, 2] and before[2][3] == old_epoch + 1
        time.sleep(1.0)  # let the engine settle so every event below comes after the resume
        since = time.time()
    finally:
        old.process.send_signal(signal.SIGCONT)
    resumed = time.monotonic()

    # Watch it for several reconcile intervals and a lease: it must keep quiet.
    time.sleep(plane.lease + 5 * 0.5)
    until = time.time()
    figures = {"lease_s": plane.lease, "takeover_after_sigstop_s": round(took, 2),
               "watched_after_sigcont_s": round(time.monotonic() - resumed, 2)}
    print(f"\nFAILOVER {json.dumps(figures)}")

    changes = [
        (e.get("Action"), e.get("Actor", {}).get("Attributes", {}).get("name"),
         e.get("Actor", {}).get("Attributes", {}).get("berth.epoch"))
        for e in engine().api.events(since=since, until=until, decode=True,
                                     filters={"type": "container", "label": f"berth.instance={plane.instance}"})
        if not str(e.get("Action", "")).startswith(("exec_", "health_status"))
    ]
    assert changes == [], f"engine changes after the old leader resumed: {changes}{plane.logs()}"
    assert plane.replicas() == before
    # It knows it lost the lease and reports itself standby.
    eventually(lambda: plane.health(old, SCHEDULER_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING,
               timeout=10, interval=0.05, what="the old leader reporting NOT_SERVING")
    assert old.alive() and not plane.leads(old) and plane.leads(new)
    assert lease_row(plane.database_url, plane.instance) == (new.name, old_epoch + 1)
    log = old.tail(20000)
    assert "standing_down" in log or "lease_expired_locally" in log, log
    # Reconnected, it sends status to the new leader, by name.
    plane.partition(old, cut=False)
    refusal = eventually(lambda: plane.refusal(old, deployment_id, new), timeout=20, what="a refusal naming the leader")
    assert refusal.code() == grpc.StatusCode.UNAVAILABLE
    assert plane.replicas() == before
