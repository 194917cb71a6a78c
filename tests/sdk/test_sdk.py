"""The typed SDK (issue 13) against a real `berth up` (registry, secrets,
scheduler, Docker, PostgreSQL): sync and asyncio flows, error details as
typed exceptions, a watch seeing a move, pagination crossing pages; and
against an in-process gRPC server standing in for a newer platform: enum
numbers this client does not know, and the retry policy (idempotent calls
retried on UNAVAILABLE, a deploy never)."""
from __future__ import annotations

import asyncio
import pathlib
import re
import uuid
from concurrent import futures

import grpc
import pytest

from berth import errors, local
from berth.client import Endpoints
from berth.sdk import (
    AsyncBerth,
    Berth,
    CanaryState,
    CanaryStep,
    DeploymentState,
    ErrorKind,
    ExperimentCase,
    HistoryKind,
    LogStream,
    ReplicaState,
    RetryPolicy,
    ServingStatus,
    WorkerConfig,
)
from berth.v1 import common_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.support.docker_engine import build_worker_image, engine
from tests.support.platform import RunningPlatform, started_platform

CONFIG = WorkerConfig(port=8080)
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with started_platform(tmp_path_factory.mktemp("sdk") / "data") as p:
        yield p


@pytest.fixture(scope="module")
def image():
    tag, _ = build_worker_image(engine(), version="sdk")
    return tag


def addresses(p: RunningPlatform) -> Endpoints:
    return Endpoints(registry=f"127.0.0.1:{p.ports['registry']}", secrets=f"127.0.0.1:{p.ports['secrets']}",
                     scheduler=f"127.0.0.1:{p.ports['scheduler']}")


def new_project(p: RunningPlatform) -> tuple[str, str]:
    with Berth(local.admin_key(p.data_dir), endpoints=addresses(p)) as admin:
        created = admin.create_project(f"s{uuid.uuid4().hex[:8]}")
    assert created.api_key and created.project.id.startswith("prj_")
    return created.project.name, created.api_key


