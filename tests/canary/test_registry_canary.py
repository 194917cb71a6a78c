"""The registry's canary: start, pause/resume, the controller's advance with
compare-and-swap on sequence and step (a repeated step is refused, never
applied twice), abort to weight 0, the 100% end as a promote move, history
entries for every weight change, and the change feed carrying the canary
(in process, on SQLite and on PostgreSQL; the platform test drives it
through real services)."""
from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from berth import enums, errors
from berth.v1 import common_pb2
from services.common.auth import ADMIN_PRINCIPAL, SERVICE_PRINCIPAL
from services.registry import canary as canaries
from services.registry import domain
from services.registry.changes import ChangeHub
from services.registry.service import RegistryService
from services.registry.storage import ChangeRow, make_engine, migrate
from tests.registry.conftest import database_url  # noqa: F401 - the fixture: SQLite and PostgreSQL
from tests.support.postgres import postgres_cluster  # noqa: F401 - the session fixture

THRESHOLDS = canaries.Thresholds(0, 0, 0)  # the defaults


@pytest.fixture
def svc(database_url: str):  # type: ignore[no-untyped-def]  # noqa: F811
    engine = make_engine(database_url)
    migrate(engine)
    service = RegistryService(sessionmaker(engine, expire_on_commit=False), ChangeHub(), admin_key="a" * 40,
                              service_token="s" * 40)
    _, key = service.create_project(ADMIN_PRINCIPAL, "shop")
    principal = service.authenticate(key)
    yield service, principal
    engine.dispose()


def _deploy(service, principal, image: str) -> str:  # type: ignore[no-untyped-def]
    dep, _ = service.deploy(
        principal, project_ref="", image=image, image_id="", config=domain.WorkerConfig(), environment_ref="preview",
        min_replicas=1, max_replicas=2, expected_sequence=None, confirm=False, reason="",
    )
    return dep.id


def _start(service, principal, stable: str, candidate: str, steps=((10, 60), (50, 60))):  # type: ignore[no-untyped-def]
    service.promote(principal, project_ref="", deployment_id=stable, target_environment_ref="staging",
                    min_replicas=None, max_replicas=None, scale_previous_to_zero=False, expected_sequence=None,
                    confirm=False, reason="")
    return service.start_canary(
        principal, project_ref="", deployment_id=candidate, environment_ref="staging", steps=list(steps),
        thresholds=THRESHOLDS, min_replicas=1, max_replicas=2, expected_sequence=None, confirm=False,
        reason="try it", skip_gate=False,
    )


def _state(env: common_pb2.Environment) -> str:
    return enums.label(common_pb2.Canary.State, env.canary.state)


def test_start_advance_and_promote(svc) -> None:  # type: ignore[no-untyped-def]
    service, principal = svc
    stable, candidate = _deploy(service, principal, "busybox:1"), _deploy(service, principal, "busybox:2")
    env, entry = _start(service, principal, stable, candidate)
    assert env.deployment_id == stable and env.canary.candidate_deployment_id == candidate
    assert env.canary.candidate_weight == 10 and _state(env) == "running"
    assert enums.label(common_pb2.HistoryEntry.Kind, entry.kind) == "canary" and entry.deployment_id == stable
    assert env.canary.thresholds.max_latency_ratio == pytest.approx(1.2)
    assert env.canary.thresholds.min_requests == 100
    bindings, _ = service.list_bindings(principal, "", candidate, "staging")
    assert bindings and bindings[0].min_replicas == 1 and not bindings[0].serving

    env, entry = service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                                        expected_sequence=env.sequence, step=0, action="advance", analysis="ok")
    assert env.canary.candidate_weight == 50 and env.canary.step == 1 and entry is not None
    # The same move again (a restarted controller): refused, not applied twice.
    with pytest.raises(errors.Aborted):
        service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                               expected_sequence=env.sequence - 1, step=0, action="advance", analysis="ok")
    with pytest.raises(errors.Aborted):
        service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                               expected_sequence=env.sequence, step=0, action="advance", analysis="ok")
    assert service.get_canary(principal, "", "staging").canary.candidate_weight == 50

    env, entry = service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                                        expected_sequence=env.sequence, step=1, action="advance", analysis="ok")
    assert entry is not None and enums.label(common_pb2.HistoryEntry.Kind, entry.kind) == "promote"
    assert env.deployment_id == candidate and _state(env) == "promoted" and env.canary.candidate_weight == 100
    history, _ = service.list_history(principal, "", "staging")
    kinds = [enums.label(common_pb2.HistoryEntry.Kind, h.kind) for h in history]
    weights = [h.reason for h in history if enums.label(common_pb2.HistoryEntry.Kind, h.kind) == "canary"]
    print("history:", kinds, weights)
    assert kinds == ["promote", "canary", "canary", "promote"]
    assert [h.sequence for h in history] == [1, 2, 3, 4]


