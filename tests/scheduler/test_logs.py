"""Replica logs (services/scheduler/logs.py) on a real Docker engine: the
reconciler runs busybox workers that print to stdout and stderr; the logs
are read through the adapter as the scheduler reads them, and over gRPC
(``Scheduler.StreamDeploymentLogs``) on an in-process server."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import docker
import grpc
import pytest
from google.protobuf import timestamp_pb2

from berth import enums, errors
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.auth import SERVICE_PRINCIPAL, Principal
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler import logs as logs_module
from services.scheduler.desired import DesiredTable
from services.scheduler.docker_adapter import DockerAdapter
from services.scheduler.events import EventStore
from services.scheduler.logs import CrashTails, DeploymentLogs, LogEntry, LogQuery, RateLimit
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAMES, add_to_server
from services.scheduler.spec import SecretValue

from .conftest import FakeSecrets, make_binding, wait_for

pytestmark = pytest.mark.docker

BB = "/bin/busybox"
CANARY = "canary-51d0e2-not-a-real-secret"
HTTPD = f"exec {BB} httpd -f -p 8080 -h /"
KEYS = {
    "svc-token": SERVICE_PRINCIPAL,
    "key-owner": Principal(project_id="proj-1", project_name="shop", key_name="ci"),
    "key-other": Principal(project_id="proj-2", project_name="other", key_name="ci"),
}


async def fake_authenticate(api_key: str) -> Principal:
    if api_key not in KEYS:
        raise errors.Unauthenticated("unknown key")
    return KEYS[api_key]


def fast(instance: str) -> SchedulerConfig:
    return SchedulerConfig(
        instance=instance, reconcile_interval=0.3, stop_grace=1.0, drain_delay=0.1, quick_exit=2.0,
        restart_backoff=0.1, restart_backoff_max=0.5, crash_loop_after=3,
    )


@contextlib.asynccontextmanager
async def platform(
    adapter: DockerAdapter, instance: str, bindings: list, data_dir: str | None, secrets: FakeSecrets | None = None,
) -> AsyncIterator[tuple[DesiredTable, Reconciler, DeploymentLogs]]:
    table = DesiredTable()
    table.replace([], bindings)
    reconciler = Reconciler(adapter, table, secrets or FakeSecrets(), EventStore(), fast(instance))
    tails = CrashTails(adapter, table, data_dir)
    adapter.before_remove = tails.keep
    task = asyncio.create_task(reconciler.run())
    try:
        yield table, reconciler, DeploymentLogs(adapter, instance, tails)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reconciler.close()
        adapter.before_remove = None


async def read_all(logs: DeploymentLogs, query: LogQuery) -> list[LogEntry]:
    return [e async for e in logs.read(query)]


class Follow:
    """Collects a follow's lines in a task until stopped."""

    def __init__(self, logs: DeploymentLogs, query: LogQuery) -> None:
        self.lines: list[LogEntry] = []
        self._gen = logs.read(query)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for entry in self._gen:
            self.lines.append(entry)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._gen.aclose()


def printer(count: int, tag: str) -> list[str]:
    """Prints ``count`` numbered lines to stdout and to stderr, then serves."""
    script = (
        f"i=0; while [ $i -lt {count} ]; do echo {tag}-out-$i; echo {tag}-err-$i >&2; i=$((i+1)); "
        f"{BB} usleep 20000; done; {HTTPD}"
    )
    return [BB, "sh", "-c", script]


def ticker(tag: str) -> list[str]:
    """Serves, and prints a line every 0.2 s naming its container."""
    script = f"(while true; do echo {tag}-tick-$HOSTNAME; {BB} usleep 200000; done) & {HTTPD}"
    return [BB, "sh", "-c", script]


