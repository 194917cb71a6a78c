"""Experiment runs and gates in the registry, over gRPC on SQLite and
PostgreSQL: the gate refuses a deployment without a passing run on the gate's
dataset (FAILED_PRECONDITION with PreconditionFailure and ErrorInfo
GATE_NOT_PASSED), accepts a passing one, a new dataset digest no longer
satisfies it, skip_gate with a reason is recorded in history."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from berth import errors
from berth.v1 import registry_pb2 as R
from tests.registry.conftest import Registry, database_url  # noqa: F401 - the fixture
from tests.support.postgres import postgres_cluster  # noqa: F401 - the session fixture

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture
def registry(database_url):  # type: ignore[no-untyped-def]  # noqa: F811
    reg = Registry(database_url)
    yield reg
    reg.close()


def cases(passed: int, failed: int) -> list[R.ExperimentCaseResult]:
    return ([R.ExperimentCaseResult(name=f"ok-{i}", passed=True, status=200, latency_ms=10.0 + i) for i in range(passed)]
            + [R.ExperimentCaseResult(name=f"bad-{i}", passed=False, status=404, latency_ms=5.0, reason="status 404")
               for i in range(failed)])


def raw_error(registry: Registry, name: str, request: object, key: str) -> grpc.RpcError:
    try:
        getattr(registry.stub, name)(request, metadata=(("x-api-key", key),), timeout=10)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{name} succeeded")


def details(exc: grpc.RpcError) -> dict[type, object]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out: dict[type, object] = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.PreconditionFailure, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out[cls] = msg
    return out


def test_gate_refuses_failing_accepts_passing_and_follows_the_digest(registry: Registry) -> None:
    _, key = registry.create_project("shop")
    call = registry.call
    good = call("Deploy", R.DeployRequest(image="app:1"), key).deployment.id
    bad = call("Deploy", R.DeployRequest(image="app:2"), key).deployment.id

    good_run = call("RecordExperimentRun", R.RecordExperimentRunRequest(
        name="smoke", deployment_id=good, dataset_digest=D1, cases=cases(50, 0)), key)
    bad_run = call("RecordExperimentRun", R.RecordExperimentRunRequest(
        name="smoke", deployment_id=bad, dataset_digest=D1, cases=cases(40, 10)), key)
    assert (good_run.pass_rate, good_run.total, good_run.passed) == (1.0, 50, 50)
    assert (bad_run.pass_rate, bad_run.passed) == (0.8, 40)
    assert (bad_run.latency_p50_ms, bad_run.latency_p99_ms) == (24.0, 49.0) and bad_run.actor and bad_run.created_at.seconds > 0
    assert [c.name for c in bad_run.cases][-1] == "bad-9"

    # the gate takes the digest of the project's newest run when none is given
    gate = call("SetEnvironmentGate", R.SetEnvironmentGateRequest(
        environment="production", experiment="smoke", threshold=0.95), key)
    assert (gate.environment_name, gate.experiment, gate.threshold, gate.dataset_digest) == (
        "production", "smoke", 0.95, D1)

    exc = raw_error(registry, "Promote", R.PromoteRequest(
        deployment_id=bad, target_environment="production", confirm=True), key)
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    found = details(exc)
    info = found[error_details_pb2.ErrorInfo]
    violation = found[error_details_pb2.PreconditionFailure].violations[0]  # type: ignore[attr-defined]
    assert info.reason == "GATE_NOT_PASSED"  # type: ignore[attr-defined]
    assert info.metadata["run_id"] == bad_run.id and info.metadata["pass_rate"] == "0.8"  # type: ignore[attr-defined]
    assert violation.type == "GATE_NOT_PASSED" and violation.subject == f"experiment_run/{bad_run.id}"
    assert "80.00%" in exc.details() and "95.00%" in exc.details()
    assert call("ListHistory", R.ListHistoryRequest(environment="production"), key).entries == []

    # a deployment with no run at all: the violation names the experiment
    none = call("Deploy", R.DeployRequest(image="app:3"), key).deployment.id
    exc = raw_error(registry, "Promote", R.PromoteRequest(
        deployment_id=none, target_environment="production", confirm=True), key)
    violation = details(exc)[error_details_pb2.PreconditionFailure].violations[0]  # type: ignore[attr-defined]
    assert violation.subject == "experiment/smoke" and "has no run of it" in exc.details()

    moved = call("Promote", R.PromoteRequest(deployment_id=good, target_environment="production", confirm=True), key)
    assert moved.environment.deployment_id == good

    # the dataset changes: the gate now names D2, the run on D1 no longer counts
    call("SetEnvironmentGate", R.SetEnvironmentGateRequest(
        environment="staging", experiment="smoke", threshold=0.95, dataset_digest=D2), key)
    with pytest.raises(errors.FailedPrecondition, match="has no run of it on that dataset"):
        call("Promote", R.PromoteRequest(deployment_id=good, target_environment="staging"), key)
    call("RecordExperimentRun", R.RecordExperimentRunRequest(
        name="smoke", deployment_id=good, dataset_digest=D2, cases=cases(19, 1)), key)
    call("Promote", R.PromoteRequest(deployment_id=good, target_environment="staging"), key)

    # the latest run on the gate's dataset counts: a newer failing run of the bad build stays failing,
    # a newer passing one passes
    call("RecordExperimentRun", R.RecordExperimentRunRequest(
        name="smoke", deployment_id=bad, dataset_digest=D2, cases=cases(20, 0)), key)
    call("RecordExperimentRun", R.RecordExperimentRunRequest(
        name="smoke", deployment_id=bad, dataset_digest=D2, cases=cases(1, 1)), key)
    with pytest.raises(errors.FailedPrecondition, match="passed 50.00%"):
        call("Promote", R.PromoteRequest(deployment_id=bad, target_environment="staging"), key)


def test_skip_gate_needs_a_reason_and_is_recorded(registry: Registry) -> None:
    _, key = registry.create_project("shop")
    call = registry.call
    dep = call("Deploy", R.DeployRequest(image="app:1"), key).deployment.id
    call("SetEnvironmentGate", R.SetEnvironmentGateRequest(
        environment="staging", experiment="smoke", threshold=0.9, dataset_digest=D1), key)
    with pytest.raises(errors.InvalidArgument) as no_reason:
        call("Promote", R.PromoteRequest(deployment_id=dep, target_environment="staging", skip_gate=True), key)
    assert no_reason.value.field == "reason"
    entry = call("Promote", R.PromoteRequest(deployment_id=dep, target_environment="staging", skip_gate=True,
                                             reason="hotfix for the outage"), key).entry
    assert entry.reason == "gate smoke >= 0.9 skipped: hotfix for the outage"
    history = call("ListHistory", R.ListHistoryRequest(environment="staging"), key).entries
    assert [h.reason for h in history] == ["gate smoke >= 0.9 skipped: hotfix for the outage"]


def test_gated_deploy_rollback_clear_and_delete(registry: Registry) -> None:
    _, key = registry.create_project("shop")
    call = registry.call
    v1 = call("Deploy", R.DeployRequest(image="app:1"), key).deployment.id
    v2 = call("Deploy", R.DeployRequest(image="app:2"), key).deployment.id
    call("Promote", R.PromoteRequest(deployment_id=v1, target_environment="staging"), key)
    call("Promote", R.PromoteRequest(deployment_id=v2, target_environment="staging"), key)
    call("SetEnvironmentGate", R.SetEnvironmentGateRequest(
        environment="staging", experiment="smoke", threshold=1.0, dataset_digest=D1), key)
    with pytest.raises(errors.FailedPrecondition) as gated:
        call("Deploy", R.DeployRequest(image="app:3", environment="staging"), key)
    assert gated.value.reason == "GATED_ENVIRONMENT"
    # rollback is not gated
    back = call("Rollback", R.RollbackRequest(environment="staging"), key)
    assert back.environment.deployment_id == v1
    gates = call("ListEnvironmentGates", R.ListEnvironmentGatesRequest(), key).gates
    assert [(g.environment_name, g.experiment) for g in gates] == [("staging", "smoke")]
    assert call("ClearEnvironmentGate", R.ClearEnvironmentGateRequest(environment="staging"), key).cleared
    assert not call("ClearEnvironmentGate", R.ClearEnvironmentGateRequest(environment="staging"), key).cleared
    call("Promote", R.PromoteRequest(deployment_id=v2, target_environment="staging"), key)
    # an environment with a gate can be deleted (the gate goes with it)
    call("CreateEnvironment", R.CreateEnvironmentRequest(name="qa"), key)
    call("SetEnvironmentGate", R.SetEnvironmentGateRequest(
        environment="qa", experiment="smoke", threshold=0.5, dataset_digest=D1), key)
    call("DeleteEnvironment", R.DeleteEnvironmentRequest(environment="qa"), key)
    assert call("ListEnvironmentGates", R.ListEnvironmentGatesRequest(), key).gates == []


def test_runs_list_paged_filtered_shown_and_validated(registry: Registry) -> None:
    _, key = registry.create_project("shop")
    _, other_key = registry.create_project("other")
    call = registry.call
    a = call("Deploy", R.DeployRequest(image="app:1"), key).deployment.id
    b = call("Deploy", R.DeployRequest(image="app:2"), key).deployment.id
    ids = []
    for i in range(5):
        ids.append(call("RecordExperimentRun", R.RecordExperimentRunRequest(
            name="smoke" if i % 2 == 0 else "load", deployment_id=a if i < 3 else b, dataset_digest=D1,
            cases=cases(1, 0)), key).id)
    first = call("ListExperimentRuns", R.ListExperimentRunsRequest(page_size=2), key)
    assert len(first.runs) == 2 and first.next_page_token and not first.runs[0].cases
    rest = call("ListExperimentRuns", R.ListExperimentRunsRequest(page_size=2, page_token=first.next_page_token), key)
    last = call("ListExperimentRuns", R.ListExperimentRunsRequest(page_size=2, page_token=rest.next_page_token), key)
    assert [r.id for r in [*first.runs, *rest.runs, *last.runs]] == list(reversed(ids)) and not last.next_page_token
    assert [r.id for r in call("ListExperimentRuns", R.ListExperimentRunsRequest(deployment_id=a, name="smoke"),
                               key).runs] == [ids[2], ids[0]]
    with pytest.raises(errors.InvalidArgument) as wrong_token:
        call("ListExperimentRuns", R.ListExperimentRunsRequest(name="smoke", page_token=first.next_page_token), key)
    assert wrong_token.value.field == "page_token"
    shown = call("GetExperimentRun", R.GetExperimentRunRequest(run_id=ids[0]), key)
    assert [c.name for c in shown.cases] == ["ok-0"]
    with pytest.raises(errors.NotFound):
        call("GetExperimentRun", R.GetExperimentRunRequest(run_id=ids[0]), other_key)
    with pytest.raises(errors.NotFound):
        call("RecordExperimentRun", R.RecordExperimentRunRequest(
            name="smoke", deployment_id=a, dataset_digest=D1, cases=cases(1, 0)), other_key)
    bad_requests = [
        (R.RecordExperimentRunRequest(name="Smoke!", deployment_id=a, dataset_digest=D1, cases=cases(1, 0)), "name"),
        (R.RecordExperimentRunRequest(name="smoke", deployment_id=a, dataset_digest="sha1:x", cases=cases(1, 0)),
         "dataset_digest"),
        (R.RecordExperimentRunRequest(name="smoke", deployment_id=a, dataset_digest=D1), "cases"),
        (R.RecordExperimentRunRequest(name="smoke", deployment_id=a, dataset_digest=D1, cases=[
            R.ExperimentCaseResult(name="x", passed=True, status=200, latency_ms=-1)]), "cases[0].latency_ms"),
    ]
    for request, field in bad_requests:
        with pytest.raises(errors.InvalidArgument) as caught:
            call("RecordExperimentRun", request, key)
        assert caught.value.field == field
    with pytest.raises(errors.InvalidArgument) as bad_threshold:
        call("SetEnvironmentGate", R.SetEnvironmentGateRequest(environment="staging", experiment="smoke",
                                                               threshold=1.5), key)
    assert bad_threshold.value.field == "threshold"
    with pytest.raises(errors.FailedPrecondition) as no_run:
        call("SetEnvironmentGate", R.SetEnvironmentGateRequest(environment="staging", experiment="never",
                                                               threshold=0.5), key)
    assert no_run.value.reason == "NO_EXPERIMENT_RUN"
    # nothing was recorded by the refused calls
    assert len(call("ListExperimentRuns", R.ListExperimentRunsRequest(), key).runs) == 5