def test_abort_pause_resume_and_refusals(svc) -> None:  # type: ignore[no-untyped-def]
    service, principal = svc
    stable, candidate = _deploy(service, principal, "busybox:1"), _deploy(service, principal, "busybox:2")
    env, _ = _start(service, principal, stable, candidate)
    with pytest.raises(errors.FailedPrecondition) as caught:
        _start(service, principal, stable, candidate)
    assert caught.value.reason in ("CANARY_RUNNING", "ALREADY_SERVING")
    with pytest.raises(errors.PermissionDenied):
        service.advance_canary(principal, project_id=env.project_id, environment_id=env.id,
                               expected_sequence=env.sequence, step=0, action="advance", analysis="")
    env, _ = service.canary_action(principal, project_ref="", environment_ref="staging", action="pause",
                                   expected_sequence=None, reason="look")
    assert _state(env) == "paused"
    with pytest.raises(errors.FailedPrecondition) as caught:
        service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                               expected_sequence=env.sequence, step=0, action="advance", analysis="")
    assert caught.value.reason == "CANARY_NOT_RUNNING"
    with pytest.raises(errors.FailedPrecondition):
        service.canary_action(principal, project_ref="", environment_ref="staging", action="pause",
                              expected_sequence=None, reason="")
    env, _ = service.canary_action(principal, project_ref="", environment_ref="staging", action="resume",
                                   expected_sequence=None, reason="")
    assert _state(env) == "running"
    env, entry = service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                                        expected_sequence=env.sequence, step=0, action="abort",
                                        analysis="candidate 5xx 20.0% > stable 0.0% + 1.0 points")
    assert _state(env) == "aborted" and env.canary.candidate_weight == 0 and env.deployment_id == stable
    assert entry is not None and "5xx" in entry.reason and "aborted" in entry.reason
    with pytest.raises(errors.FailedPrecondition) as caught:
        service.canary_action(principal, project_ref="", environment_ref="staging", action="abort",
                              expected_sequence=None, reason="")
    assert caught.value.reason == "CANARY_ENDED"
    # The feed carried every canary change to watchers (routers).
    with service._read() as session:
        rows = session.execute(select(ChangeRow).where(ChangeRow.kind == "environment")).scalars().all()
        published = [common_pb2.Environment.FromString(r.payload) for r in rows]
    seen = [(e.canary.candidate_weight, _state(e)) for e in published if e.HasField("canary") and e.name == "staging"]
    print("published:", seen)
    assert (10, "running") in seen and (10, "paused") in seen and (0, "aborted") in seen
    # A later ordinary move ends the record.
    moved = service.promote(principal, project_ref="", deployment_id=candidate, target_environment_ref="staging",
                            min_replicas=None, max_replicas=None, scale_previous_to_zero=False,
                            expected_sequence=None, confirm=False, reason="")
    assert not moved.environment.HasField("canary")


