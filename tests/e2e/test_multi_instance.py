"""Several instances of each service (issue 15, the platform part).

- Address lists: one address is today's channel; several are round_robin
  over health-checked instances (a NOT_SERVING one gets no call) with gRPC
  retries of idempotent methods only.
- ``berth up --instances 2`` refuses to run without PostgreSQL (exit 2).
- On a real two-of-each platform on one PostgreSQL database: platform.json
  lists every instance, the CLI uses the lists, and with one of the two
  registries SIGKILLed (each in turn) no retried call fails.
- Routers agree: a REST move through one router answers ``routed`` once the
  other routes by it too (that router then answers with the new
  deployment), and names the routers that lag otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from berth import errors, local
from berth.client import Client, Endpoints, channel_arguments, channel_target, split_addresses
from berth.internal.v1 import scheduler_internal_pb2, scheduler_internal_pb2_grpc
from berth.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.router.api import ApiError, RestApi, Services
from services.router.table import RoutingState
from tests.e2e.ha_platform import HaPlatform
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context
from tests.support.platform import ROOT, eventually
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

# ---------------------------------------------------------------- address lists


def test_an_address_setting_is_one_address_or_a_list() -> None:
    assert split_addresses("127.0.0.1:1") == ["127.0.0.1:1"]
    assert split_addresses(" 127.0.0.1:1 , 127.0.0.1:2,") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert channel_target("registry:50051") == "registry:50051"  # one: exactly as before (DNS, pick_first)
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_arguments("127.0.0.1:1", "scheduler")[1] == []
    for bad in ("", " , ", "no-port", "127.0.0.1:0", "127.0.0.1:x", ":80"):
        with pytest.raises(ValueError):
            split_addresses(bad)


def test_a_bad_address_is_refused_by_name_by_services_and_cli(tmp_path: Path) -> None:


    from services.common.config import add_common_flags

    parser = argparse.ArgumentParser(prog="berth-test", exit_on_error=False)
    add_common_flags(parser, default_port=1)
    args = parser.parse_args(["--registry", "127.0.0.1:1,127.0.0.1:2", "--scheduler", "10.0.0.1:5"])
    assert args.registry == "127.0.0.1:1,127.0.0.1:2" and args.scheduler == "10.0.0.1:5"
    with pytest.raises(argparse.ArgumentError, match="'registry-2' is not host:port"):
        parser.parse_args(["--registry", "127.0.0.1:1,registry-2"])
    result = subprocess.run(
        [sys.executable, "-m", "berth.cli", "env", "list", "--project", "p"], capture_output=True, text=True,
        timeout=60, cwd=ROOT, env={**os.environ, "BERTH_SECRETS_ADDR": "127.0.0.1:1,secrets",
                                   "BERTH_API_KEY": "berth_pk_x", "BERTH_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "secrets address" in result.stderr and "BERTH_SECRETS_ADDR" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_list_retries_only_idempotent_methods() -> None:
    _, options = channel_arguments("127.0.0.1:1,127.0.0.1:2", "registry")
    config = json.loads(dict(options)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "berth.v1.Registry"}
    retried = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("berth.v1.Registry", "ListHistory") in retried
    assert ("berth.internal.v1.RegistryInternal", "Authenticate") in retried
    assert ("berth.internal.v1.SchedulerInternal", "ListRouters") in retried
    for unsafe in ("Promote", "Rollback", "Deploy", "AdjustReplicas", "CreateProject", "RevokeApiKey"):
        assert ("berth.v1.Registry", unsafe) not in retried
    assert ("berth.v1.Secrets", "SetSecret") not in retried
    assert ("berth.internal.v1.RegistryInternal", "Watch") not in retried  # a stream


class _Pair:
    """Two real gRPC servers with grpc.health.v1; each answers Check for its
    own name ("a" or "b") and NOT_FOUND for the other's, so the answer to
    Check(service="a") tells which instance a call reached."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[str, tuple[grpc.aio.Server, health.aio.HealthServicer, int]] = {}
        for name in ("a", "b"):
            self.servers[name] = self.run(self._start(name))

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, name: str):  # type: ignore[no-untyped-def]
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("berth.v1.Scheduler", health_pb2.HealthCheckResponse.SERVING)
        return server, servicer, port

    def leading(self, name: str) -> None:
        for other, (_, servicer, _) in self.servers.items():
            status = health_pb2.HealthCheckResponse.SERVING if other == name else health_pb2.HealthCheckResponse.NOT_SERVING
            self.run(servicer.set("berth.v1.Scheduler", status))

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for _, _, port in self.servers.values())

    def close(self) -> None:
        for server, _, _ in self.servers.values():
            self.run(server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _reached(ch: grpc.Channel, n: int) -> list[str]:
    stub = health_pb2_grpc.HealthStub(ch)
    found = []
    for _ in range(n):
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="a"), timeout=5)
            found.append("a")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # type: ignore[attr-defined]
            found.append("b")
    return found


