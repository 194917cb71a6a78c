"""Registry tests run against both stores: SQLite (a file per test) and
PostgreSQL (a throwaway cluster for the session, a fresh database per test)."""
from __future__ import annotations

import grpc
import pytest

from berth.client import error_from_rpc
from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from services.registry import app
from tests.support.inproc import start_in_background
from tests.support.postgres import postgres_cluster  # noqa: F401 - the session fixture

ADMIN_KEY = "berth_admin_test-admin-key"
SERVICE_TOKEN = "berth_svc_test-service-token"
BACKENDS = ("sqlite", "postgresql")


class Registry:
    """A real registry server on a free port, reached over a real socket:
    ``stub`` is its public service, ``internal`` its berth.internal.v1 one."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.bg, (self.running, self.service) = start_in_background(
            lambda: app.start(
                host="127.0.0.1", port=0, database_url=database_url, admin_key=ADMIN_KEY, service_token=SERVICE_TOKEN
            )
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.internal = registry_internal_pb2_grpc.RegistryInternalStub(self.channel)

    def call(self, name: str, request, key: str, **kw):  # type: ignore[no-untyped-def]
        return self._call(self.stub, name, request, key, **kw)

    def call_internal(self, name: str, request, key: str = SERVICE_TOKEN, **kw):  # type: ignore[no-untyped-def]
        return self._call(self.internal, name, request, key, **kw)

    @staticmethod
    def _call(stub, name: str, request, key: str, **kw):  # type: ignore[no-untyped-def]
        try:
            return getattr(stub, name)(request, metadata=(("x-api-key", key),), timeout=10, **kw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def create_project(self, name: str) -> tuple[str, str]:
        resp = self.call("CreateProject", registry_pb2.CreateProjectRequest(name=name), ADMIN_KEY)
        return resp.project.id, resp.api_key

    def watch(self, since_revision: int = 0, timeout: float = 30):  # type: ignore[no-untyped-def]
        return self.internal.Watch(
            registry_internal_pb2.WatchRequest(since_revision=since_revision),
            metadata=(("x-api-key", SERVICE_TOKEN),), timeout=timeout,
        )

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0.5))
        self.bg.close()
        self.service._sessions.kw["bind"].dispose()


def collect_until(stream, stop, *, limit: int = 10_000):  # type: ignore[no-untyped-def]
    """Reads events until ``stop(event)`` is true; returns them all."""
    events = []
    for event in stream:
        events.append(event)
        if stop(event) or len(events) >= limit:
            return events
    raise AssertionError(f"stream ended before the expected event; got {events}")


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    cluster = request.getfixturevalue("postgres_cluster")
    url = cluster.create_database()
    yield url
    cluster.drop_database(url)


@pytest.fixture
def registry(database_url):  # type: ignore[no-untyped-def]
    reg = Registry(database_url)
    yield reg
    reg.close()