def test_merged_order_streams_since_and_tail(adapter, instance, busybox_image, tmp_path):
    binding = make_binding(image="", image_id=busybox_image, min_replicas=2, max_replicas=2,
                           command=printer(5, "p"))
    dep = binding.deployment.id
    query = LogQuery(deployment_id=dep, environment_ids=frozenset({binding.environment_id}))

    async def scenario() -> None:
        async with platform(adapter, instance, [binding], str(tmp_path)) as (_, _, logs):
            await wait_for(lambda: _count(logs, query, 20), timeout=60, what="20 lines from two replicas")
            lines = await read_all(logs, query)
            assert len(lines) == 20
            assert [e.time for e in lines] == sorted(e.time for e in lines)  # merged in time order
            assert len({e.replica_id for e in lines}) == 2
            assert {e.replica_index for e in lines} == {0, 1}
            for e in lines:  # each line on the stream it was printed to
                assert e.stream == ("stdout" if "-out-" in e.text else "stderr"), e
                assert not e.archived and e.dropped == 0
            for replica in {e.replica_id for e in lines}:  # each replica's own order kept
                mine = [e.text for e in lines if e.replica_id == replica and e.stream == "stdout"]
                assert mine == [f"p-out-{i}" for i in range(5)]

            tail = await read_all(logs, LogQuery(**{**query.__dict__, "tail": 3}))
            assert tail == lines[-3:]
            assert await read_all(logs, LogQuery(**{**query.__dict__, "tail": 0})) == []

            cut = lines[10].time
            since = await read_all(logs, LogQuery(**{**query.__dict__, "since": cut}))
            assert since and all(e.time >= cut for e in since)
            assert since == [e for e in lines if e.time >= cut]

            one = lines[0].replica_id
            for name in (one, one[:8], "0" if lines[0].replica_index == 0 else "1"):
                only = await read_all(logs, LogQuery(**{**query.__dict__, "replica": name}))
                assert only and {e.replica_id for e in only} == {one}, name
            with pytest.raises(errors.NotFound):
                await logs.check_replica(LogQuery(**{**query.__dict__, "replica": "ffffffffffff"}), 2)

    asyncio.run(scenario())


async def _count(logs: DeploymentLogs, query: LogQuery, n: int) -> bool:
    return len(await read_all(logs, query)) >= n


def test_follow_sees_scale_up_and_the_replacement_of_a_crashed_replica(
    docker_client: docker.DockerClient, adapter, instance, busybox_image, tmp_path
):
    binding = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=3, command=ticker("t"))
    dep = binding.deployment.id
    query = LogQuery(deployment_id=dep, environment_ids=frozenset({binding.environment_id}), tail=0, follow=True)

    async def scenario() -> None:
        async with platform(adapter, instance, [binding], str(tmp_path)) as (table, _, logs):
            await wait_for(lambda: _count(logs, LogQuery(**{**query.__dict__, "follow": False, "tail": None}), 1),
                           timeout=60, what="the first replica printing")
            follow = Follow(logs, query)
            try:
                await wait_for(lambda: follow.lines, timeout=30, what="a followed line")
                first = {e.replica_id for e in follow.lines}
                assert len(first) == 1

                # Scale-up: a replica created after the follow began joins it.
                bigger = make_binding(image="", image_id=busybox_image, min_replicas=2, max_replicas=3,
                                      command=ticker("t"), deployment_id=dep, environment_id=binding.environment_id)
                table.upsert_binding(bigger)
                await wait_for(lambda: len({e.replica_id for e in follow.lines}) >= 2, timeout=60,
                               what="a line from the new replica")
                new = {e.replica_id for e in follow.lines} - first
                assert {e.replica_index for e in follow.lines if e.replica_id in new} == {1}

                # A crash: replica 0 is killed; its replacement joins the follow.
                [crashed] = first
                docker_client.containers.get(crashed).kill()
                await wait_for(
                    lambda: any(e.replica_index == 0 and e.replica_id not in first for e in follow.lines),
                    timeout=60, what="a line from replica 0's replacement",
                )
                replacement = {e.replica_id for e in follow.lines if e.replica_index == 0} - first
                assert len(replacement) == 1
                for e in follow.lines:
                    assert e.text == f"t-tick-{e.replica_id[:12]}"  # the container's own line
                    assert e.stream == "stdout"
                # Each replica's lines in its order; across replicas within the
                # reorder window (a replica found by a later listing may send
                # lines older than ones already sent: sent, never dropped).
                for replica in {e.replica_id for e in follow.lines}:
                    times = [e.time for e in follow.lines if e.replica_id == replica]
                    assert times == sorted(times)
                # No line twice (the backlog/follow seam and re-listing re-read nothing).
                keys = [(e.replica_id, e.time, e.text) for e in follow.lines]
                assert len(keys) == len(set(keys))
            finally:
                await follow.stop()
            # Every reader thread of the follow ends with it (its engine stream closed).
            await wait_for(lambda: logs.following == 0, timeout=10, what="the follow's readers ending")

    asyncio.run(scenario())