def test_a_list_spreads_calls_and_skips_an_instance_that_is_not_serving() -> None:
    pair = _Pair()
    try:
        target, options = channel_arguments(pair.addresses, "scheduler")
        with grpc.insecure_channel(target, options=options) as ch:
            assert set(eventually(lambda: set(_reached(ch, 20)) == {"a", "b"} and {"a", "b"},
                                  what="calls reach both instances")) == {"a", "b"}
            pair.leading("b")  # a reports NOT_SERVING for berth.v1.Scheduler (a standby)
            eventually(lambda: set(_reached(ch, 5)) == {"b"}, what="calls avoid the standby")
            assert set(_reached(ch, 30)) == {"b"}
            pair.leading("a")
            eventually(lambda: set(_reached(ch, 5)) == {"a"}, what="calls follow the new leader")
            assert set(_reached(ch, 30)) == {"a"}
    finally:
        pair.close()


# ---------------------------------------------------------------- routers agree


class _FakeRouters:
    def __init__(self, *processes: tuple[str, int, bool], listening: float = 60.0) -> None:
        self.processes = list(processes)
        self.listening = listening
        self.calls = 0

    async def __call__(self, timeout: float) -> scheduler_internal_pb2.ListRoutersResponse:
        self.calls += 1
        return scheduler_internal_pb2.ListRoutersResponse(
            routers=[scheduler_internal_pb2.RouterProcess(router=r, reporter=f"{r}/{i}", revision=rev, loaded=loaded)
                     for i, (r, rev, loaded) in enumerate(self.processes)],
            live_window_seconds=3.0, listening_seconds=self.listening,
        )


def test_the_scheduler_lists_routers_heard_within_the_live_window() -> None:
    from services.scheduler.routers import RouterRevisions

    now = [100.0]
    revisions = RouterRevisions(live_window=3.0, clock=lambda: now[0])
    report = scheduler_internal_pb2.ReportLoadRequest
    revisions.record(report(reporter="h:1", router="127.0.0.1:8080", revision=7, loaded=True))
    revisions.record(report(reporter="h:2", router="127.0.0.1:8180", revision=6, loaded=True))
    revisions.record(report(reporter="h:3"))  # an older router tells no revision: not listed
    now[0] += 2.0
    revisions.record(report(reporter="h:1", router="127.0.0.1:8080", revision=9, loaded=True))
    listed = revisions.live()
    assert [(r.reporter, r.router, r.revision) for r in listed.routers] == [
        ("h:1", "127.0.0.1:8080", 9), ("h:2", "127.0.0.1:8180", 6)]
    assert listed.listening_seconds == 2.0 and listed.live_window_seconds == 3.0
    now[0] += 1.5  # h:2 silent for 3.5 s: gone
    assert [r.reporter for r in revisions.live().routers] == ["h:1"]


def _lagging(routers: _FakeRouters, revision: int, wait: float) -> list[dict[str, object]]:
    async def go() -> list[dict[str, object]]:
        api = RestApi(None, RoutingState(), routers=routers, router_name="127.0.0.1:8080")  # type: ignore[arg-type]
        return await api._lagging_routers(revision, asyncio.get_running_loop().time() + wait)

    return asyncio.run(go())


