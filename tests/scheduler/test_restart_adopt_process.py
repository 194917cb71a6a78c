"""Restarts adopt: a real scheduler process, SIGKILLed 10 times at random
moments while a binding scales between 1 and 5 replicas (desired state from
a fake RegistryInternal.Watch over gRPC), converges to exactly the desired count
with no duplicated replica index, and a final restart changes no container."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
import time
from collections import Counter

import docker
import grpc
import pytest

from berth.internal.v1 import (
    registry_internal_pb2,
    registry_internal_pb2_grpc,
    secrets_internal_pb2,
    secrets_internal_pb2_grpc,
)
from berth.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common.remote import credentials

from .conftest import make_binding, wait_for

pytestmark = pytest.mark.docker

TOKEN = "berth_svc_test-restart-adopt"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeRegistry(registry_internal_pb2_grpc.RegistryInternalServicer):
    """Watch: the current binding as a snapshot, then every change live."""

    def __init__(self, binding: common_pb2.Binding) -> None:
        self.binding = binding
        self.revision = 1
        self._streams: set[asyncio.Queue[common_pb2.Binding]] = set()

    def scale(self, replicas: int) -> None:
        updated = common_pb2.Binding()
        updated.CopyFrom(self.binding)
        updated.min_replicas = updated.max_replicas = replicas
        self.binding = updated
        self.revision += 1
        for queue in self._streams:
            queue.put_nowait(updated)

    async def Watch(self, request, context):
        queue: asyncio.Queue[common_pb2.Binding] = asyncio.Queue()
        self._streams.add(queue)
        try:
            yield registry_internal_pb2.WatchEvent(revision=self.revision, binding=self.binding)
            yield registry_internal_pb2.WatchEvent(revision=self.revision, snapshot_complete=True)
            while True:
                binding = await queue.get()
                yield registry_internal_pb2.WatchEvent(revision=self.revision, binding=binding)
        finally:
            self._streams.discard(queue)


class FakeSecrets(secrets_internal_pb2_grpc.SecretsInternalServicer):
    async def ResolveSecrets(self, request, context):
        return secrets_internal_pb2.ResolveSecretsResponse()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replicas_on_engine(client: docker.DockerClient, instance: str, deployment_id: str) -> list[tuple[int, str, str]]:
    found = client.containers.list(
        all=True,
        filters={"label": [f"berth.instance={instance}", f"berth.deployment={deployment_id}"]},
        ignore_removed=True,
    )
    return sorted((int(c.labels["berth.replica"]), c.id, c.status) for c in found)


def test_sigkill_ten_times_while_scaling_converges_and_adopts(docker_client, instance, worker_image, tmp_path):
    tag, image_id = worker_image
    binding = make_binding(image=tag, image_id=image_id, min_replicas=1, max_replicas=1)
    dep = binding.deployment.id
    rng = random.Random(int(os.environ.get("BERTH_TEST_SEED", time.time_ns() % 100_000)))
    log_path = tmp_path / "scheduler.log"

    async def scenario() -> None:
        registry = FakeRegistry(binding)
        server = grpc.aio.server()
        registry_internal_pb2_grpc.add_RegistryInternalServicer_to_server(registry, server)
        secrets_internal_pb2_grpc.add_SecretsInternalServicer_to_server(FakeSecrets(), server)
        fake_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port = free_port()
        log = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - the child processes write to it

        async def start() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.scheduler",
                "--port", str(port), "--registry", f"127.0.0.1:{fake_port}", "--secrets", f"127.0.0.1:{fake_port}",
                "--service-token", TOKEN, "--instance", instance, "--data-dir", str(tmp_path / "data"),
                "--reconcile-interval", "0.5", "--stop-grace", "1",
                cwd=ROOT, stdout=log, stderr=log,
            )

        async def kill(process: asyncio.subprocess.Process) -> None:
            process.send_signal(signal.SIGKILL)
            await process.wait()

        process = None
        try:
            # Ten kills at random moments, with bounds changing in between.
            targets = [5, 1, 4, 2, 5, 3, 1, 5, 2, 4]
            for target in targets:
                process = await start()
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                registry.scale(target)  # maybe before the process is even listening
                await asyncio.sleep(rng.uniform(0.0, 1.5))
                await kill(process)
                process = None

            final = 3
            registry.scale(final)
            process = await start()

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)

                async def converged() -> bool:
                    try:
                        status = await stub.GetDeploymentStatus(
                            scheduler_pb2.GetDeploymentStatusRequest(deployment_id=dep),
                            metadata=credentials(TOKEN), timeout=5,
                        )
                    except grpc.aio.AioRpcError:
                        return False  # not listening yet, or no snapshot yet
                    [b] = status.bindings
                    on_engine = replicas_on_engine(docker_client, instance, dep)
                    return (
                        b.status == scheduler_pb2.BindingStatus.STATUS_RUNNING
                        and sorted(r.index for r in b.replicas) == list(range(final))
                        and all(r.state == scheduler_pb2.Replica.STATE_READY for r in b.replicas)
                        and [i for i, _, _ in on_engine] == list(range(final))
                    )

                await wait_for(converged, timeout=60, what=f"{final} ready replicas")
            before = replicas_on_engine(docker_client, instance, dep)
            assert [i for i, _, _ in before] == list(range(final))
            assert not [i for i, n in Counter(i for i, _, _ in before).items() if n > 1], before
            assert {s for _, _, s in before} == {"running"}

            # The final restart adopts: same containers, nothing created or removed.
            await kill(process)
            process = await start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                await wait_for(converged_again(stub, dep, final), timeout=30, what="status after the last restart")
            await asyncio.sleep(1.5)  # a few passes of the new process (interval 0.5 s)
            assert replicas_on_engine(docker_client, instance, dep) == before
        finally:
            if process is not None and process.returncode is None:
                await kill(process)
            log.close()
            await server.stop(0)

    try:
        asyncio.run(scenario())
    except AssertionError:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise


def converged_again(stub, deployment_id: str, final: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        try:
            status = await stub.GetDeploymentStatus(
                scheduler_pb2.GetDeploymentStatusRequest(deployment_id=deployment_id),
                metadata=credentials(TOKEN), timeout=5,
            )
        except grpc.aio.AioRpcError:
            return False
        [b] = status.bindings
        return b.status == scheduler_pb2.BindingStatus.STATUS_RUNNING and len([r for r in b.replicas if r.state == scheduler_pb2.Replica.STATE_READY]) == final

    return check
