"""A small platform in this process: real registry and secrets servers, the
scheduler's gRPC service with its production authenticator (no replica is
ever started: its reconciler does not run), and a real router (HTTP on a
free port, REST API at /api/v1) in front of them. Every server binds port 0."""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import requests

from berth.client import error_from_rpc
from berth.v1 import registry_pb2, scheduler_pb2, scheduler_pb2_grpc, secrets_pb2
from services.common.remote import RegistryAuthenticator
from services.common.server import RunningServer, start_server
from services.router.app import RouterApp, parse_args
from services.scheduler.desired import DesiredTable
from services.scheduler.events import EventStore
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAMES, add_to_server
from tests.scheduler.conftest import FakeSecrets, make_binding
from tests.secrets.support import ADMIN_KEY, SERVICE_TOKEN, Registry, Secrets
from tests.support.inproc import start_in_background


class Scheduler:
    """The scheduler's gRPC service authenticating through the registry;
    its table holds one binding of the project."""

    def __init__(self, registry: Registry, project_id: str) -> None:
        self.binding = make_binding(image="never-run", project_id=project_id)

        async def start() -> tuple[RunningServer, RegistryAuthenticator, EventStore]:
            table = DesiredTable()
            table.replace([], [self.binding])
            events = EventStore()
            config = SchedulerConfig(instance="inproc-test")
            reconciler = Reconciler(None, table, FakeSecrets(), events, config)  # type: ignore[arg-type]
            # This stand-in never looks at an engine: its (empty) endpoint
            # set is all there is, so routers may have it at once.
            reconciler.endpoints.mark_complete()
            authenticator = RegistryAuthenticator(
                f"127.0.0.1:{registry.running.port}", SERVICE_TOKEN, admin_key=ADMIN_KEY
            )
            running = await start_server(
                host="127.0.0.1", port=0, service_names=SERVICE_NAMES,
                register=lambda s: add_to_server(s, table, reconciler, events),
                authenticate=authenticator,
            )
            return running, authenticator, events

        self.bg, (self.running, self.authenticator, self.events) = start_in_background(start)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def errors_of(self, key: str) -> scheduler_pb2.ListDeploymentErrorsResponse:
        try:
            return self.stub.ListDeploymentErrors(
                scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=self.binding.deployment.id),
                metadata=(("x-api-key", key),), timeout=10,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0.5))
        self.bg.run(self.authenticator.close())
        self.events.close()
        self.bg.close()


class Router:
    """The router process's app (one worker), started in this process."""

    def __init__(self, registry: Registry, secrets: Secrets, scheduler: Scheduler) -> None:
        args: argparse.Namespace = parse_args([
            "--port", "0", "--registry", f"127.0.0.1:{registry.running.port}",
            "--secrets", f"127.0.0.1:{secrets.running.port}", "--scheduler", f"127.0.0.1:{scheduler.running.port}",
            "--service-token", SERVICE_TOKEN, "--no-access-log",
        ])
        args.health_interval = 0.05

        async def start() -> tuple[RouterApp, int]:
            app = RouterApp(args)
            port = await app.start()
            deadline = time.monotonic() + 20
            while app.not_ready():
                if time.monotonic() > deadline:
                    raise AssertionError(f"router not ready: {app.not_ready()}")
                await asyncio.sleep(0.02)
            return app, port

        self.bg, (self.app, port) = start_in_background(start)
        self.api = f"http://127.0.0.1:{port}/api/v1"
        self.http = requests.Session()

    def call(self, method: str, path: str, key: str, **kw: Any) -> requests.Response:
        return self.http.request(method, self.api + path, headers={"X-API-KEY": key}, timeout=30, **kw)

    def close(self) -> None:
        self.http.close()
        self.bg.run(self.app.stop(0.5))
        self.bg.close()


@dataclass
class Platform:
    registry: Registry
    secrets: Secrets
    scheduler: Scheduler
    router: Router
    project_id: str
    owner_key: str  # the project's first key
    key: str  # a second key, named "ci"

    def set_secret(self, key: str, value: str = "v-1234", name: str = "TOKEN", **kw: Any) -> secrets_pb2.SecretInfo:
        return self.secrets.call("SetSecret", secrets_pb2.SetSecretRequest(name=name, type="token", value=value, **kw), key)

    def revoke(self) -> None:
        self.registry.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key="ci"), self.owner_key)

    def close(self) -> None:
        self.router.close()
        self.scheduler.close()
        self.secrets.close()
        self.registry.close()


def start_platform(directory: pathlib.Path) -> Platform:
    """Registry, secrets, scheduler and router, their databases in ``directory``."""
    registry = Registry(f"sqlite:///{directory / 'registry.db'}")
    secrets = Secrets(registry, f"sqlite:///{directory / 'secrets.db'}")
    project_id, owner_key = registry.create_project("shop")
    key = registry.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(name="ci"), owner_key).api_key
    scheduler = Scheduler(registry, project_id)
    router = Router(registry, secrets, scheduler)
    return Platform(registry, secrets, scheduler, router, project_id, owner_key, key)


@pytest.fixture
def platform(tmp_path) -> Iterator[Platform]:
    started = start_platform(tmp_path)
    yield started
    started.close()