def test_a_move_waits_for_every_live_router_and_names_those_that_lag() -> None:
    caught_up = _FakeRouters(("127.0.0.1:8080", 7, True), ("127.0.0.1:8180", 7, True), ("127.0.0.1:8180", 9, True))
    assert _lagging(caught_up, 7, 1.0) == []
    behind = _FakeRouters(("127.0.0.1:8080", 7, True), ("127.0.0.1:8180", 6, True))
    lagging = _lagging(behind, 7, 0.3)
    assert [(r["router"], r["revision"]) for r in lagging] == [("127.0.0.1:8180", 6)]
    assert behind.calls > 1  # it waited, asking again
    # A router that has not loaded its table routes nothing: not waited for.
    assert _lagging(_FakeRouters(("127.0.0.1:8180", 0, False)), 7, 0.3) == []
    # A scheduler that took over a moment ago may not have heard from every router...
    young = _lagging(_FakeRouters(("127.0.0.1:8080", 7, True), ("127.0.0.1:8180", 7, True), listening=0.5), 7, 0.3)
    assert [r["router"] for r in young] == ["*"]
    # ... which a router that has never seen another one does not wait for.
    alone = _FakeRouters(("127.0.0.1:8080", 7, True), listening=0.5)
    assert _lagging(alone, 7, 2.0) == [] and alone.calls == 1


def test_a_new_leaders_first_snapshots_cannot_empty_the_routers_pool() -> None:
    """A scheduler that just took the lease may stream bindings with no
    address before it has looked at the engine: for a grace after the stream
    opens, the router keeps the addresses it had for them."""
    from services.router.watchers import Backoff, EndpointWatcher
    from tests.router.test_watchers import BREAK, TOKEN, FakeScheduler, endpoint_snapshot, start_grpc
    from tests.router.test_watchers import eventually as eventually_async

    key = ("env-prod", "dep-1")

    async def go() -> None:
        fake = FakeScheduler()
        fake.current = endpoint_snapshot({key: ["10.0.0.1:8080", "10.0.0.2:8080"]})
        server, port, _ = await start_grpc(
            lambda s: scheduler_internal_pb2_grpc.add_SchedulerInternalServicer_to_server(fake, s))
        state = RoutingState()
        watcher = EndpointWatcher(f"127.0.0.1:{port}", TOKEN, state, backoff=Backoff(initial=0.01, maximum=0.05))
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(watcher.synced.wait(), 5)
            for nothing_yet in (endpoint_snapshot({}), endpoint_snapshot({key: []})):  # the new leader has not looked
                fake.current = nothing_yet
                await fake.push(BREAK)
                streams = len(fake.queues)
                await eventually_async(lambda streams=streams: len(fake.queues) > streams, what="reconnected")
                await asyncio.sleep(0.2)
                assert state.endpoints.get(key) == ("10.0.0.1:8080", "10.0.0.2:8080")
            await fake.push(endpoint_snapshot({key: ["10.0.0.3:8080"]}))  # it looked: taken as it is
            await eventually_async(lambda: state.endpoints.get(key) == ("10.0.0.3:8080",), what="real addresses")
            watcher.handover_grace = 0.0  # past the grace, an empty set empties the pool
            fake.current = endpoint_snapshot({key: []})
            await fake.push(BREAK)
            await eventually_async(lambda: state.endpoints.get(key) == (), what="emptied after the grace")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(go())


# ---------------------------------------------------------------- moves sent again safely


class _FlakyRegistry(registry_pb2_grpc.RegistryServicer):
    """One environment and its history, with compare-and-swap like the real
    registry. ``faults`` says what each Promote does: "commit-then-fail" (the
    entry is written, the caller gets UNAVAILABLE, as when an instance dies
    after its commit), "fail" (UNAVAILABLE, nothing written), "ok"."""

    def __init__(self, faults: list[str]) -> None:
        self.faults = faults
        self.entries: list[common_pb2.HistoryEntry] = []
        self.promotes = 0

    def _append(self, deployment_id: str) -> common_pb2.HistoryEntry:
        entry = common_pb2.HistoryEntry(environment_id="env_1", sequence=len(self.entries) + 1,
                                        kind=common_pb2.HistoryEntry.KIND_PROMOTE, deployment_id=deployment_id)
        self.entries.append(entry)
        return entry

    def env(self) -> common_pb2.Environment:
        return common_pb2.Environment(id="env_1", name="staging", sequence=len(self.entries),
                                      deployment_id=self.entries[-1].deployment_id if self.entries else "")

    async def ListEnvironments(self, request, context):  # type: ignore[no-untyped-def,override]
        return registry_pb2.ListEnvironmentsResponse(environments=[self.env()])

    async def ListHistory(self, request, context):  # type: ignore[no-untyped-def,override]
        return registry_pb2.ListHistoryResponse(entries=self.entries)

    async def Promote(self, request, context):  # type: ignore[no-untyped-def,override]
        self.promotes += 1
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "instance went away")
        if fault == "late-commit":  # slow past the caller's deadline: commits a moment after failing the call
            expected = request.expected_sequence

            async def later() -> None:
                await asyncio.sleep(0.03)
                if len(self.entries) == expected:
                    self._append(request.deployment_id)

            self._late = asyncio.get_running_loop().create_task(later())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "deadline passed")
        if self.entries and self.entries[-1].deployment_id == request.deployment_id:  # checked first, as the registry
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "deployment already serves the environment")
        if request.HasField("expected_sequence") and request.expected_sequence != len(self.entries):
            await context.abort(grpc.StatusCode.ABORTED, "sequence moved")
        entry = self._append(request.deployment_id)
        if fault == "commit-then-fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "instance went away after its commit")
        return registry_pb2.PointerMoveResponse(environment=self.env(), entry=entry)


