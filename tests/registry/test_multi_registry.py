"""Several registry processes on one PostgreSQL database: the change feed
lives in the database (the ``changes`` table, LISTEN/NOTIFY), so a watcher
on any instance sees every move committed through any instance, in commit
order, once, and resumes from a revision on another instance. On SQLite a
second process on the same file is refused.

Real registry processes (``python -m services.registry``) on free ports,
a real PostgreSQL cluster, real sockets; every process is killed at the
end, also when a test fails."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.client import error_from_rpc
from berth.errors import Aborted
from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from services.common.registry_watch import RegistryFollower, follow_instances
from services.registry.changes import LISTENER_APPLICATION_NAME, ChangeLog
from tests.registry.conftest import ADMIN_KEY, SERVICE_TOKEN, Registry, collect_until
from tests.support.platform import ROOT, free_port

STARTUP_SECONDS = 60


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.02)


class RegistryProcess:
    """``python -m services.registry`` on a free port, in its own session."""

    def __init__(self, database_url: str, tmp: Path, name: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.stderr = tmp / f"{name}.stderr"
        env = {**os.environ, "BERTH_SERVICE_TOKEN": SERVICE_TOKEN, "BERTH_ADMIN_KEY": ADMIN_KEY,
               "BERTH_DATA_DIR": str(tmp)}
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.registry", "--host", "127.0.0.1", "--port", str(self.port),
                 "--database-url", database_url, "--log-file", str(self.log)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.internal = registry_internal_pb2_grpc.RegistryInternalStub(self.channel)

    def wait_serving(self) -> RegistryProcess:
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"registry exited {self.proc.returncode}: {self.stderr.read_text()[-3000:]}")
            try:
                answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, timeout=STARTUP_SECONDS, what=f"the registry on {self.address} serves")
        return self

    def call(self, name: str, request, key: str):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.stub, name)(request, metadata=(("x-api-key", key),), timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def watch(self, since_revision: int = 0):  # type: ignore[no-untyped-def]
        return self.internal.Watch(
            registry_internal_pb2.WatchRequest(since_revision=since_revision),
            metadata=(("x-api-key", SERVICE_TOKEN),), timeout=120,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.channel.close()
        self.kill()


@pytest.fixture
def pg_url(postgres_cluster):  # type: ignore[no-untyped-def]
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)


@pytest.fixture
def two_registries(pg_url: str, tmp_path: Path) -> Iterator[tuple[RegistryProcess, RegistryProcess]]:
    """Registries A and B on one PostgreSQL database, started at once (one
    migrates, the other waits on the migration lock)."""
    a = RegistryProcess(pg_url, tmp_path, "a")
    b = RegistryProcess(pg_url, tmp_path, "b")
    try:
        a.wait_serving()
        b.wait_serving()
        yield a, b
    finally:
        a.close()
        b.close()


def is_move(event) -> bool:  # type: ignore[no-untyped-def]
    return event.WhichOneof("change") == "environment" and event.environment.sequence > 0


def move_key(event) -> tuple[int, str, int, str]:  # type: ignore[no-untyped-def]
    env = event.environment
    return event.revision, env.name, env.sequence, env.deployment_id


class Collector:
    """Reads one watch stream in a thread, keeping every event after the
    snapshot marker."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream
        self.events: list = []  # type: ignore[type-arg]
        self.marker = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                if self.marker is None:
                    if event.snapshot_complete:
                        self.marker = event
                        self.ready.set()
                    continue
                self.events.append(event)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        finally:
            self.ready.set()

    def moves(self) -> list[tuple[int, str, int, str]]:
        return [move_key(e) for e in list(self.events) if is_move(e)]

    def stop(self) -> None:
        self.stream.cancel()
        self._thread.join(10)


def test_moves_through_a_reach_a_watch_on_b_in_order_with_gap_free_revisions(two_registries):
    a, b = two_registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    watcher = Collector(b.watch())
    assert watcher.ready.wait(30) and watcher.marker is not None and not watcher.marker.resumed
    start = watcher.marker.revision

    made = []
    for n in range(10):
        resp = a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        made.append((resp.environment.name, resp.entry.sequence, resp.deployment.id))
    wait_until(lambda: len(watcher.moves()) >= 10, timeout=30, what="B's watcher saw the 10 moves made through A")
    watcher.stop()
    assert watcher.error is None

    seen = watcher.moves()
    assert [(name, seq, dep) for _, name, seq, dep in seen] == made
    # One revision per move, handed out in commit order with no gap, and
    # every event of a revision together (the deploy's bindings too).
    assert [rev for rev, *_ in seen] == list(range(start + 1, start + 11))
    revisions = [e.revision for e in watcher.events]
    assert revisions == sorted(revisions)
    binding_revisions = {e.revision for e in watcher.events if e.WhichOneof("change") == "binding"}
    assert binding_revisions == {rev for rev, *_ in seen}