def test_crash_tail_kept_redacted_after_the_container_is_gone(
    docker_client: docker.DockerClient, adapter, instance, busybox_image, tmp_path
):
    script = (
        "i=0; while [ $i -lt 300 ]; do echo boot-$i; i=$((i+1)); done; "
        "echo \"mode $MODE\"; echo \"fatal: cannot connect with token $API_TOKEN\" >&2; exit 3"
    )
    binding = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                           command=[BB, "sh", "-c", script], variables={"MODE": "crashing"})
    dep = binding.deployment.id
    query = LogQuery(deployment_id=dep, environment_ids=frozenset({binding.environment_id}))
    secrets = FakeSecrets([SecretValue("API_TOKEN", CANARY, 1)])

    async def scenario() -> None:
        async with platform(adapter, instance, [binding], str(tmp_path), secrets) as (table, _, logs):
            await wait_for(lambda: logs.tails.records(dep), timeout=60, what="a kept crash tail")
            # Stop the binding: every container of it is removed; the tails stay.
            table.replace([], [make_binding(image="", image_id=busybox_image, min_replicas=0, max_replicas=0,
                                            command=[BB, "sh", "-c", script], deployment_id=dep,
                                            environment_id=binding.environment_id,
                                            variables={"MODE": "crashing"})])
            await wait_for(lambda: not docker_client.containers.list(
                all=True, filters={"label": [f"berth.instance={instance}", f"berth.deployment={dep}"]}, ignore_removed=True),
                timeout=60, what="no container left")
            lines = await read_all(logs, query)
        assert lines and all(e.archived for e in lines)
        fatal = [e for e in lines if e.text.startswith("fatal:")]
        assert fatal and all(e.stream == "stderr" for e in fatal)
        assert all(e.text == "fatal: cannot connect with token [redacted]" for e in fatal)
        assert all(CANARY not in e.text for e in lines)
        # A crashed replica's kept tail: the last 200 stdout lines and its stderr.
        crashed = fatal[-1].replica_id
        stdout = [e.text for e in lines if e.replica_id == crashed and e.stream == "stdout"]
        assert stdout == [f"boot-{i}" for i in range(101, 300)] + ["mode crashing"]  # a plain variable stays
        assert len({e.replica_id for e in lines}) <= logs_module.MAX_TAILS
        # On disk under the data dir, redacted there too.
        stored = os.listdir(tmp_path / "crash-tails")
        assert stored and all(name.endswith(".json") for name in stored)
        for name in stored:
            text = (tmp_path / "crash-tails" / name).read_text()
            assert CANARY not in text
            assert json.loads(text)["deployment_id"] == dep

    asyncio.run(scenario())


