"""The router's and the scheduler's registry watchers given two registry
instances on one PostgreSQL database (issue 15, item 4): when the instance
they stream from is SIGKILLed mid-stream they move to the other one and
resume from the revision their tables reflect — no new snapshot — and keep
applying moves. Real registry processes on free ports, a real PostgreSQL
cluster, real sockets; every process is killed at the end."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.v1 import registry_pb2
from services.router.table import RoutingState
from services.router.watchers import Backoff
from services.router.watchers import RegistryWatcher as RouterRegistryWatcher
from services.scheduler.desired import DesiredTable
from services.scheduler.desired import RegistryWatcher as SchedulerRegistryWatcher
from tests.registry.conftest import ADMIN_KEY, SERVICE_TOKEN
from tests.registry.test_multi_registry import RegistryProcess, wait_until
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures


@pytest.fixture
def registries(postgres_url: str, tmp_path: Path) -> Iterator[tuple[RegistryProcess, RegistryProcess]]:  # noqa: F811
    a = RegistryProcess(postgres_url, tmp_path, "a")
    b = RegistryProcess(postgres_url, tmp_path, "b")
    try:
        a.wait_serving()
        b.wait_serving()
        yield a, b
    finally:
        a.close()
        b.close()


def test_router_and_scheduler_watchers_resume_on_the_other_registry_when_one_is_killed(registries):
    a, b = registries
    key = a.call("CreateProject", registry_pb2.CreateProjectRequest(name="shop"), ADMIN_KEY).api_key
    a.call("Deploy", registry_pb2.DeployRequest(image="app:0"), key)  # the environment exists before the watch

    # B first in both lists: the watchers stream from B until it dies.
    addresses = f"{b.address},{a.address}"
    state = RoutingState()
    state.loaded = False
    router = RouterRegistryWatcher(addresses, SERVICE_TOKEN, state, backoff=Backoff(0.05, 0.5))
    table = DesiredTable()
    scheduler = SchedulerRegistryWatcher(table, addresses, SERVICE_TOKEN, initial_backoff=0.05, max_backoff=0.5)
    scheduler_sequences: list[int] = []  # every preview sequence the scheduler's table showed, in order

    def on_change() -> None:
        seq = max((e.sequence for e in table.environments() if e.name == "preview"), default=-1)
        if not scheduler_sequences or scheduler_sequences[-1] != seq:
            scheduler_sequences.append(seq)

    table.on_change(on_change)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    tasks = [asyncio.run_coroutine_threadsafe(router.run(), loop),
             asyncio.run_coroutine_threadsafe(scheduler.run(), loop)]

    def router_sequence() -> int:
        return max((e.sequence for e in list(state.table.environments.values()) if e.name == "preview"), default=-1)

    def scheduler_sequence() -> int:
        return max((e.sequence for e in table.environments() if e.name == "preview"), default=-1)

    try:
        wait_until(lambda: router.syncs == [False] and scheduler.syncs == [False], timeout=30,
                   what="both watchers loaded a snapshot from B")
        assert router.streams == [b.address] and scheduler.streams == [b.address]
        for n in range(1, 4):
            a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        wait_until(lambda: router_sequence() == 4 and scheduler_sequence() == 4, timeout=30,
                   what="B streamed moves 2-4 to both")

        b.kill()  # SIGKILL, mid-stream
        for n in range(4, 8):
            a.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
        wait_until(lambda: router_sequence() == 8 and scheduler_sequence() == 8, timeout=60,
                   what="both watchers resumed on A and applied moves 5-8")

        # Moved to A and resumed by revision: no second snapshot.
        assert router.streams == [b.address, a.address], router.streams
        assert scheduler.streams == [b.address, a.address], scheduler.streams
        assert router.syncs == [False, True] and scheduler.syncs == [False, True]
        # Every move applied once, in order, on the scheduler's side.
        assert scheduler_sequences[-8:] == list(range(1, 9)), scheduler_sequences
        truth = {e.name: (e.sequence, e.deployment_id)
                 for e in a.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key).environments}
        assert {e.name: (e.sequence, e.deployment_id) for e in state.table.environments.values()} == truth
        assert {e.name: (e.sequence, e.deployment_id) for e in table.environments()} == truth
        assert state.revision == router._follower.revision == scheduler.revision > 0
    finally:
        for task in tasks:
            task.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
