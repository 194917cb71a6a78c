"""The reconciler against a real Docker engine, with an in-memory desired
table and a fake secrets resolver (no registry)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.request
from collections.abc import AsyncIterator

import docker
import pytest

from services.scheduler.desired import DesiredTable
from services.scheduler.docker_adapter import DockerAdapter
from services.scheduler.events import EventStore
from services.scheduler.reconciler import BindingState, Reconciler, ReplicaState, SchedulerConfig
from services.scheduler.spec import SecretValue

from .conftest import SESSION_LABEL, FakeSecrets, make_binding, wait_for

pytestmark = pytest.mark.docker

CANARY = "canary-7f3a9c-not-a-real-secret"


def config(instance: str) -> SchedulerConfig:
    return SchedulerConfig(instance=instance, reconcile_interval=0.5, stop_grace=2.0, pull_timeout=30.0, drain_delay=0.3)


def http_get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/", timeout=5) as response:
        return response.read().decode()


@contextlib.asynccontextmanager
async def running(reconciler: Reconciler) -> AsyncIterator[Reconciler]:
    task = asyncio.create_task(reconciler.run())
    try:
        yield reconciler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reconciler.close()


def managed_ids(client: docker.DockerClient, instance: str, deployment_id: str) -> dict[int, str]:
    found = client.containers.list(
        all=True,
        filters={"label": [f"berth.instance={instance}", f"berth.deployment={deployment_id}"]},
        ignore_removed=True,
    )
    return {int(c.labels["berth.replica"]): c.id for c in found}


def addresses(reconciler: Reconciler, deployment_id: str) -> list[str]:
    return [a for s in reconciler.endpoints.current if s.deployment_id == deployment_id for a in s.addresses]


def test_replicas_run_are_adopted_and_scale_down(docker_client, adapter: DockerAdapter, instance, worker_image):
    tag, image_id = worker_image
    # Two containers Berth must never touch: one without berth.managed, one
    # managed by another platform instance but the same labels otherwise.
    unmanaged = docker_client.containers.run(
        image_id, detach=True, init=True, labels={SESSION_LABEL: instance, "berth.deployment": "x"}
    )
    other_instance = docker_client.containers.run(
        image_id,
        detach=True,
        init=True,
        labels={SESSION_LABEL: instance, "berth.managed": "true", "berth.instance": instance + "-other",
                "berth.environment": "e", "berth.deployment": "d", "berth.replica": "0"},
    )
    binding = make_binding(
        image=tag, image_id=image_id, min_replicas=2, variables={"SHOW_SECRET": "API_TOKEN", "MODE": "test"}
    )
    dep = binding.deployment.id
    secrets = FakeSecrets([SecretValue("API_TOKEN", CANARY, 1)])

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        first = Reconciler(adapter, table, secrets, events, config(instance))
        async with running(first):
            ready = await wait_for(lambda: len(addresses(first, dep)) == 2 and addresses(first, dep), what="2 ready")
            for address in ready:  # type: ignore[union-attr]
                body = await asyncio.to_thread(http_get, address)
                assert "version=v1" in body
                assert f"deployment={dep}" in body
                assert "environment=staging" in body
                assert f"secret={CANARY}" in body
        ids = managed_ids(docker_client, instance, dep)
        assert sorted(ids) == [0, 1]

        # Reconciling a converged state changes nothing.
        again = await first.reconcile_once()
        assert again.empty
        assert managed_ids(docker_client, instance, dep) == ids

        # A brand-new reconciler (a restarted process) adopts the same containers.
        second = Reconciler(adapter, table, FakeSecrets(secrets.secrets), EventStore(), config(instance))
        adopted = await second.reconcile_once()
        assert adopted.empty, adopted
        assert managed_ids(docker_client, instance, dep) == ids
        assert sorted(addresses(second, dep)) == sorted(ready)  # type: ignore[arg-type]
        assert (await second.reconcile_once()).empty
        assert sorted(addresses(second, dep)) == sorted(ready)  # type: ignore[arg-type]
        [view] = await second.status(dep)
        assert view.status is BindingState.RUNNING
        assert [(r.index, r.state, r.container_id) for r in view.replicas] == [
            (0, ReplicaState.READY, ids[0]),
            (1, ReplicaState.READY, ids[1]),
        ]
        assert all(r.started_at is not None for r in view.replicas)

        # Lowering the bounds removes the highest index.
        smaller = make_binding(
            image=tag, image_id=image_id, min_replicas=1, max_replicas=1, deployment_id=dep,
            environment_id=binding.environment_id, variables=dict(binding.deployment.config.variables),
        )
        table.upsert_binding(smaller)
        await second.reconcile_once()
        assert managed_ids(docker_client, instance, dep) == {0: ids[0]}
        assert (await second.reconcile_once()).empty
        assert len(addresses(second, dep)) == 1
        await second.close()

    asyncio.run(scenario())
    for foreign in (unmanaged, other_instance):
        foreign.reload()
        assert foreign.status == "running"


def test_nonexistent_image_is_an_image_pull_error(docker_client, adapter: DockerAdapter, instance):
    ref = "berth-test-nonexistent.invalid/none:1"
    binding = make_binding(image=ref, min_replicas=1)
    dep = binding.deployment.id

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, config(instance))
        async with running(reconciler):
            [event] = await wait_for(lambda: events.list(dep), timeout=40, what="image_pull_error event")  # type: ignore[misc]
        assert event.kind == "image_pull_error"
        assert "berth-test-nonexistent.invalid" in event.message  # the engine's own text
        assert event.count >= 1 and event.environment == "staging"
        [view] = await reconciler.status(dep)
        assert view.status is BindingState.FAILED
        assert view.replicas == ()
        assert managed_ids(docker_client, instance, dep) == {}

    asyncio.run(scenario())


def test_a_binding_added_during_the_pull_backoff_gets_the_reason_at_once(docker_client, adapter: DockerAdapter, instance):
    # Two deployments of one nonexistent reference: the second, bound after
    # the first pull failed and while its backoff runs, gets its own
    # image_pull_error from the cached failure, without another pull.
    ref = "berth-test-nonexistent.invalid/none:2"
    first = make_binding(image=ref, min_replicas=1)
    second = make_binding(image=ref, min_replicas=1)

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [first])
        events = EventStore()
        long_backoff = dataclasses.replace(config(instance), pull_retry=120.0, pull_retry_max=120.0)
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, long_backoff)
        async with running(reconciler):
            [event] = await wait_for(  # type: ignore[misc]
                lambda: events.list(first.deployment.id), timeout=40, what="first image_pull_error"
            )
            table.replace([], [first, second])
            reconciler.wake()
            [other] = await wait_for(  # type: ignore[misc]
                lambda: events.list(second.deployment.id), timeout=10, what="second image_pull_error"
            )
            assert other.kind == "image_pull_error"
            assert other.message == event.message  # the cached engine text
            assert other.deployment_id == second.deployment.id
            assert not reconciler._pulls  # no new pull: the backoff still runs
            await asyncio.sleep(1.5)  # a few more passes do not repeat it
            assert [e.count for e in events.list(second.deployment.id)] == [1]
            assert [e.count for e in events.list(first.deployment.id)] == [1]
        [view] = await reconciler.status(second.deployment.id)
        assert view.status is BindingState.FAILED
        assert managed_ids(docker_client, instance, second.deployment.id) == {}

    asyncio.run(scenario())


def test_start_failure_is_a_scheduling_failure_without_leftovers(docker_client, instance, worker_image):
    # The engine refuses to create a container on a network that does not exist.
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=1)
    dep = binding.deployment.id
    broken = DockerAdapter(docker_client, network="berth-test-no-such-network")

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        # A long backoff so "an immediate pass does not retry" holds however
        # slow this machine is.
        slow_retry = dataclasses.replace(config(instance), restart_backoff=60.0)
        reconciler = Reconciler(broken, table, FakeSecrets([SecretValue("API_TOKEN", CANARY, 1)]), events, slow_retry)
        await reconciler.reconcile_once()
        [event] = events.list(dep)
        assert event.kind == "scheduling_failure"
        assert "berth-test-no-such-network" in event.message  # the engine's own text
        assert CANARY not in event.message
        assert managed_ids(docker_client, instance, dep) == {}  # the leftover was removed
        [view] = await reconciler.status(dep)
        assert view.status is BindingState.FAILED
        # The backoff holds the next attempt: an immediate pass does not retry.
        again = await reconciler.reconcile_once()
        assert again.creates == () and again.deferred
        assert events.list(dep)[0].count == 1

    try:
        asyncio.run(scenario())
    finally:
        broken.close()


@pytest.mark.parametrize(
    ("memory", "cpus", "expected"),
    [
        (1024 * 1024, 0.0, "below the engine's minimum"),
        (1 << 50, 0.0, "exceeds this host's memory"),
        (0, 4096.0, "exceeds this host's"),
    ],
    ids=["under-engine-minimum", "more-memory-than-host", "more-cpus-than-host"],
)
def test_impossible_resources_are_a_scheduling_failure_before_create(
    docker_client, adapter, instance, worker_image, memory, cpus, expected
):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=1)
    binding.deployment.config.resources.memory_bytes = memory
    binding.deployment.config.resources.cpus = cpus
    dep = binding.deployment.id

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore()
        reconciler = Reconciler(adapter, table, FakeSecrets(), events, config(instance))
        first = await reconciler.reconcile_once()
        second = await reconciler.reconcile_once()
        assert first.creates == () and second.creates == ()
        [event] = events.list(dep)
        assert event.kind == "scheduling_failure" and expected in event.message
        assert event.count == 1  # the same failure is not re-recorded every pass
        assert managed_ids(docker_client, instance, dep) == {}
        [view] = await reconciler.status(dep)
        assert view.status is BindingState.FAILED
        assert [s.status for s in reconciler.endpoints.current if s.deployment_id == dep] == ["failed"]

    asyncio.run(scenario())


def test_drift_replaces_start_new_then_stop_old(docker_client, adapter, instance, worker_image):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=1, variables={"SHOW_SECRET": "API_TOKEN"})
    dep = binding.deployment.id
    secrets = FakeSecrets([SecretValue("API_TOKEN", "old-value-1", 1)])

    async def scenario() -> None:
        table = DesiredTable()
        table.replace([], [binding])
        reconciler = Reconciler(adapter, table, secrets, EventStore(), config(instance))
        async with running(reconciler):
            [old] = await wait_for(lambda: addresses(reconciler, dep), what="first replica ready")  # type: ignore[misc]
            old_id = managed_ids(docker_client, instance, dep)[0]
            seen: list[tuple[str, ...]] = []
            secrets.secrets = [SecretValue("API_TOKEN", "new-value-2", 2)]  # rotation: a new version
            reconciler.wake()

            def replaced() -> bool:
                seen.append(tuple(addresses(reconciler, dep)))
                found = docker_client.containers.list(
                    all=True, filters={"label": f"berth.deployment={dep}"}, ignore_removed=True
                )
                return len(found) == 1 and found[0].id != old_id and len(addresses(reconciler, dep)) == 1 \
                    and addresses(reconciler, dep) != [old]

            await wait_for(replaced, what="replacement")
            assert all(seen), "the binding dropped to zero ready replicas during the replacement"
            [new] = addresses(reconciler, dep)
            assert "secret=new-value-2" in await asyncio.to_thread(http_get, new)

    asyncio.run(scenario())