def test_concurrent_moves_through_both_reach_every_watcher_once_in_one_order(two_registries):
    a, b = two_registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    lanes = 4
    for lane in range(lanes):
        a.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name=f"lane-{lane}"), key)
    watchers = [Collector(a.watch()), Collector(b.watch()), Collector(b.watch())]
    for w in watchers:
        assert w.ready.wait(30) and w.marker is not None

    committed: list[tuple[str, int, str]] = []  # (environment, sequence, deployment) of every move that succeeded
    aborted = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def writer(lane: int) -> None:
        via = (a, b)[lane % 2]
        try:
            for n in range(6):
                resp = via.call("Deploy", registry_pb2.DeployRequest(image=f"app:{lane}.{n}", environment=f"lane-{lane}"), key)
                with lock:
                    committed.append((resp.environment.name, resp.entry.sequence, resp.deployment.id))
                # Every lane also races the others for "staging": the losers
                # of the compare-and-swap get ABORTED and record nothing.
                try:
                    moved = via.call("Promote", registry_pb2.PromoteRequest(
                        deployment_id=resp.deployment.id, target_environment="staging"), key)
                except Aborted:
                    with lock:
                        aborted.append(resp.deployment.id)
                    continue
                with lock:
                    committed.append((moved.environment.name, moved.entry.sequence, moved.environment.deployment_id))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(lane,)) for lane in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not failures, failures
    expected = len(committed)
    for w in watchers:
        wait_until(lambda w=w: len(w.moves()) >= expected, timeout=60, what="every watcher saw every committed move")
    for w in watchers:
        w.stop()
        assert w.error is None

    orders = [w.moves() for w in watchers]
    assert orders[0] == orders[1] == orders[2]  # one order, whichever instance
    seen = orders[0]
    assert len(seen) == expected and len(set(seen)) == expected  # each once
    assert sorted((name, seq, dep) for _, name, seq, dep in seen) == sorted(committed)
    # One transaction per successful move, revisions handed out in commit
    # order: contiguous (a lost compare-and-swap rolls back, releasing its
    # revision to the next writer).
    revisions = [rev for rev, *_ in seen]
    assert revisions == list(range(watchers[0].marker.revision + 1, watchers[0].marker.revision + 1 + expected))
    # Per environment the sequences run 1, 2, 3, ... with no gap.
    for env_name in {name for _, name, _, _ in seen}:
        assert [seq for _, name, seq, _ in seen if name == env_name] == list(
            range(1, 1 + sum(1 for _, n, _, _ in seen if n == env_name)))
    # The registry's history agrees with what the watchers saw.
    history = a.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging", page_size=1000), key)
    assert [(e.sequence, e.deployment_id) for e in history.entries] == [
        (seq, dep) for _, name, seq, dep in seen if name == "staging"]


def test_resume_on_b_after_moves_through_a(two_registries):
    a, b = two_registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    first = a.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    stream = b.watch()
    collect_until(stream, lambda e: e.snapshot_complete)
    a.call("Promote", registry_pb2.PromoteRequest(deployment_id=first.id, target_environment="staging"), key)
    seen = collect_until(stream, lambda e: is_move(e) and e.environment.name == "staging")
    stream.cancel()  # the watcher goes away; moves continue through A meanwhile
    last = seen[-1].revision

    made = []
    for n in range(2, 5):
        dep = a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key).deployment
        made.append(("preview", dep.id))
    moved = a.call("Rollback", registry_pb2.RollbackRequest(environment="preview"), key)
    made.append(("preview", moved.environment.deployment_id))

    resumed = b.watch(since_revision=last)
    replay = collect_until(resumed, lambda e: e.snapshot_complete)
    resumed.cancel()
    assert replay[-1].resumed
    assert all(e.revision > last for e in replay[:-1])  # nothing repeated
    assert [(e.environment.name, e.environment.deployment_id) for e in replay if is_move(e)] == made  # nothing lost
    assert [e.revision for e in replay if is_move(e)] == list(range(last + 1, last + 5))


