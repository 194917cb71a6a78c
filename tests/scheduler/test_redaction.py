"""Secret values never leave the scheduler in engine text: the one
redaction function (``events.redact``), the migration that scrubs events
stored before it existed, and a replica that really fails to start on the
Docker engine because its secret holds a NUL (runc quotes the value in its
error) — the event, the gRPC answer, the log and the database file hold no
trace of the value."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from datetime import UTC, datetime

import docker
import grpc
import pytest
from sqlalchemy import create_engine

from berth import errors
from berth.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.auth import Principal
from services.common.remote import credentials
from services.common.server import start_server
from services.scheduler import docker_adapter as da
from services.scheduler.desired import DesiredTable
from services.scheduler.events import (
    MAX_MESSAGE,
    REDACTED,
    EventKind,
    EventStore,
    go_quoted,
    metadata,
    redact,
    scrub_env_leaks,
    secret_forms,
)
from services.scheduler.reconciler import Reconciler, SchedulerConfig
from services.scheduler.servicer import SERVICE_NAME, SchedulerServicer
from services.scheduler.spec import SecretValue

from .conftest import FakeSecrets, make_binding

# What runc answered on this project's reference engine for a value holding
# NUL (captured with docker-py; the Docker test below checks it still does).
RUNC_TEXT = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to start container "
    "process: error during container init: environment variable value can't contain null(\\x00): "
    '"API_TOKEN=abcSECRET\\x00defTAIL": unknown'
)


# -- the function -----------------------------------------------------------


def test_redact_takes_out_every_form_the_engine_prints():
    value = "abcSECRET\x00defTAIL"
    cleaned = redact(RUNC_TEXT, [value])
    assert "SECRET" not in cleaned and "TAIL" not in cleaned and "\\x00def" not in cleaned
    assert cleaned.endswith(f'"API_TOKEN={REDACTED}": unknown')
    assert "environment variable value can't contain null(\\x00)" in cleaned  # the reason stays readable

    # Raw, Go-quoted (also twice), JSON and Python forms, and the pieces
    # around control characters.
    tricky = 'pa"ss\\wo\nrd\x00tail-part\u00a0é'
    assert go_quoted(tricky) == 'pa\\"ss\\\\wo\\nrd\\x00tail-part\\u00a0é'  # as Go's strconv.Quote
    for text in (
        f"boom: {tricky}!",
        f'boom: "{go_quoted(tricky)}"',
        f"wrapped: {go_quoted(go_quoted(tricky))}",
        "json: " + json.dumps({"e": tricky}),
        "json: " + json.dumps({"e": tricky}, ensure_ascii=False),
        f"python: {tricky!r}",
        "cut at the NUL: tail-part\u00a0é and pa\"ss\\wo",
    ):
        out = redact(text, [tricky])
        assert "pa" not in out and "tail" not in out and REDACTED in out, (text, out)

    # Short values are not searched for (every "on" would go), longer ones are.
    assert secret_forms("abc") == set()
    assert redact("connection refused: abc", ["abc"]) == "connection refused: abc"
    assert redact("exit code 1: hunter2 rejected", ["hunter2"]) == f"exit code 1: {REDACTED} rejected"
    # Longest first: a value containing another value is taken out whole.
    assert redact("x=abcdefgh y", ["abcd", "abcdefgh"]) == f"x={REDACTED} y"
    assert len(redact("e" * 5000, [])) == MAX_MESSAGE


def test_env_assignments_are_blanked_without_knowing_the_values():
    # A short value, and one deleted since: the quoted assignment goes anyway.
    assert scrub_env_leaks(
        'environment variable value can\'t contain null(\\x00): "K=a\\x00b": unknown'
    ) == f'environment variable value can\'t contain null(\\x00): "K={REDACTED}": unknown'
    assert scrub_env_leaks('invalid environment variable: "X=a\\"b c" and Y=plain tail') == (
        f'invalid environment variable: "X={REDACTED}" and Y={REDACTED} tail'
    )
    # Messages that say nothing of the environment are left alone.
    for untouched in (
        "pull access denied for repo=shop, repository does not exist",
        "exit code 1: key=value",
        "replica 0 exited 3 times in quick succession; last exit code 137",
    ):
        assert scrub_env_leaks(untouched) == untouched


def test_the_store_blanks_env_assignments_itself():
    store = EventStore()
    store.record(
        EventKind.SCHEDULING_FAILURE, message=RUNC_TEXT, project_id="p", deployment_id="d", environment_id="e",
        environment="staging", replica="0",
    )
    [event] = store.list("d")
    assert "SECRET" not in event.message and f'"API_TOKEN={REDACTED}"' in event.message
    store.close()


# -- the migration ------------------------------------------------------------


def _head() -> str:
    """The event store's latest migration."""
    from alembic.script import ScriptDirectory

    from services.scheduler.events import MIGRATIONS_DIR

    return str(ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head())