def test_crash_tails_are_bounded_in_count_and_age(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(logs_module, "MAX_TAILS", 3)
    tails = CrashTails(adapter, DesiredTable(), str(tmp_path))
    dep = "dep_000000000001"

    def store(name: str, stored_at: float) -> None:
        tails._store(dep, name, {"container_id": name, "deployment_id": dep, "stored_at": stored_at, "lines": []})

    for i in range(5):
        store(f"c{i}", time.time())
    # At most MAX_TAILS files: the oldest go first.
    assert sorted(os.listdir(tmp_path / "crash-tails")) == [f"{dep}--c{i}.json" for i in (2, 3, 4)]
    assert sorted(r["container_id"] for r in tails.records(dep)) == ["c2", "c3", "c4"]
    # Older than TAIL_AGE: not answered, and removed at the next store.
    old = time.time() - logs_module.TAIL_AGE - 60
    os.utime(tmp_path / "crash-tails" / f"{dep}--c2.json", (old, old))
    store("c5", old)
    assert "c5" not in {r["container_id"] for r in tails.records(dep)}
    assert f"{dep}--c2.json" not in os.listdir(tmp_path / "crash-tails")
    # Another deployment's tails are not read for this one.
    tails._store("dep_000000000002", "d0", {"container_id": "d0", "deployment_id": "dep_000000000002",
                                            "stored_at": time.time(), "lines": []})
    assert "d0" not in {r["container_id"] for r in tails.records(dep)}


def test_rate_limit_buckets():
    limit = RateLimit(lines=10, nbytes=1000, burst=2)
    passed = sum(limit.take(10, now=100.0) for _ in range(50))
    assert passed == 20  # the burst: two seconds of lines
    assert not limit.take(10, now=100.0)
    assert sum(limit.take(10, now=101.0) for _ in range(50)) == 10  # one second refills ten
    big = RateLimit(lines=1000, nbytes=100, burst=1)
    assert big.take(100, now=5.0) and not big.take(1, now=5.0)  # bytes bound too


def test_flood_is_rate_limited_and_every_dropped_line_counted(
    adapter, instance, busybox_image, tmp_path
):
    # 50 MB in 1000-byte lines as fast as the replica can print, then a last line.
    count, width = 50_000, 999
    script = (
        f"s=x; while [ ${{#s}} -lt {width} ]; do s=$s$s; done; s=${{s:0:{width}}}; "
        f"{BB} yes \"$s\" | {BB} head -n {count}; {BB} sleep 1; echo flood-done; {HTTPD}"
    )
    binding = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                           command=[BB, "sh", "-c", script])
    dep = binding.deployment.id
    query = LogQuery(deployment_id=dep, environment_ids=frozenset({binding.environment_id}), follow=True)
    peak_growth: list[int] = []

    async def scenario() -> None:
        async with platform(adapter, instance, [binding], str(tmp_path)) as (_, _, logs):
            follow = Follow(logs, query)
            base = _reset_peak_rss()
            try:
                await wait_for(lambda: any(e.text == "flood-done" for e in follow.lines), timeout=240,
                               what="the line after the flood")
            finally:
                await follow.stop()
            peak_growth.append(_peak_rss() - base)
        flood = [e for e in follow.lines if e.text.startswith("xxx")]
        dropped = sum(e.dropped for e in follow.lines)
        received_bytes = sum(len(e.text) + 1 for e in follow.lines)
        print(f"FLOOD lines_printed={count} received={len(flood)} dropped={dropped} bytes_received={received_bytes} "
              f"peak_rss_growth_mib={peak_growth[0] / 2**20:.1f}")
        # This process is the scheduler here: its peak memory grew by far less
        # than the 50 MB printed (the bound: the inbox's 4 MiB and the reorder heap).
        assert peak_growth[0] < 32 * 2**20
        assert all(len(e.text) == width for e in flood)
        assert dropped > 0 and len(flood) < count
        assert len(flood) + dropped == count  # nothing lost silently: each dropped line is counted
        assert received_bytes < count * (width + 1)

    asyncio.run(scenario())


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets the peak resident size to the current one (Linux clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _peak_rss()


# -- over gRPC ----------------------------------------------------------------
def _field(error: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return ""


def test_stream_deployment_logs_over_grpc(adapter, instance, busybox_image, tmp_path):
    binding = make_binding(image="", image_id=busybox_image, min_replicas=1, max_replicas=1,
                           command=printer(3, "g"))
    dep = binding.deployment.id

    async def scenario() -> None:
        async with platform(adapter, instance, [binding], str(tmp_path)) as (table, reconciler, logs):
            await wait_for(lambda: _count(logs, LogQuery(dep, frozenset({binding.environment_id})), 6),
                           timeout=60, what="6 lines")
            for served_logs, port_box in ((logs, []), (None, [])):
                server = await start_server(
                    host="127.0.0.1", port=0, service_names=SERVICE_NAMES,
                    register=lambda s, sl=served_logs: add_to_server(s, table, reconciler, EventStore(), logs=sl),
                    authenticate=fake_authenticate,
                )
                port_box.append(server.port)
                try:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                        stub = scheduler_pb2_grpc.SchedulerStub(channel)
                        if served_logs is None:  # the swarm runtime
                            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                                async for _ in stub.StreamDeploymentLogs(
                                    scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep),
                                    metadata=credentials("key-owner"), timeout=10,
                                ):
                                    pass
                            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
                            assert "swarm" in (unimplemented.value.details() or "")
                            continue
                        got = [line async for line in stub.StreamDeploymentLogs(
                            scheduler_pb2.StreamDeploymentLogsRequest(latest=True, project="shop", tail=4),
                            metadata=credentials("key-owner"), timeout=10,
                        )]
                        assert len(got) == 4
                        assert [enums.label(scheduler_pb2.LogLine.Stream, g.stream) for g in got] == [
                            "stdout" if "-out-" in g.text else "stderr" for g in got
                        ]
                        assert {g.environment for g in got} == {"staging"}
                        assert got[-1].text in ("g-out-2", "g-err-2")
                        times = [g.time.ToDatetime() for g in got]
                        assert times == sorted(times)

                        future = timestamp_pb2.Timestamp()
                        future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
                        refusals = (
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep, tail=-1), "key-owner",
                             grpc.StatusCode.INVALID_ARGUMENT, "tail"),
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep, tail=10001), "key-owner",
                             grpc.StatusCode.INVALID_ARGUMENT, "tail"),
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep, since=future), "key-owner",
                             grpc.StatusCode.INVALID_ARGUMENT, "since"),
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep), "key-other",
                             grpc.StatusCode.NOT_FOUND, ""),
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep, environment="prod"),
                             "key-owner", grpc.StatusCode.NOT_FOUND, ""),
                            (scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=dep, replica="abcdef0123"),
                             "key-owner", grpc.StatusCode.NOT_FOUND, ""),
                            (scheduler_pb2.StreamDeploymentLogsRequest(), "key-owner",
                             grpc.StatusCode.INVALID_ARGUMENT, "deployment_id"),
                        )
                        for request, key, code, field in refusals:
                            with pytest.raises(grpc.aio.AioRpcError) as refused:
                                async for _ in stub.StreamDeploymentLogs(request, metadata=credentials(key),
                                                                         timeout=10):
                                    pass
                            assert refused.value.code() == code, request
                            if field:
                                assert _field(refused.value) == field
                finally:
                    await server.server.stop(0)

    asyncio.run(scenario())


