"""A real secrets server (port 0) next to a real registry, driven with
blocking stubs over real sockets."""
from __future__ import annotations

import os
import pathlib

import grpc

from berth.client import error_from_rpc
from berth.internal.v1 import secrets_internal_pb2_grpc
from berth.v1 import registry_pb2, secrets_pb2_grpc
from services.secrets import app as secrets_app
from tests.registry.conftest import ADMIN_KEY, SERVICE_TOKEN, Registry
from tests.support.inproc import start_in_background

__all__ = ["ADMIN_KEY", "SERVICE_TOKEN", "Registry", "Secrets", "environment_ids"]


class Secrets:
    def __init__(
        self, registry: Registry, database_url: str, *, master_key: bytes | None = None,
        master_key_file: pathlib.Path | None = None,
    ) -> None:
        if master_key is None and master_key_file is None:
            master_key = os.urandom(32)
        self.bg, (self.running, self.closers) = start_in_background(
            lambda: secrets_app.start(
                host="127.0.0.1", port=0, database_url=database_url, master_key=master_key,
                master_key_file=master_key_file, admin_key=ADMIN_KEY,
                registry=f"127.0.0.1:{registry.running.port}", service_token=SERVICE_TOKEN,
            )
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = secrets_pb2_grpc.SecretsStub(self.channel)
        self.internal = secrets_internal_pb2_grpc.SecretsInternalStub(self.channel)

    def call(self, name, request, key):  # type: ignore[no-untyped-def]
        return self._call(self.stub, name, request, key)

    def call_internal(self, name, request, key=SERVICE_TOKEN):  # type: ignore[no-untyped-def]
        """berth.internal.v1.SecretsInternal (the service token by default)."""
        return self._call(self.internal, name, request, key)

    @staticmethod
    def _call(stub, name, request, key):  # type: ignore[no-untyped-def]
        try:
            return getattr(stub, name)(request, metadata=(("x-api-key", key),), timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0.5))
        for closer in self.closers:
            self.bg.run(closer.close())
        self.bg.close()


def environment_ids(registry: Registry, key: str) -> dict[str, str]:
    answer = registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), key)
    return {e.name: e.id for e in answer.environments}