def _promote_through_flaky(faults: list[str], expected: int | None = None) -> tuple[int, dict[str, Any], _FlakyRegistry]:
    async def go() -> tuple[int, dict[str, Any], _FlakyRegistry]:
        fake = _FlakyRegistry(faults)
        server = grpc.aio.server()
        registry_pb2_grpc.add_RegistryServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            services = Services(f"127.0.0.1:{port}", f"127.0.0.1:{port}", f"127.0.0.1:{port}")
            api = RestApi(services, RoutingState(), routing_wait=0.05)
            request = registry_pb2.PromoteRequest(deployment_id="dep_b", target_environment="staging")
            if expected is not None:
                request.expected_sequence = expected
            try:
                response = await api.move(services.registry.Promote, request, "staging", "key", kind="promote",
                                          deployment_id="dep_b")
                status, body = response.status, json.loads(response.body)
            except ApiError as exc:
                status, body = exc.status, {"error": exc.message}
            await asyncio.sleep(0.3)  # a late commit lands (or is refused by the swap) before counting
            await services.close()
            return status, body, fake
        finally:
            await server.stop(None)

    return asyncio.run(go())


def test_a_move_whose_answer_was_lost_is_settled_never_applied_twice() -> None:
    # The instance committed, then died before answering: the history has it; not sent again.
    status, body, fake = _promote_through_flaky(["commit-then-fail"])
    assert status == 200 and body["entry"]["sequence"] == 1 and body["entry"]["deployment_id"] == "dep_b"
    assert len(fake.entries) == 1 and fake.promotes == 1
    # It died before committing: sent again under the same sequence, applied once.
    status, body, fake = _promote_through_flaky(["fail"])
    assert status == 200 and len(fake.entries) == 1 and fake.promotes == 2
    # Committed, no answer, and the second send lost the swap to it: settled as this move, not a third send.
    status, body, fake = _promote_through_flaky(["fail", "commit-then-fail", "ok"], expected=0)
    assert status == 200 and len(fake.entries) == 1 and body["entry"]["sequence"] == 1
    # Committed, no answer, and the next send refused on a precondition the first one created ("already
    # serves"): settled from the history, not answered 412.
    status, body, fake = _promote_through_flaky(["late-commit", "ok"])
    assert status == 200 and len(fake.entries) == 1 and body["entry"]["deployment_id"] == "dep_b", (status, body)
    # It commits late, after the call failed: sent again only under the same sequence, so once, whichever
    # of the two sends wins.
    for delay_faults in (["late-commit"], ["late-commit", "fail", "fail"]):
        status, body, fake = _promote_through_flaky(list(delay_faults))
        assert status == 200 and len(fake.entries) == 1, (delay_faults, status, body, fake.entries)
    # The caller's own expected_sequence that another move overtook: 409, nothing applied.
    status, body, fake = _promote_through_flaky([], expected=5)
    assert status == 409 and fake.entries == []
    # Every send fails: 503, nothing applied (the caller may send it again).
    status, body, fake = _promote_through_flaky(["fail"] * 10)
    assert status == 503 and fake.entries == [] and fake.promotes == 4


# ---------------------------------------------------------------- berth up --instances


def test_instances_without_postgresql_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "berth.cli", "up", "--instances", "2", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "PostgreSQL" in result.stderr and "--database-url" in result.stderr
    assert not (tmp_path / "data" / local.PLATFORM_FILE).exists()


