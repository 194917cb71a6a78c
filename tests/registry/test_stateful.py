"""A Hypothesis state machine drives the registry service (deploy, promote,
rollback, create/delete environment, reopen the database) against a model
and checks after every step that:

- each environment points to at most one deployment, of its own project;
- history is append-only and gap-free (1..n), each entry's previous
  deployment is the entry before it, and its last entry is the pointer;
- rollback returns the previous pointer;
- every refusal is the one the model predicts, and records nothing.

It runs on SQLite and on PostgreSQL (a fresh database per example)."""
from __future__ import annotations

import itertools
import pathlib
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from berth import errors
from services.common.auth import ADMIN_PRINCIPAL
from services.registry import domain
from services.registry.changes import ChangeHub
from services.registry.service import RegistryService
from services.registry.storage import DeploymentRow, EnvironmentRow, HistoryRow, make_engine, migrate
from tests.registry.conftest import ADMIN_KEY, BACKENDS, SERVICE_TOKEN

PROJECTS = ("alpha", "beta")
ENV_NAMES = ("preview", "staging", "production", "qa")
STEPS = 60
steps_taken: list[int] = []


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self, new_database: Callable[[], str]) -> None:
        super().__init__()
        self.url = new_database()
        self.steps = 0
        self._open()
        self.principals = {}
        self.keys = {}
        for name in PROJECTS:
            _, key = self.service.create_project(ADMIN_PRINCIPAL, name)
            self.principals[name] = self.service.authenticate(key)
        # The model: per project, env name -> history [(kind, deployment, previous)]
        self.history: dict[str, dict[str, list[tuple[str, str, str]]]] = {
            p: {n: [] for n in domain.DEFAULT_ENVIRONMENTS} for p in PROJECTS
        }
        self.owner: dict[str, str] = {}  # deployment id -> project

    def _open(self) -> None:
        self.engine = make_engine(self.url)
        migrate(self.engine)
        self.service = RegistryService(
            sessionmaker(self.engine, expire_on_commit=False), ChangeHub(), admin_key=ADMIN_KEY, service_token=SERVICE_TOKEN
        )

    def teardown(self) -> None:
        steps_taken.append(self.steps)
        self.engine.dispose()

    # -- model helpers ------------------------------------------------------
    def pointer(self, project: str, env: str) -> str:
        entries = self.history[project].get(env) or []
        return entries[-1][1] if entries else ""

    def expect(self, error: type[errors.BerthError] | None, fn: Callable[[], object]) -> object:
        self.steps += 1
        if error is None:
            return fn()
        try:
            fn()
        except error:
            return None
        raise AssertionError(f"expected {error.__name__}")

    # -- rules ---------------------------------------------------------------
    @rule(project=st.sampled_from(PROJECTS), env=st.sampled_from(ENV_NAMES),
          confirm=st.booleans(), check=st.booleans())
    def deploy(self, project, env, confirm, check):  # type: ignore[no-untyped-def]
        envs = self.history[project]
        error = None
        if env not in envs:
            error = errors.NotFound
        elif env == "production" and not confirm:
            error = errors.FailedPrecondition
        result = self.expect(error, lambda: self.service.deploy(
            self.principals[project], project_ref="", image="app:1", image_id="", config=domain.WorkerConfig(),
            environment_ref=env, min_replicas=None, max_replicas=None,
            expected_sequence=len(envs.get(env, [])) if check else None, confirm=confirm, reason="",
        ))
        if result is None:
            return
        dep, move = result  # type: ignore[misc]
        envs[env].append(("deploy", dep.id, self.pointer(project, env)))
        self.owner[dep.id] = project
        assert move.entry.sequence == len(envs[env])

    @precondition(lambda self: self.owner)
    @rule(project=st.sampled_from(PROJECTS), env=st.sampled_from(ENV_NAMES), confirm=st.booleans(),
          stale=st.integers(0, 3), data=st.data())
    def promote(self, project, env, confirm, stale, data):  # type: ignore[no-untyped-def]
        """Mostly one of the project's own deployments; sometimes another
        project's (NOT_FOUND) or a stale expected sequence (ABORTED)."""
        own = sorted(d for d, p in self.owner.items() if p == project)
        dep = data.draw(st.sampled_from(own) if own and data.draw(st.integers(0, 4)) else st.sampled_from(sorted(self.owner)))
        stale = stale == 0
        envs = self.history[project]
        seq = len(envs.get(env, []))
        expected = seq - 1 if stale and seq else seq
        error = None
        if self.owner.get(dep) != project or env not in envs:
            error = errors.NotFound
        elif self.pointer(project, env) == dep or env == "production" and not confirm:
            error = errors.FailedPrecondition
        elif expected != seq:
            error = errors.Aborted
        result = self.expect(error, lambda: self.service.promote(
            self.principals[project], project_ref="", deployment_id=dep, target_environment_ref=env,
            min_replicas=None, max_replicas=None, scale_previous_to_zero=False, expected_sequence=expected,
            confirm=confirm, reason="",
        ))
        if result is not None:
            envs[env].append(("promote", dep, self.pointer(project, env)))

    @rule(project=st.sampled_from(PROJECTS), env=st.sampled_from(ENV_NAMES), confirm=st.booleans())
    def rollback(self, project, env, confirm):  # type: ignore[no-untyped-def]
        envs = self.history[project]
        previous = envs[env][-1][2] if envs.get(env) else ""
        error = None
        if env not in envs:
            error = errors.NotFound
        elif not previous or previous == self.pointer(project, env) or env == "production" and not confirm:
            error = errors.FailedPrecondition
        result = self.expect(error, lambda: self.service.rollback(
            self.principals[project], project_ref="", environment_ref=env, to_deployment_id="",
            expected_sequence=None, confirm=confirm, reason="",
        ))
        if result is not None:
            # Rollback returns the previous pointer.
            assert result.environment.deployment_id == previous  # type: ignore[attr-defined]
            envs[env].append(("rollback", previous, self.pointer(project, env)))

    @rule(project=st.sampled_from(PROJECTS), env=st.sampled_from(ENV_NAMES))
    def create_environment(self, project, env):  # type: ignore[no-untyped-def]
        envs = self.history[project]
        error = errors.AlreadyExists if env in envs else None
        if self.expect(error, lambda: self.service.create_environment(self.principals[project], "", env)) is not None:
            envs[env] = []

    @rule(project=st.sampled_from(PROJECTS), env=st.sampled_from(ENV_NAMES))
    def delete_environment(self, project, env):  # type: ignore[no-untyped-def]
        envs = self.history[project]
        error = None
        if env not in envs:
            error = errors.NotFound
        elif env == "production" or envs[env]:
            error = errors.FailedPrecondition
        if self.expect(error, lambda: self.service.delete_environment(self.principals[project], "", env)) is not None:
            del envs[env]

    @rule()
    def reopen(self) -> None:
        """A new service instance on the same database (a restart)."""
        self.steps += 1
        self.engine.dispose()
        self._open()

    # -- invariants ----------------------------------------------------------
    @invariant()
    def pointers_and_history_hold(self) -> None:
        with self.service._sessions() as session:
            deps = {d.id: d.project_id for d in session.execute(select(DeploymentRow)).scalars()}
            names = {p.project_id: name for name, p in self.principals.items()}
            envs = list(session.execute(select(EnvironmentRow)).scalars())
            seen: dict[str, set[str]] = {p: set() for p in PROJECTS}
            for env in envs:
                project = names[env.project_id]
                seen[project].add(env.name)
                if env.deployment_id:
                    assert deps[env.deployment_id] == env.project_id, "pointer to another project's deployment"
                rows = list(session.execute(
                    select(HistoryRow).where(HistoryRow.environment_id == env.id).order_by(HistoryRow.sequence)
                ).scalars())
                assert [r.sequence for r in rows] == list(range(1, len(rows) + 1)), "history has gaps"
                assert env.sequence == len(rows)
                assert (rows[-1].deployment_id if rows else None) == env.deployment_id, "last entry is not the pointer"
                assert env.previous_deployment_id == (rows[-1].previous_deployment_id if rows else "")
                for before, after in itertools.pairwise(rows):
                    assert after.previous_deployment_id == before.deployment_id
                # Append-only: exactly the model's history, in order.
                assert [(r.kind, r.deployment_id, r.previous_deployment_id) for r in rows] == self.history[project][env.name]
            for project in PROJECTS:
                assert seen[project] == set(self.history[project]), "environments differ from the model"


def database_factory(backend: str, request: pytest.FixtureRequest) -> Callable[[], str]:
    if backend == "sqlite":
        root = pathlib.Path(tempfile.mkdtemp(prefix="berth-stateful-"))
        counter = iter(range(1_000_000))
        return lambda: f"sqlite:///{root / f'registry-{next(counter)}.db'}"
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database


@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_state_machine(backend, request):
    steps_taken.clear()
    new_database = database_factory(backend, request)
    run_state_machine_as_test(
        lambda: RegistryMachine(new_database),
        settings=settings(
            max_examples=12 if backend == "sqlite" else 8,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"{backend}: {len(steps_taken)} runs, steps per run {sorted(steps_taken)}")