def test_start_validation(svc) -> None:  # type: ignore[no-untyped-def]
    service, principal = svc
    stable, candidate = _deploy(service, principal, "busybox:1"), _deploy(service, principal, "busybox:2")
    with pytest.raises(errors.FailedPrecondition) as caught:
        service.start_canary(principal, project_ref="", deployment_id=candidate, environment_ref="staging",
                             steps=[(10, 5)], thresholds=THRESHOLDS, min_replicas=None, max_replicas=None,
                             expected_sequence=None, confirm=False, reason="", skip_gate=False)
    assert caught.value.reason == "NO_DEPLOYMENT"
    _start(service, principal, stable, candidate)
    service.canary_action(principal, project_ref="", environment_ref="staging", action="abort",
                          expected_sequence=None, reason="")
    for steps in ([], [(50, 10), (10, 10)], [(0, 10)], [(100, 10)], [(10, 0)], [(10, 5)] * 21):
        with pytest.raises(errors.InvalidArgument):
            service.start_canary(principal, project_ref="", deployment_id=candidate, environment_ref="staging",
                                 steps=steps, thresholds=THRESHOLDS, min_replicas=None, max_replicas=None,
                                 expected_sequence=None, confirm=False, reason="", skip_gate=False)
    with pytest.raises(errors.InvalidArgument):
        service.start_canary(principal, project_ref="", deployment_id=candidate, environment_ref="staging",
                             steps=[(10, 5)], thresholds=canaries.Thresholds(2.0, 0, 0), min_replicas=None,
                             max_replicas=None, expected_sequence=None, confirm=False, reason="", skip_gate=False)
    # Refusals recorded nothing: still the aborted canary at sequence 3.
    env = service.get_canary(principal, "", "staging")
    assert env.sequence == 3 and _state(env) == "aborted"
    # An ended canary can be followed by a new one; a protected environment needs confirm.
    env, _ = service.start_canary(principal, project_ref="", deployment_id=candidate, environment_ref="staging",
                                  steps=[(5, 5)], thresholds=THRESHOLDS, min_replicas=None, max_replicas=None,
                                  expected_sequence=3, confirm=False, reason="", skip_gate=False)
    assert env.canary.candidate_weight == 5 and env.sequence == 4


def test_gated_environment_and_released_candidate(svc) -> None:  # type: ignore[no-untyped-def]
    service, principal = svc
    stable, candidate = _deploy(service, principal, "busybox:1"), _deploy(service, principal, "busybox:2")
    service.promote(principal, project_ref="", deployment_id=stable, target_environment_ref="staging",
                    min_replicas=None, max_replicas=None, scale_previous_to_zero=False, expected_sequence=None,
                    confirm=False, reason="")
    digest = "sha256:" + "a" * 64
    service.set_environment_gate(principal, "", "staging", experiment="smoke", threshold=0.9, dataset_digest=digest)

    def start() -> common_pb2.Environment:
        env, _ = service.start_canary(
            principal, project_ref="", deployment_id=candidate, environment_ref="staging", steps=[(10, 60)],
            thresholds=THRESHOLDS, min_replicas=1, max_replicas=1, expected_sequence=None, confirm=False,
            reason="", skip_gate=False)
        return env

    with pytest.raises(errors.FailedPrecondition) as caught:
        start()
    assert caught.value.reason == "GATE_NOT_PASSED"
    cases = [domain.CaseResult(name=f"c{i}", passed=i < 5, status=200, latency_ms=1.0) for i in range(10)]
    service.record_experiment_run(principal, "", name="smoke", deployment_id=candidate, dataset_digest=digest,
                                  cases=cases)
    with pytest.raises(errors.FailedPrecondition):
        start()  # 50% < 90%
    cases = [domain.CaseResult(name=f"c{i}", passed=True, status=200, latency_ms=1.0) for i in range(10)]
    service.record_experiment_run(principal, "", name="smoke", deployment_id=candidate, dataset_digest=digest,
                                  cases=cases)
    env = start()
    assert env.canary.candidate_weight == 10
    # Aborted: the candidate is no longer kept warm (min 0: the scheduler's idle windows stop it).
    service.advance_canary(SERVICE_PRINCIPAL, project_id=env.project_id, environment_id=env.id,
                           expected_sequence=env.sequence, step=0, action="abort", analysis="candidate 5xx 9%")
    (binding,) = service.list_bindings(principal, "", candidate, "staging")[0]
    assert binding.min_replicas == 0