def test_migration_scrubs_events_stored_before_redaction(tmp_path):
    """A store made by an older scheduler (table from ``create_all``, no
    migration history) with a leaked runc message: opening it migrates and
    scrubs that row, and leaves the others as they were."""
    path = tmp_path / "scheduler-events.db"
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    now = datetime.now(UTC).isoformat(sep=" ")
    rows = [
        ("dep-a", "scheduling_failure", RUNC_TEXT),
        ("dep-b", "image_pull_error", "pull access denied for shop/api, repository does not exist"),
        ("dep-c", "crash_loop", "replica 0 exited 3 times in quick succession; last exit code 1"),
        ("dep-d", "scheduling_failure",
         'OCI runtime create failed: environment variable name can\'t contain null(\\x00): "A\\x00B=hunter2"'),
    ]
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO deployment_events (project_id, deployment_id, kind, environment_id, environment, replica, "
            "message, count, first_seen, last_seen) VALUES ('p', ?, ?, 'e', 'staging', '0', ?, 1, ?, ?)",
            [(dep, kind, message, now, now) for dep, kind, message in rows],
        )

    store = EventStore(str(tmp_path))
    [leaked] = store.list("dep-a")
    assert "SECRET" not in leaked.message and "TAIL" not in leaked.message
    assert leaked.message.endswith(f'"API_TOKEN={REDACTED}": unknown')
    assert store.list("dep-b")[0].message == rows[1][2]
    assert store.list("dep-c")[0].message == rows[2][2]
    assert "hunter2" not in store.list("dep-d")[0].message
    store.close()
    assert all(b"abcSECRET" not in f.read_bytes() for f in tmp_path.iterdir())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version_events").fetchall() == [(_head(),)]

    # A store already at the latest revision opens without redoing anything.
    again = EventStore(str(tmp_path))
    assert len(again.list("dep-a")) == 1
    again.close()


# -- on the engine --------------------------------------------------------------


class RecordingAdapter:
    """The real adapter, keeping the engine's raw start-failure text so the
    test can show the value really was in it."""

    def __init__(self, inner: da.DockerAdapter) -> None:
        self._inner = inner
        self.raw: list[str] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._inner, name)

    async def run(self, spec: da.RunSpec) -> da.ContainerInfo:
        try:
            return await self._inner.run(spec)
        except da.StartFailed as exc:
            self.raw.append(exc.message)
            raise


@pytest.mark.docker
def test_replica_failing_on_a_nul_secret_leaks_nothing(adapter, instance, worker_image, tmp_path, caplog):
    tag, image_id = worker_image
    value = "Xq9-canary-head\x00canary-tail-7"
    binding = make_binding(image=tag, image_id=image_id, min_replicas=1, project_id="proj-1")
    dep = binding.deployment.id
    recording = RecordingAdapter(adapter)

    async def authenticate(api_key: str) -> Principal:
        if api_key != "key-owner":
            raise errors.Unauthenticated("unknown key")
        return Principal(project_id="proj-1", project_name="shop", key_name="ci")

    async def scenario() -> list[scheduler_pb2.DeploymentError]:
        table = DesiredTable()
        table.replace([], [binding])
        events = EventStore(str(tmp_path))
        reconciler = Reconciler(
            recording, table, FakeSecrets([SecretValue("API_TOKEN", value, 1)]), events,  # type: ignore[arg-type]
            SchedulerConfig(instance=instance, reconcile_interval=0.5, restart_backoff=60.0),
        )
        servicer = SchedulerServicer(table, reconciler, events)
        server = await start_server(
            host="127.0.0.1", port=0, service_names=[SERVICE_NAME],
            register=lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, s),
            authenticate=authenticate,
        )
        try:
            await reconciler.reconcile_once()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                answer = await stub.ListDeploymentErrors(
                    scheduler_pb2.ListDeploymentErrorsRequest(deployment_id=dep),
                    metadata=credentials("key-owner"), timeout=10,
                )
            return list(answer.errors)
        finally:
            await server.stop(0.5)
            await reconciler.close()
            events.close()

    with caplog.at_level(logging.DEBUG):
        answered = asyncio.run(scenario())

    # The engine really did quote the value (Go-escaped) in its error.
    assert recording.raw, "the replica was expected to fail to start"
    assert go_quoted(value) in recording.raw[0], recording.raw[0]
    assert "can't contain null" in recording.raw[0]

    [error] = answered
    assert error.kind == scheduler_pb2.DeploymentError.KIND_SCHEDULING_FAILURE
    assert f'"API_TOKEN={REDACTED}"' in error.message
    traces = ("Xq9-canary-head", "canary-tail-7", "canary")
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for trace in traces:
        assert trace not in error.message
        assert trace not in logged
        assert trace.encode() not in stored