def test_watcher_fails_over_to_the_other_registry_when_one_is_killed(two_registries):
    a, b = two_registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    environments: dict[str, tuple[int, str]] = {}
    applied_moves: list[tuple[str, int]] = []
    syncs: list[bool] = []
    broken: list[str] = []

    def apply(event) -> None:  # type: ignore[no-untyped-def]
        if is_move(event):
            applied_moves.append((event.environment.name, event.environment.sequence))
        if event.WhichOneof("change") == "environment":
            environments[event.environment.name] = (event.environment.sequence, event.environment.deployment_id)

    def replace(events) -> None:  # type: ignore[no-untyped-def]
        environments.clear()
        for event in events:
            if event.WhichOneof("change") == "environment":
                environments[event.environment.name] = (event.environment.sequence, event.environment.deployment_id)

    follower = RegistryFollower(apply, replace)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    # B first; when B dies, A.
    task = asyncio.run_coroutine_threadsafe(follow_instances(
        follower, [b.address, a.address], (("x-api-key", SERVICE_TOKEN),),
        synced=syncs.append, broken=lambda address, error: broken.append(address), max_streams=20,
    ), loop)
    try:
        wait_until(lambda: len(syncs) == 1, timeout=30, what="the watcher synced on B")
        for n in range(5):
            a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        wait_until(lambda: len(applied_moves) == 5, timeout=30, what="B streamed the first 5 moves")
        b.kill()  # SIGKILL mid-stream
        for n in range(5, 10):
            a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        wait_until(lambda: len(applied_moves) >= 10, timeout=60, what="the watcher resumed on A")
        assert broken[:1] == [b.address]
        assert syncs == [False, True]  # a snapshot on B, then resumed on A from its revision
        assert applied_moves == [("preview", seq) for seq in range(1, 11)]  # nothing lost, nothing twice
        truth = a.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments
        assert environments == {env.name: (env.sequence, env.deployment_id) for env in truth}
    finally:
        task.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_second_registry_on_one_sqlite_file_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    first = RegistryProcess(url, tmp_path, "first")
    second = None
    try:
        first.wait_serving()
        second = RegistryProcess(url, tmp_path, "second")
        assert second.proc.wait(STARTUP_SECONDS) != 0
        # With --log-file the process's stderr goes to its log file too.
        message = second.stderr.read_text() + (second.log.read_text() if second.log.exists() else "")
        assert "another registry process" in message and "SQLite" in message and "PostgreSQL" in message, message
        assert str(first.proc.pid) in message
        # The first one serves on, unharmed.
        first.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY)
        first.close()
        # Once it is gone (even killed), the file may be served again.
        third = RegistryProcess(url, tmp_path, "third")
        try:
            third.wait_serving()
            created = third.call("CreateProject", registry_pb2.CreateProjectRequest(name="other"), ADMIN_KEY)
            assert created.project.name == "other"
        finally:
            third.close()
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_revision_older_than_the_table_keeps_gets_a_snapshot(pg_url):
    reg = Registry(pg_url)
    try:
        _, key = reg.create_project("shop")
        for n in range(6):
            reg.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        current = reg.service.current_revision()
        log = ChangeLog(reg.service._sessions)
        assert log.prune(keep=3) > 0
        # Kept: the last 3 revisions -> resumes from current - 3 on.
        replay = collect_until(reg.watch(since_revision=current - 3), lambda e: e.snapshot_complete)
        assert replay[-1].resumed and {e.revision for e in replay[:-1]} == {current - 2, current - 1, current}
        # Older: a snapshot to replace the table with.
        snap = collect_until(reg.watch(since_revision=current - 4), lambda e: e.snapshot_complete)
        assert not snap[-1].resumed and snap[-1].revision == current
        assert {e.environment.name for e in snap if e.WhichOneof("change") == "environment"} == {
            "preview", "staging", "production"}
    finally:
        reg.close()


def test_a_registry_whose_listening_connection_is_cut_listens_again(two_registries, pg_url):
    a, b = two_registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        def listeners() -> list[int]:
            return [row[0] for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                (LISTENER_APPLICATION_NAME,),
            )]

        wait_until(lambda: len(listeners()) == 2, timeout=30, what="both registries listen")
        cut = listeners()
        for pid in cut:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: len(listeners()) == 2 and not set(listeners()) & set(cut), timeout=30,
                   what="both registries listen again on new connections")
    finally:
        admin.close()
    # ...and moves through A still reach a watcher on B, in order.
    watcher = Collector(b.watch())
    assert watcher.ready.wait(30)
    made = [a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key).deployment.id for n in range(3)]
    wait_until(lambda: len(watcher.moves()) >= 3, timeout=30, what="B's watcher saw the moves")
    watcher.stop()
    assert [dep for *_, dep in watcher.moves()] == made
