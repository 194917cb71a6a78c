"""Pointer moves racing on real PostgreSQL through real gRPC, served by two
registry processes' worth of servers on the same database: correctness comes
from the database (locked revision row + compare-and-swap), not from any
in-process lock."""
from __future__ import annotations

import threading
import time

import grpc
import psycopg
import pytest

from berth.v1 import registry_pb2, registry_pb2_grpc
from tests.registry.conftest import Registry

CLIENTS = 32
ROUNDS = 4


@pytest.fixture
def pg_url(postgres_cluster):  # type: ignore[no-untyped-def]
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)


@pytest.fixture
def two_registries(pg_url):  # type: ignore[no-untyped-def]
    first = Registry(pg_url)
    second = Registry(pg_url)
    assert first.service.dialect == "postgresql"
    yield first, second
    first.close()
    second.close()


def promote(stub, key, dep, seq):  # type: ignore[no-untyped-def]
    try:
        return stub.Promote(
            registry_pb2.PromoteRequest(deployment_id=dep, target_environment="staging", expected_sequence=seq),
            metadata=(("x-api-key", key),), timeout=30,
        )
    except grpc.RpcError as exc:
        return exc


def test_32_clients_race_one_pointer(two_registries):
    first, second = two_registries
    _, key = first.create_project("shop")
    deps = [[first.call("Deploy", registry_pb2.DeployRequest(image=f"app:{r}-{c}"), key).deployment.id
             for c in range(CLIENTS)] for r in range(ROUNDS)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{reg.running.port}") for reg in (first, second)]
    stubs = [registry_pb2_grpc.RegistryStub(ch) for ch in channels]
    barrier = threading.Barrier(CLIENTS)
    results: list[list[object]] = [[None] * CLIENTS for _ in range(ROUNDS)]

    def client(i: int) -> None:
        stub = stubs[i % 2]
        for r in range(ROUNDS):
            barrier.wait(timeout=60)
            results[r][i] = promote(stub, key, deps[r][i], r)  # every client expects sequence r

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for ch in channels:
        ch.close()

    won = []
    for r in range(ROUNDS):
        winners = [x for x in results[r] if isinstance(x, registry_pb2.PointerMoveResponse)]
        losers = [x for x in results[r] if not isinstance(x, registry_pb2.PointerMoveResponse)]
        assert len(winners) == 1, f"round {r}: {len(winners)} winners"
        assert all(isinstance(x, grpc.RpcError) and x.code() == grpc.StatusCode.ABORTED for x in losers), [
            (x.code(), x.details()) for x in losers if isinstance(x, grpc.RpcError)]
        assert all("moved meanwhile" in x.details() for x in losers)  # type: ignore[union-attr]
        won.append(winners[0].entry)
    history = first.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries
    # Exactly the successful calls, in sequence order, no gaps, no duplicates.
    assert [(h.sequence, h.deployment_id) for h in history] == [(e.sequence, e.deployment_id) for e in won]
    assert [h.sequence for h in history] == list(range(1, ROUNDS + 1))
    assert [h.previous_deployment_id for h in history] == ["", *(h.deployment_id for h in history[:-1])]
    env = {e.name: e for e in second.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments}
    assert (env["staging"].deployment_id, env["staging"].sequence) == (history[-1].deployment_id, ROUNDS)


def test_free_for_all_without_expected_sequence(two_registries):
    """Unconditional moves race too: each either lands exactly once in history
    or is refused with ABORTED (its decision was based on a stale pointer)."""
    first, second = two_registries
    _, key = first.create_project("shop")
    deps = [first.call("Deploy", registry_pb2.DeployRequest(image=f"app:{c}"), key).deployment.id for c in range(CLIENTS)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{reg.running.port}") for reg in (first, second)]
    stubs = [registry_pb2_grpc.RegistryStub(ch) for ch in channels]
    barrier = threading.Barrier(CLIENTS)
    results: list[object] = [None] * CLIENTS

    def client(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            results[i] = stubs[i % 2].Promote(
                registry_pb2.PromoteRequest(deployment_id=deps[i], target_environment="staging"),
                metadata=(("x-api-key", key),), timeout=30,
            )
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for ch in channels:
        ch.close()
    ok = [r.entry for r in results if isinstance(r, registry_pb2.PointerMoveResponse)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert ok and len(ok) + len(refused) == CLIENTS
    assert all(r.code() == grpc.StatusCode.ABORTED for r in refused), [(r.code(), r.details()) for r in refused]
    history = first.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries
    assert sorted((e.sequence, e.deployment_id) for e in ok) == [(h.sequence, h.deployment_id) for h in history]
    assert [h.sequence for h in history] == list(range(1, len(ok) + 1))
    assert [h.previous_deployment_id for h in history] == ["", *(h.deployment_id for h in history[:-1])]


def test_the_database_compare_and_swap_decides(two_registries, pg_url):
    """Both moves read sequence 1 and pass the early check, then queue on the
    revision row (held here); when it is released one commits and the other's
    UPDATE ... WHERE sequence = 1 matches nothing: ABORTED, nothing recorded."""
    first, second = two_registries
    _, key = first.create_project("shop")
    a = first.call("Deploy", registry_pb2.DeployRequest(image="app:a"), key).deployment.id
    b = first.call("Deploy", registry_pb2.DeployRequest(image="app:b"), key).deployment.id
    c = first.call("Deploy", registry_pb2.DeployRequest(image="app:c"), key).deployment.id
    first.call("Promote", registry_pb2.PromoteRequest(deployment_id=a, target_environment="staging"), key)
    dsn = pg_url
    results: dict[str, object] = {}
    with psycopg.connect(dsn) as blocker:
        blocker.execute("SELECT revision FROM registry_meta WHERE id = 1 FOR UPDATE")
        threads = [
            threading.Thread(target=lambda reg=reg, dep=dep: results.__setitem__(dep, promote(reg.stub, key, dep, 1)))
            for reg, dep in ((first, b), (second, c))
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        with psycopg.connect(dsn, autocommit=True) as probe:
            while True:
                waiting = probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%registry_meta%'"
                ).fetchone()[0]
                if waiting == 2:
                    break
                assert time.monotonic() < deadline, f"only {waiting} movers queued on the revision row"
                time.sleep(0.02)
        blocker.rollback()
    for t in threads:
        t.join(30)
    outcomes = sorted(
        ("ok", dep) if isinstance(r, registry_pb2.PointerMoveResponse) else (r.code().name, r.details())  # type: ignore[union-attr]
        for dep, r in results.items()
    )
    assert [o[0] for o in outcomes] == ["ABORTED", "ok"], outcomes
    assert "moved meanwhile: expected sequence 1, it is at 2" in outcomes[0][1]
    history = first.call("ListHistory", registry_pb2.ListHistoryRequest(environment="staging"), key).entries
    assert [(h.sequence, h.deployment_id) for h in history] == [(1, a), (2, outcomes[1][1])]
