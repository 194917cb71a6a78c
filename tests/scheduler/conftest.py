"""Fixtures for the scheduler tests on a real Docker engine. Everything a
session creates carries its own ``berth.instance`` (or the test label) and is
removed at the end, even when a test fails."""
from __future__ import annotations

import asyncio
import io
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import docker
import pytest
from google.protobuf import timestamp_pb2

from berth.v1 import common_pb2
from services.scheduler.docker_adapter import DockerAdapter
from services.scheduler.spec import SecretValue
from tests.support.docker_engine import BUSYBOX, RUN_ID, build_worker_image, engine

SESSION_LABEL = "berth.test.session"


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return engine()


def _remove_labelled(docker_client: docker.DockerClient, label: str) -> None:
    for c in docker_client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="session")
def session_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """Labels this session's images and stray containers."""
    name = f"test{uuid.uuid4().hex[:8]}"
    yield name
    _remove_labelled(docker_client, f"{SESSION_LABEL}={name}")


@pytest.fixture(scope="session")
def _instances(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:  # again at the end: a create in flight when a test ended lands late
        _remove_labelled(docker_client, f"berth.instance={name}")
        _remove_labelled(docker_client, f"{SESSION_LABEL}={name}")


@pytest.fixture
def instance(docker_client: docker.DockerClient, _instances: list[str]) -> Iterator[str]:
    """A platform instance of its own per test, so no test ever sees (or
    removes as an orphan) another test's replicas."""
    name = f"test{uuid.uuid4().hex[:8]}"
    _instances.append(name)
    yield name
    _remove_labelled(docker_client, f"berth.instance={name}")
    _remove_labelled(docker_client, f"{SESSION_LABEL}={name}")  # the test's own outside-Berth containers


@pytest.fixture(scope="session")
def built_images(
    docker_client: docker.DockerClient, session_name: str, _instances: list[str]
) -> Iterator[list[str]]:
    """Image ids this session built; at the end the session's containers are
    removed first, then these images."""
    ids: list[str] = []
    yield ids
    for name in (*_instances, session_name):
        _remove_labelled(docker_client, f"berth.instance={name}")
        _remove_labelled(docker_client, f"{SESSION_LABEL}={name}")
    for image_id in ids:
        try:
            docker_client.images.remove(image_id, force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="session")
def worker_image(docker_client: docker.DockerClient, built_images: list[str], session_name: str) -> tuple[str, str]:
    tag, image_id = build_worker_image(docker_client, version="v1", labels={SESSION_LABEL: session_name})
    built_images.append(image_id)
    return tag, image_id


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient, built_images: list[str], session_name: str) -> str:
    """A bare busybox image with no entrypoint, so a deployment's
    ``command`` is the whole command line (crash, OOM and start-failure
    tests). Returns its image id."""
    dockerfile = (
        "FROM scratch\nCOPY busybox /bin/busybox\nENV PATH=/bin\n"
        'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/"]\n'
    )
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in (("Dockerfile", dockerfile.encode(), 0o644), ("busybox", busybox, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = docker_client.images.build(
        fileobj=buf, custom_context=True, tag=f"berth-test-busybox:{session_name}",
        labels={"berth.test": RUN_ID, SESSION_LABEL: session_name}, rm=True,
    )
    built_images.append(image.id)
    return image.id


@pytest.fixture(scope="session")
def adapter(docker_client: docker.DockerClient) -> Iterator[DockerAdapter]:
    a = DockerAdapter(docker_client, network="bridge")
    yield a
    a.close()


class FakeSecrets:
    """Stands in for SecretsInternal.ResolveSecrets: values already resolved."""

    def __init__(self, secrets: Sequence[SecretValue] = ()) -> None:
        self.secrets = list(secrets)
        self.calls = 0

    async def resolve(self, project_id: str, environment_id: str) -> Sequence[SecretValue]:
        self.calls += 1
        return list(self.secrets)


def make_binding(
    *,
    image: str,
    image_id: str = "",
    deployment_id: str | None = None,
    environment_id: str | None = None,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    variables: dict[str, str] | None = None,
    command: Sequence[str] = (),
    project_id: str = "proj-1",
    created_at: int = 1_700_000_000,
) -> common_pb2.Binding:
    return common_pb2.Binding(
        project_id=project_id,
        project_name="shop",
        environment_id=environment_id or f"env{uuid.uuid4().hex[:8]}",
        environment_name="staging",
        deployment=common_pb2.Deployment(
            id=deployment_id or f"dep_{uuid.uuid4().hex[:12]}",
            project_id=project_id,
            image=image,
            image_id=image_id,
            config=common_pb2.WorkerConfig(port=8080, variables=variables or {}, command=list(command)),
            state=common_pb2.Deployment.STATE_ACTIVE,
            created_at=timestamp_pb2.Timestamp(seconds=created_at),
        ),
        min_replicas=min_replicas,
        max_replicas=max(min_replicas, 3) if max_replicas is None else max_replicas,
        state=common_pb2.Binding.STATE_ACTIVE,
        serving=True,
    )


async def wait_for(condition: Callable[[], object], *, timeout: float = 30.0, what: str = "condition") -> object:
    """Polls ``condition`` until truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