@pytest.fixture
def ha(tmp_path: Path, postgres_url: str) -> Iterator[HaPlatform]:  # noqa: F811
    p = HaPlatform(tmp_path / "data", postgres_url, instances=2)
    p.data_dir.mkdir()
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


def _reads(client: Client, stop: threading.Event, outcomes: list[str], limit: float = 120) -> None:
    """Idempotent calls in a loop (bounded), each recorded as ok or the error."""
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < limit:
        try:
            client.call(client.registry.ListEnvironments, registry_pb2.ListEnvironmentsRequest(), timeout=10)
            client.call(client.registry.ListDeployments, registry_pb2.ListDeploymentsRequest(), timeout=10)
            outcomes.append("ok")
        except errors.BerthError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")


@pytest.mark.docker
@pytest.mark.e2e
def test_two_of_each_one_registry_killed_fails_no_retried_call(ha: HaPlatform) -> None:
    info = ha.platform_file()
    assert info["registry"] == f"127.0.0.1:{ha.port('registry', 0)},127.0.0.1:{ha.port('registry', 1)}"
    assert info["scheduler"] == f"127.0.0.1:{ha.port('scheduler', 0)},127.0.0.1:{ha.port('scheduler', 1)}"
    assert info["routers"] == ha.routers
    names = set(ha.records())
    for service in ("registry", "secrets", "scheduler", "router"):
        assert {service, f"{service}-1"} <= names
    ha.wait_all_healthy()
    assert ha.leader() is not None  # exactly one scheduler leads

    key = ha.cli_json("projects", "create", "ha")["api_key"]
    assert {e["name"] for e in ha.cli_json("env", "list", "--project", "ha", api_key=key)["environments"]} >= {
        "preview", "staging", "production"}
    endpoints = local.endpoints(ha.data_dir)
    assert endpoints == Endpoints(registry=info["registry"], secrets=info["secrets"], scheduler=info["scheduler"])

    figures: dict[str, dict[str, int]] = {}
    with Client(api_key=key, endpoints=endpoints) as client:
        for victim in ("registry-1", "registry"):
            stop, outcomes = threading.Event(), []
            thread = threading.Thread(target=_reads, args=(client, stop, outcomes))
            thread.start()
            try:
                eventually(lambda: len(outcomes) >= 20, what="calls before the kill")
                killed = ha.kill(victim)
                before = len(outcomes)
                ha.wait_restarted(victim, killed.pid)
                eventually(lambda: len(outcomes) >= before + 50, timeout=60, what="calls after the kill")
                # One instance lost at a time: the restarted one serves again
                # before its twin is the next victim.
                ha.wait_all_healthy()
            finally:
                stop.set()
                thread.join(30)
            failed = [o for o in outcomes if o != "ok"]
            figures[victim] = {"calls": len(outcomes), "failed": len(failed)}
            assert not failed, failed[:5]
            ha.wait_all_healthy()
    print("MULTI_INSTANCE", json.dumps(figures))


@pytest.mark.docker
@pytest.mark.e2e
def test_a_move_through_one_router_is_routed_by_the_other(ha: HaPlatform, tmp_path: Path) -> None:
    key = ha.cli_json("projects", "create", "agree")["api_key"]
    deployed = {}
    for version in ("v1", "v2"):
        write_worker_context(str(tmp_path / version), version=version)
        deployed[version] = ha.cli_json("deploy", str(tmp_path / version), "--project", "agree",
                                        api_key=key)["deployment"]["id"]
    ha.wait_all_healthy()
    headers = {"X-API-KEY": key}
    for i, version in enumerate(("v1", "v2", "v1", "v2")):
        via, other = ha.routers[i % 2], ha.routers[(i + 1) % 2]
        answer = requests.post(f"{via}/api/v1/deployments/promote", headers=headers, timeout=30,
                               json={"source_deployment_id": deployed[version], "target_environment_id": "staging"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["routed"] is True and "lagging" not in body, body
        # Read your write through the other router, at once.
        seen = requests.get(other + "/", timeout=30,
                            headers={"X-Berth-Project": "agree", "X-Berth-Environment": "staging"})
        assert seen.headers.get("X-Berth-Deployment") == deployed[version], (seen.status_code, seen.text[:200])