def test_a_standby_answers_not_leader(adapter, instance):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from services.scheduler.lease import LeaderElector, lease_store

    binding = make_binding(image="x", image_id="sha256:" + "0" * 64)
    events = EventStore()
    store = lease_store(events.engine, instance)
    leader = LeaderElector(store, identity="sched-a", address="10.0.0.1:50053", duration=60)
    standby = LeaderElector(store, identity="sched-b", duration=60)

    async def scenario() -> None:
        await leader._step(leader._clock())
        await standby._step(standby._clock())
        table = DesiredTable()
        table.replace([], [binding])
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, fast(instance))
        logs = DeploymentLogs(adapter, instance, CrashTails(adapter, table, None))
        server = await start_server(
            host="127.0.0.1", port=0, service_names=SERVICE_NAMES,
            register=lambda s: add_to_server(s, table, reconciler, events, leadership=standby, logs=logs),
            authenticate=fake_authenticate,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in stub.StreamDeploymentLogs(
                        scheduler_pb2.StreamDeploymentLogsRequest(deployment_id=binding.deployment.id),
                        metadata=credentials("key-owner"), timeout=10,
                    ):
                        pass
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                status = rpc_status.from_call(refused.value)
                assert status is not None
                reasons = []
                for detail in status.details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        reasons.append((info.reason, info.metadata.get("leader", "")))
                assert reasons == [("NOT_LEADER", "sched-a")]
        finally:
            await server.server.stop(0)

    asyncio.run(scenario())
