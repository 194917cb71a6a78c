from __future__ import annotations

import grpc
import pytest

from berth.client import error_from_rpc
from berth.v1 import registry_pb2, registry_pb2_grpc
from services.registry import app
from tests.support.inproc import start_in_background

ADMIN_KEY = "berth_admin_test-admin-key"
SERVICE_TOKEN = "berth_svc_test-service-token"


class Registry:
    """A real registry server on a free port, reached over a real socket."""

    def __init__(self, database_url: str) -> None:
        self.bg, (self.running, self.service) = start_in_background(
            lambda: app.start(
                host="127.0.0.1", port=0, database_url=database_url, admin_key=ADMIN_KEY, service_token=SERVICE_TOKEN
            )
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    def call(self, name: str, request, key: str, **kw):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.stub, name)(request, metadata=(("x-api-key", key),), timeout=10, **kw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def create_project(self, name: str) -> tuple[str, str]:
        resp = self.call("CreateProject", registry_pb2.CreateProjectRequest(name=name), ADMIN_KEY)
        return resp.project.id, resp.api_key

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0.5))
        self.bg.close()


@pytest.fixture
def registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()