# -- the whole platform -----------------------------------------------------------


@pytest.mark.docker
@pytest.mark.e2e
def test_a_nul_secret_stored_by_an_older_berth_never_shows(tmp_path):
    """``berth up`` with a secret value holding NUL already in its database
    (written the way an older Berth accepted it): the replica fails to start
    and ``deployment errors`` says why, but no trace of the value appears in
    the CLI's answer, the REST errors endpoint, any log or the data
    directory's files — nor after the secret is deleted."""
    import requests
    from sqlalchemy.orm import sessionmaker

    from services.common.auth import Principal
    from services.secrets.crypto import MasterKeyring
    from services.secrets.service import SecretsService
    from tests.support.docker_engine import build_worker_image, engine
    from tests.support.platform import RunningPlatform, eventually

    head, tail = "Xq9-leak-head", "leak-tail-7"
    platform = RunningPlatform(tmp_path / "data")
    platform.data_dir.mkdir()
    leak_image = ""
    try:
        platform.start()
        created = platform.cli_json("projects", "create", "leak")
        key, project_id = created["api_key"], created["project"]["id"]
        platform.cli_json("secrets", "set", "--project", "leak", "--name", "APP_SECRET", "--stdin", api_key=key,
                          input="harmless-first-value\n")
        engine_ = create_engine(f"sqlite:///{platform.data_dir / 'secrets.db'}", connect_args={"timeout": 30})
        service = SecretsService(
            sessionmaker(engine_), MasterKeyring.load(env_value="", key_file=platform.data_dir / "master.key")
        )
        service._write("test", lambda s: service._append(
            s, Principal(project_id=project_id, key_name="old-berth"), project_id=project_id, environment_id="",
            environment_name="", name="APP_SECRET", type_="generic", value=f"{head}\x00{tail}",
        ))
        engine_.dispose()

        tag, leak_image = build_worker_image(engine(), version="leak")
        dep = platform.cli_json("deploy", "--image", tag, "--project", "leak", "--no-wait", api_key=key)[
            "deployment"]["id"]

        def failure() -> list:
            found = platform.cli_json("deployment", "errors", dep, "--project", "leak", api_key=key)["errors"]
            return [e for e in found if e["kind"] == "scheduling_failure"]

        [event] = eventually(failure, timeout=90, what="the start failure as an event")
        assert "can't contain null" in event["message"] and f'"APP_SECRET={REDACTED}"' in event["message"]
        rest = requests.get(f"{platform.router}/api/v1/deployments/{dep}/errors", headers={"X-API-KEY": key},
                            timeout=30)
        assert rest.status_code == 200

        platform.cli_json("secrets", "delete", "--project", "leak", "--name", "APP_SECRET", api_key=key)
        after = platform.cli("deployment", "errors", dep, "--project", "leak", "--output", "json", api_key=key).stdout

        shown = json.dumps(event) + rest.text + after
        files = b"".join(p.read_bytes() for p in platform.data_dir.rglob("*") if p.is_file())
        for trace in (head, tail, go_quoted(f"{head}\x00{tail}")):
            assert trace not in shown, trace
            assert trace.encode() not in files, (trace, platform.output()[-3000:])
    finally:
        platform.stop()
        platform.remove_containers()
        # Only the image this test built: every image of the run carries
        # TEST_LABEL, the session's worker image too, which later tests use.
        if leak_image:
            with contextlib.suppress(docker.errors.NotFound):
                engine().images.remove(leak_image, force=True)