def test_sync_flow_deploy_promote_rollback_history_status_secrets(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        qa = b.create_environment(project, "qa")
        assert qa.name == "qa" and qa.deployment_id == ""
        first = b.deploy(project, image, config=CONFIG, reason="first")
        second = b.deploy(project, image, config=CONFIG)
        assert first.environment.name == "preview" and first.entry.kind is HistoryKind.DEPLOY
        assert second.environment.deployment_id == second.deployment.id
        assert first.deployment.state is DeploymentState.ACTIVE
        fetched = b.get_deployment(project, first.deployment.id)
        # image_id may be resolved after the deploy returned: the rest is the same
        assert fetched.id == first.deployment.id and fetched.image == image and fetched.config.port == CONFIG.port
        assert fetched.state is DeploymentState.ACTIVE
        assert fetched.image_id == "" or fetched.image_id.startswith("sha256:")

        moved = b.promote(project, first.deployment.id, "qa", expected_sequence=0, reason="ship")
        assert moved.environment.deployment_id == first.deployment.id and moved.entry.reason == "ship"
        moved = b.promote(project, second.deployment.id, "qa", expected_sequence=moved.environment.sequence)
        assert moved.entry.kind is HistoryKind.PROMOTE and moved.entry.previous_deployment_id == first.deployment.id
        back = b.rollback(project, "qa", reason="bad", expected_sequence=moved.environment.sequence)
        assert back.environment.deployment_id == first.deployment.id and back.entry.kind is HistoryKind.ROLLBACK

        page = b.history_page(project, "qa", page_size=1)
        assert len(page.items) == 1 and page.next_page_token
        entries = list(b.history(project, "qa", page_size=1))  # three pages
        assert [e.kind for e in entries] == [HistoryKind.PROMOTE, HistoryKind.PROMOTE, HistoryKind.ROLLBACK]
        assert [e.sequence for e in entries] == [1, 2, 3]

        assert [e.name for e in b.list_environments(project, page_size=1)] == \
            [e.name for e in b.list_environments(project)]
        deployments = list(b.list_deployments(project, page_size=1))
        assert [d.id for d in deployments] == [second.deployment.id, first.deployment.id]  # newest first

        latest = b.status(project, latest=True)
        assert latest.deployment.id == second.deployment.id
        assert all(isinstance(s.status, ServingStatus) for s in latest.bindings)
        only_qa = b.status(project, deployment_id=first.deployment.id, environment="qa")
        assert [s.environment for s in only_qa.bindings] == ["qa"]
        found = list(b.errors(project, latest=True))
        assert all(isinstance(e.kind, ErrorKind) and e.deployment_id == second.deployment.id for e in found)

        info = b.set_secret(project, "DB_URL", "postgres://x", type="generic")
        assert info.name == "DB_URL" and info.version == 1
        assert b.set_secret(project, "DB_URL", "postgres://y").version == 2
        assert [s.name for s in b.list_secrets(project)] == ["DB_URL"]
        assert b.delete_secret(project, "DB_URL").name == "DB_URL"
        assert list(b.list_secrets(project)) == []
        deleted = b.delete_environment(project, "qa", force=True)
        assert deleted.name == "qa"


def test_errors_are_typed_exceptions_with_their_details(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        with pytest.raises(errors.InvalidArgument) as bad:
            b.create_environment(project, "Not A Name!")
        assert bad.value.field == "name" and bad.value.code == "INVALID_ARGUMENT"

        deployed = b.deploy(project, image, config=CONFIG)
        sequence = deployed.environment.sequence
        with pytest.raises(errors.Aborted) as lost:
            b.deploy(project, image, config=CONFIG, expected_sequence=sequence - 1)
        assert lost.value.reason == "SEQUENCE_CONFLICT"
        assert lost.value.metadata["current_sequence"] == str(sequence)

        with pytest.raises(errors.NotFound) as missing:
            b.get_deployment(project, "dep_0123456789ab")
        assert missing.value.resource_type == "deployment"
        with pytest.raises(errors.InvalidArgument) as empty:
            b.status(project)  # neither deployment_id nor latest
        assert empty.value.field == "deployment_id"

    with Berth("wrong-key", endpoints=addresses(platform)) as nobody, pytest.raises(errors.Unauthenticated):
        nobody.get_project(project)


def test_watch_iterator_receives_a_move(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        b.create_environment(project, "qa")
        deployed = b.deploy(project, image, config=CONFIG)
        events = b.watch_environments(project, timeout=60)
        for event in events:  # the snapshot first
            if event.snapshot_complete:
                break
        b.promote(project, deployed.deployment.id, "qa")
        moved = next(e for e in events if e.change == "moved")
        events.close()  # cancels the stream
        assert moved.environment is not None and moved.environment.name == "qa"
        assert moved.entry is not None and moved.entry.deployment_id == deployed.deployment.id

        # resumed from the move's revision: nothing of the snapshot again
        resumed = b.watch_environments(project, since_revision=moved.revision - 1, timeout=60)
        again = next(e for e in resumed if e.change == "moved")
        resumed.close()
        assert again.revision == moved.revision


def test_async_flow(platform, image):
    project, key = new_project(platform)

    async def flow() -> None:
        async with AsyncBerth(key, endpoints=addresses(platform)) as b:
            await b.create_environment(project, "qa")
            ids = [(await b.deploy(project, image, config=CONFIG)).deployment.id for _ in range(3)]
            listed = [d.id async for d in b.list_deployments(project, page_size=2)]
            assert listed == ids[::-1]

            events = b.watch_environments(project, timeout=60)
            async for event in events:
                if event.snapshot_complete:
                    break
            moved = await b.promote(project, ids[0], "qa", expected_sequence=0)
            async for event in events:
                if event.change == "moved":
                    assert event.entry is not None and event.entry.sequence == moved.entry.sequence
                    break
            await events.aclose()

            with pytest.raises(errors.Aborted) as lost:
                await b.promote(project, ids[1], "qa", expected_sequence=0)
            assert lost.value.metadata["current_sequence"] == "1"
            await b.promote(project, ids[1], "qa", expected_sequence=1)
            await b.rollback(project, "qa")
            kinds = [e.kind async for e in b.history(project, "qa", page_size=1)]
            assert kinds == [HistoryKind.PROMOTE, HistoryKind.PROMOTE, HistoryKind.ROLLBACK]
            status = await b.status(project, latest=True)
            assert status.deployment.id == ids[2]
            recorded = [e async for e in b.errors(project, deployment_id=ids[2])]
            assert all(e.deployment_id == ids[2] and isinstance(e.kind, ErrorKind) for e in recorded)
            await b.set_secret(project, "TOKEN", "t", environment="qa")
            assert [s.environment async for s in b.list_secrets(project, environment="qa")] == ["qa"]
            with pytest.raises(errors.NotFound):
                await b.delete_secret(project, "NOPE")
            with pytest.raises(errors.InvalidArgument) as bad:
                await b.create_environment(project, "")
            assert bad.value.field == "name"

    asyncio.run(flow())


def test_api_keys_and_gates(platform):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        created = b.create_api_key(project, "ci")
        assert created.key.name == "ci" and created.api_key.startswith(created.key.prefix)
        with Berth(created.api_key, endpoints=addresses(platform)) as ci:
            assert ci.get_project(project).name == project
        assert "ci" in [k.name for k in b.list_api_keys(project, page_size=1)]
        revoked = b.revoke_api_key(project, "ci")
        assert revoked.revoked_at is not None
        with Berth(created.api_key, endpoints=addresses(platform)) as ci, pytest.raises(errors.Unauthenticated):
            ci.get_project(project)

        digest = "sha256:" + "ab" * 32  # no run recorded yet: the dataset is named
        gate = b.set_gate(project, "production", "smoke", 0.9, dataset_digest=digest)
        assert (gate.environment_name, gate.experiment, gate.threshold) == ("production", "smoke", 0.9)
        assert gate.dataset_digest == digest
        assert [g.experiment for g in b.list_gates(project)] == ["smoke"]
        with pytest.raises(errors.InvalidArgument) as bad:
            b.set_gate(project, "production", "smoke", 1.5, dataset_digest=digest)
        assert bad.value.field == "threshold"
        assert b.clear_gate(project, "production") is True
        assert b.clear_gate(project, "production") is False
        assert b.list_gates(project) == ()


def test_experiment_runs_and_logs_errors(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        deployed = b.deploy(project, image, config=CONFIG)
        digest = "sha256:" + "cd" * 32
        cases = [ExperimentCase("home", True, 200, 12.5), ExperimentCase("login", False, 500, 30.0, "status 500")]
        run = b.record_experiment_run(project, "smoke", deployed.deployment.id, digest, cases)
        assert (run.total, run.passed, run.pass_rate) == (2, 1, 0.5)
        fetched = b.get_experiment_run(project, run.id)
        assert fetched.cases == tuple(cases) and fetched.dataset_digest == digest
        b.record_experiment_run(project, "smoke", deployed.deployment.id, digest, cases[:1])
        listed = list(b.list_experiment_runs(project, name="smoke", page_size=1))
        assert len(listed) == 2 and listed[1].id == run.id and listed[0].pass_rate == 1.0  # newest first
        with pytest.raises(errors.InvalidArgument) as bad:
            b.record_experiment_run(project, "smoke", deployed.deployment.id, "md5:x", cases)
        assert bad.value.field == "dataset_digest"
        with pytest.raises(errors.NotFound):
            list(b.logs(project, deployment_id="dep_0123456789ab"))


def test_canary_calls(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        b.create_environment(project, "qa")
        stable = b.deploy(project, image, config=CONFIG).deployment.id
        b.promote(project, stable, "qa")
        candidate = b.deploy(project, image, config=CONFIG).deployment.id
        steps = [CanaryStep(weight=10, bake_seconds=600), CanaryStep(weight=50, bake_seconds=600)]

        with pytest.raises(errors.InvalidArgument) as bad:
            b.start_canary(project, candidate, "qa", [CanaryStep(weight=150, bake_seconds=1)])
        assert bad.value.field.startswith("steps")
        started = b.start_canary(project, candidate, "qa", steps, min_replicas=1, max_replicas=1)
        canary = started.environment.canary
        assert canary is not None and canary.state is CanaryState.RUNNING
        assert (canary.stable_deployment_id, canary.candidate_deployment_id) == (stable, candidate)
        assert canary.steps == tuple(steps)
        with pytest.raises(errors.FailedPrecondition):
            b.start_canary(project, candidate, "qa", steps)

        assert b.pause_canary(project, "qa").environment.canary.state is CanaryState.PAUSED
        assert b.get_canary(project, "qa").environment.canary.state is CanaryState.PAUSED
        assert b.resume_canary(project, "qa").environment.canary.state is CanaryState.RUNNING
        promoted = b.promote_canary_now(project, "qa", reason="looks fine")
        assert promoted.environment.canary.state is CanaryState.PROMOTED
        assert promoted.environment.deployment_id == candidate
        assert promoted.entry is not None and promoted.entry.deployment_id == candidate

        b.start_canary(project, stable, "qa", steps[:1])
        aborted = b.abort_canary(project, "qa", reason="no")
        assert aborted.environment.canary.state is CanaryState.ABORTED
        assert aborted.environment.deployment_id == candidate


def test_secret_versions_adjust_replicas_and_master_key(platform, image):
    project, key = new_project(platform)
    with Berth(key, endpoints=addresses(platform)) as b:
        for value in ("one", "two", "three"):
            b.set_secret(project, "TOKEN", value)
        assert [v.version for v in b.secret_versions(project, "TOKEN", page_size=2)] == [1, 2, 3]
        restored = b.rollback_secret(project, "TOKEN", 1)
        assert restored.version == 4
        with pytest.raises(errors.NotFound):
            b.rollback_secret(project, "TOKEN", 99)

        deployed = b.deploy(project, image, config=CONFIG, min_replicas=1, max_replicas=2)
        before = next(iter(b.list_bindings(project, deployment_id=deployed.deployment.id)))
        up = b.adjust_replicas(project, deployed.deployment.id, "preview", 1)
        assert (up.min_replicas, up.max_replicas) != (before.min_replicas, before.max_replicas)
        down = b.adjust_replicas(project, deployed.deployment.id, "preview", -1)
        assert (down.min_replicas, down.max_replicas) == (before.min_replicas, before.max_replicas)

        # scale sets the idle windows too; what is not given stays
        idle = b.scale(project, deployed.deployment.id, "preview", idle_pause_seconds=120, idle_stop_seconds=600)
        assert (idle.idle_pause_seconds, idle.idle_stop_seconds) == (120, 600)
        assert (idle.min_replicas, idle.max_replicas) == (before.min_replicas, before.max_replicas)
        stop_only = b.scale(project, deployed.deployment.id, "", idle_stop_seconds=900)  # one environment: "" will do
        assert (stop_only.idle_pause_seconds, stop_only.idle_stop_seconds) == (120, 900)
        with pytest.raises(errors.InvalidArgument) as out_of_range:
            b.scale(project, deployed.deployment.id, "preview", idle_stop_seconds=86_401)
        assert out_of_range.value.field == "idle_stop_seconds"
        listed = next(iter(b.list_bindings(project, deployment_id=deployed.deployment.id)))
        assert (listed.idle_pause_seconds, listed.idle_stop_seconds) == (120, 900)

        with pytest.raises(errors.PermissionDenied):
            b.rotate_master_key()
    with Berth(local.admin_key(platform.data_dir), endpoints=addresses(platform)) as admin:
        rotated = admin.rotate_master_key()
    assert rotated.data_keys_rewrapped >= 1 and rotated.key_fingerprint
    with Berth(key, endpoints=addresses(platform)) as b:  # still readable under the new master key
        assert b.set_secret(project, "TOKEN", "five").version == 5


def test_the_guides_examples_run(platform, image):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    namespace = {"PROJECT": f"d{uuid.uuid4().hex[:8]}", "IMAGE": image, "ADMIN_KEY": local.admin_key(platform.data_dir),
                 "ENDPOINTS": addresses(platform), "__name__": "sdk_guide"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the guide's own code
    with Berth(namespace["key"], endpoints=addresses(platform)) as b:
        assert b.history_page(namespace["PROJECT"], "qa").items[-1].deployment_id == namespace["second"].deployment.id


# ---------------------------------------------------------------- a newer server, in process


class NewerRegistry(registry_pb2_grpc.RegistryServicer):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.unavailable = 0  # answer UNAVAILABLE this many times first

    def _count(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.unavailable:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def GetDeployment(self, request, context):  # noqa: N802
        self._count("GetDeployment", context)
        return common_pb2.Deployment(id=request.deployment_id, state=99)  # a state this client does not know

    def Deploy(self, request, context):  # noqa: N802
        self._count("Deploy", context)
        return registry_pb2.DeployResponse()

    def ListHistory(self, request, context):  # noqa: N802
        self._count("ListHistory", context)
        return registry_pb2.ListHistoryResponse(entries=[common_pb2.HistoryEntry(sequence=1, kind=42)])


class NewerScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def StreamDeploymentLogs(self, request, context):  # noqa: N802
        yield scheduler_pb2.LogLine(replica_id="r1", stream=1, text=f"tail={request.tail}")
        yield scheduler_pb2.LogLine(replica_id="r1", stream=9, text="from a newer stream kind")
        if request.follow:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")

    def GetDeploymentStatus(self, request, context):  # noqa: N802
        return scheduler_pb2.DeploymentStatus(
            deployment=common_pb2.Deployment(id="dep_0123456789ab", state=1),
            bindings=[scheduler_pb2.BindingStatus(environment="preview", status=77,
                                                  replicas=[scheduler_pb2.Replica(id="r", state=55)])])


@pytest.fixture
def newer():
    servicer = NewerRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(NewerScheduler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    yield servicer, Endpoints(registry=address, secrets=address, scheduler=address)
    server.stop(None)


def test_unknown_enum_numbers_read_as_unknown(newer):
    _, endpoints = newer
    with Berth("k", endpoints=endpoints) as b:
        assert b.get_deployment("p", "dep_0123456789ab").state is DeploymentState.UNKNOWN
        assert [e.kind for e in b.history("p", "preview")] == [HistoryKind.UNKNOWN]
        status = b.status("p", latest=True)
        assert status.deployment.state is DeploymentState.ACTIVE
        assert status.bindings[0].status is ServingStatus.UNKNOWN
        assert status.bindings[0].replicas[0].state is ReplicaState.UNKNOWN


def test_log_lines_stream_and_fail_typed(newer):
    _, endpoints = newer
    with Berth("k", endpoints=endpoints) as b:
        lines = list(b.logs("p", latest=True, tail=5))
        assert [(line.stream, line.text) for line in lines] == [(LogStream.STDOUT, "tail=5"),
                                                                (LogStream.UNKNOWN, "from a newer stream kind")]
        with pytest.raises(errors.Unavailable):
            list(b.logs("p", latest=True, follow=True, timeout=30))

    async def asynchronously() -> list[str]:
        async with AsyncBerth("k", endpoints=endpoints) as ab:
            return [line.text async for line in ab.logs("p", latest=True)]
    assert asyncio.run(asynchronously()) == ["tail=0", "from a newer stream kind"]


def test_retry_policy_retries_reads_never_a_deploy(newer):
    servicer, endpoints = newer
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    with Berth("k", endpoints=endpoints, retry=policy) as b:
        servicer.unavailable = 2
        assert b.get_deployment("p", "dep_0123456789ab").id == "dep_0123456789ab"
        assert servicer.calls["GetDeployment"] == 3

        servicer.unavailable = 3  # more than the policy allows
        with pytest.raises(errors.Unavailable):
            b.get_deployment("p", "dep_0123456789ab")
        assert servicer.calls["GetDeployment"] == 6

        servicer.unavailable = 1
        with pytest.raises(errors.Unavailable):
            b.deploy("p", "img")
        assert servicer.calls["Deploy"] == 1

    async def asynchronously() -> None:
        async with AsyncBerth("k", endpoints=endpoints, retry=policy) as ab:
            servicer.unavailable = 2
            assert (await ab.get_deployment("p", "dep_0123456789ab")).state is DeploymentState.UNKNOWN
    asyncio.run(asynchronously())
    assert servicer.calls["GetDeployment"] == 9


def test_every_public_method_has_an_sdk_method():
    from google.protobuf import descriptor_pool

    from berth import sdk

    pool = descriptor_pool.Default()
    public = {m.name for service in ("berth.v1.Registry", "berth.v1.Secrets", "berth.v1.Scheduler")
              for m in pool.FindServiceByName(service).methods}
    called = {op.method for op in vars(sdk).values() if isinstance(op, sdk._Op)}
    called |= {"WatchEnvironments", "StreamDeploymentLogs"}  # the two streams, called directly
    # AdvanceCanary is the canary controller's (service token), moving to berth.internal.v1
    assert public - called <= {"AdvanceCanary"}
    assert called <= public


def test_retry_policy_is_validated():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    assert list(RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=0.3).backoffs()) == [0.1, 0.2, 0.3]
