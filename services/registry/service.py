"""Use cases of the registry. Each write runs in one transaction that bumps
the registry revision, and publishes its changes to watchers after commit.

Callers pass the principal explicitly; authorisation is decided here.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from berth.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from berth.v1 import common_pb2
from services.common.auth import PROJECT_KEY_PREFIX, Principal, hash_key, new_key
from services.registry import convert, domain
from services.registry.changes import Change, ChangeHub
from services.registry.storage import (
    ApiKeyRow,
    BindingRow,
    DeploymentRow,
    EnvironmentRow,
    HistoryRow,
    MetaRow,
    ProjectRow,
    utcnow,
)


@dataclass
class _Tx:
    """One write transaction: its session, the revision it claims, and the
    rows it touched (published to watchers after commit)."""

    session: Session
    revision: int = 0
    environments: dict[str, EnvironmentRow] = field(default_factory=dict)
    bindings: dict[tuple[str, str], BindingRow] = field(default_factory=dict)

    def bump(self) -> int:
        if not self.revision:
            meta = self.session.execute(select(MetaRow).where(MetaRow.id == 1).with_for_update()).scalar_one()
            meta.revision += 1
            self.revision = meta.revision
        return self.revision

    def touch_environment(self, row: EnvironmentRow) -> None:
        row.revision = self.bump()
        self.environments[row.id] = row

    def touch_binding(self, row: BindingRow) -> None:
        row.revision = self.bump()
        self.bindings[(row.environment_id, row.deployment_id)] = row


@dataclass(frozen=True)
class MoveResult:
    environment: common_pb2.Environment
    entry: common_pb2.HistoryEntry
    deployment: common_pb2.Deployment


class RegistryService:
    def __init__(self, sessions: sessionmaker[Session], hub: ChangeHub, *, admin_key: str, service_token: str) -> None:
        self._sessions = sessions
        self._hub = hub
        self._admin_key = admin_key
        self._service_token = service_token
        # Serialises writers of this process; across processes the locked
        # meta row and the compare-and-swap do the same.
        self._write_lock = threading.Lock()

    # ---- transactions -------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with self._sessions() as session:
                yield session
        except OperationalError as exc:
            raise Unavailable("the registry database is unavailable; retry shortly") from exc

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        with self._write_lock:
            try:
                with self._sessions() as session:
                    tx = _Tx(session)
                    with session.begin():
                        yield tx
                        session.flush()
                        changes = self._changes(tx)
            except IntegrityError as exc:
                raise Aborted("a concurrent change won; re-read and retry") from exc
            except OperationalError as exc:
                raise Unavailable("the registry database is unavailable; retry shortly") from exc
            if changes:
                self._hub.publish(changes)

    def _changes(self, tx: _Tx) -> list[Change]:
        changes: list[Change] = []
        names = self._project_names(tx.session, {r.project_id for r in tx.environments.values()} | {
            r.project_id for r in tx.bindings.values()
        })
        for env in tx.environments.values():
            changes.append(Change(tx.revision, "environment", convert.environment(env, names[env.project_id])))
        for row in tx.bindings.values():
            env = tx.session.get(EnvironmentRow, row.environment_id)
            dep = tx.session.get(DeploymentRow, row.deployment_id)
            assert env is not None and dep is not None
            changes.append(Change(tx.revision, "binding", convert.binding(row, env, dep, names[row.project_id])))
        return changes

    @staticmethod
    def _project_names(session: Session, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = session.execute(select(ProjectRow.id, ProjectRow.name).where(ProjectRow.id.in_(ids)))
        return {row.id: row.name for row in rows}

    # ---- lookups ------------------------------------------------------

    def _project(self, session: Session, principal: Principal, ref: str) -> ProjectRow:
        if principal.admin:
            raise PermissionDenied(
                "the admin key only creates projects", hint="use the project's API key (BERTH_API_KEY)"
            )
        if not ref:
            if not principal.project_id:
                raise InvalidArgument("project is required")
            ref = principal.project_id
        if len(ref) > 80:
            raise InvalidArgument("project is longer than 80 characters")
        column = ProjectRow.id if ref.startswith(domain.PROJECT_ID_PREFIX) else ProjectRow.name
        row = session.execute(select(ProjectRow).where(column == ref)).scalar_one_or_none()
        if not principal.service and (row is None or row.id != principal.project_id):
            raise PermissionDenied(
                f"your API key belongs to project {principal.project_name!r}, not {ref!r}",
                hint="use that project's API key",
            )
        if row is None:
            raise NotFound(f"project {ref!r} not found")
        return row

    @staticmethod
    def _environment(session: Session, project: ProjectRow, ref: str, *, for_update: bool = False) -> EnvironmentRow:
        if not ref:
            raise InvalidArgument("environment is required")
        if len(ref) > 80:
            raise InvalidArgument("environment is longer than 80 characters")
        column = EnvironmentRow.id if ref.startswith(domain.ENVIRONMENT_ID_PREFIX) else EnvironmentRow.name
        query = select(EnvironmentRow).where(EnvironmentRow.project_id == project.id, column == ref)
        if for_update:
            query = query.with_for_update()
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            known = session.execute(
                select(EnvironmentRow.name).where(EnvironmentRow.project_id == project.id).order_by(EnvironmentRow.name)
            ).scalars()
            raise NotFound(
                f"environment {ref!r} not found in project {project.name!r}",
                hint="known environments: " + ", ".join(known),
            )
        return row

    @staticmethod
    def _deployment(session: Session, project: ProjectRow, deployment_id: str) -> DeploymentRow:
        if not deployment_id:
            raise InvalidArgument("deployment_id is required")
        row = session.get(DeploymentRow, deployment_id) if len(deployment_id) <= 80 else None
        if row is None or row.project_id != project.id:
            raise NotFound(f"deployment {deployment_id!r} not found in project {project.name!r}")
        return row

    # ---- projects and keys -------------------------------------------

    def authenticate(self, api_key: str) -> Principal:
        if not api_key:
            raise Unauthenticated("no API key given", hint="set BERTH_API_KEY")
        with self._read() as session:
            row = session.execute(
                select(ApiKeyRow, ProjectRow.name)
                .join(ProjectRow, ProjectRow.id == ApiKeyRow.project_id)
                .where(ApiKeyRow.key_hash == hash_key(api_key), ApiKeyRow.revoked_at.is_(None))
            ).one_or_none()
        if row is None:
            raise Unauthenticated("the API key is not valid (mistyped or revoked)", hint="check BERTH_API_KEY")
        key, project_name = row
        return Principal(project_id=key.project_id, project_name=project_name, key_name=key.name)

    def create_project(self, principal: Principal, name: str) -> tuple[common_pb2.Project, str]:
        if not principal.admin:
            raise PermissionDenied(
                "creating a project needs the platform's admin key",
                hint="run it on the machine where 'berth up' runs, or set BERTH_ADMIN_KEY",
            )
        domain.validate_name(name, field_name="project name")
        api_key = new_key(PROJECT_KEY_PREFIX)
        now = utcnow()
        try:
            with self._write() as tx:
                if tx.session.execute(select(ProjectRow.id).where(ProjectRow.name == name)).first():
                    raise AlreadyExists(f"project {name!r} already exists")
                project = ProjectRow(id=domain.new_id(domain.PROJECT_ID_PREFIX), name=name, created_at=now)
                tx.session.add(project)
                tx.session.flush()  # the key and environments reference it
                tx.session.add(
                    ApiKeyRow(
                        id=domain.new_id("key_"),
                        project_id=project.id,
                        name="default",
                        key_hash=hash_key(api_key),
                        prefix=api_key[: len(PROJECT_KEY_PREFIX) + 4],
                        created_at=now,
                    )
                )
                for env_name in domain.DEFAULT_ENVIRONMENTS:
                    env = EnvironmentRow(
                        id=domain.new_id(domain.ENVIRONMENT_ID_PREFIX),
                        project_id=project.id,
                        name=env_name,
                        protected=env_name in domain.PROTECTED_ENVIRONMENTS,
                        deployment_id=None,
                        sequence=0,
                        created_at=now,
                    )
                    tx.session.add(env)
                    tx.session.flush()
                    tx.touch_environment(env)
                result = convert.project(project)
        except Aborted:
            raise AlreadyExists(f"project {name!r} already exists") from None
        return result, api_key

    def get_project(self, principal: Principal, ref: str) -> common_pb2.Project:
        with self._read() as session:
            return convert.project(self._project(session, principal, ref))

    # ---- environments -------------------------------------------------

    def list_environments(self, principal: Principal, project_ref: str) -> list[common_pb2.Environment]:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            rows = session.execute(
                select(EnvironmentRow).where(EnvironmentRow.project_id == project.id).order_by(EnvironmentRow.created_at, EnvironmentRow.name)
            ).scalars()
            return [convert.environment(row, project.name) for row in rows]

    def create_environment(self, principal: Principal, project_ref: str, name: str) -> common_pb2.Environment:
        domain.validate_name(name, field_name="environment name")
        try:
            with self._write() as tx:
                project = self._project(tx.session, principal, project_ref)
                exists = tx.session.execute(
                    select(EnvironmentRow.id).where(EnvironmentRow.project_id == project.id, EnvironmentRow.name == name)
                ).first()
                if exists:
                    raise AlreadyExists(f"environment {name!r} already exists in project {project.name!r}")
                env = EnvironmentRow(
                    id=domain.new_id(domain.ENVIRONMENT_ID_PREFIX),
                    project_id=project.id,
                    name=name,
                    protected=name in domain.PROTECTED_ENVIRONMENTS,
                    deployment_id=None,
                    sequence=0,
                    created_at=utcnow(),
                )
                tx.session.add(env)
                tx.session.flush()
                tx.touch_environment(env)
                return convert.environment(env, project.name)
        except Aborted:
            raise AlreadyExists(f"environment {name!r} already exists") from None

    # ---- deployments and pointer moves -------------------------------

    def _move(
        self,
        tx: _Tx,
        principal: Principal,
        env: EnvironmentRow,
        dep: DeploymentRow,
        *,
        kind: domain.MoveKind,
        bounds: domain.ReplicaBounds,
        expected_sequence: int,
        reason: str,
        scale_previous_to_zero: bool = False,
    ) -> HistoryRow:
        """Moves ``env``'s pointer to ``dep`` with compare-and-swap on the
        sequence, appends the history entry and upserts the binding."""
        domain.check_expected_sequence(env.name, env.sequence, expected_sequence)
        previous_id = env.deployment_id or ""
        current = env.sequence
        revision = tx.bump()
        swapped = tx.session.execute(
            update(EnvironmentRow)
            .where(EnvironmentRow.id == env.id, EnvironmentRow.sequence == current)
            .values(sequence=current + 1, deployment_id=dep.id, revision=revision)
            .execution_options(synchronize_session=False)
        ).rowcount
        if swapped != 1:
            raise Aborted(f"environment {env.name!r} moved meanwhile", hint="re-read the history and retry")
        tx.session.refresh(env)
        entry = HistoryRow(
            environment_id=env.id,
            sequence=current + 1,
            kind=kind.value,
            deployment_id=dep.id,
            previous_deployment_id=previous_id,
            min_replicas=bounds.min_replicas,
            max_replicas=bounds.max_replicas,
            actor=principal.actor,
            reason=reason,
            created_at=utcnow(),
        )
        tx.session.add(entry)
        tx.touch_environment(env)

        binding = tx.session.get(BindingRow, (env.id, dep.id))
        if binding is None:
            binding = BindingRow(environment_id=env.id, deployment_id=dep.id, project_id=env.project_id)
            tx.session.add(binding)
        binding.min_replicas = bounds.min_replicas
        binding.max_replicas = bounds.max_replicas
        binding.state = domain.Lifecycle.ACTIVE.value
        binding.updated_at = utcnow()
        tx.session.flush()
        tx.touch_binding(binding)

        if previous_id and previous_id != dep.id:
            previous = tx.session.get(BindingRow, (env.id, previous_id))
            if previous is not None:
                if scale_previous_to_zero:
                    previous.min_replicas = 0
                    previous.updated_at = utcnow()
                tx.touch_binding(previous)  # its "serving" flag changed
        tx.session.flush()
        return entry

    def deploy(
        self,
        principal: Principal,
        *,
        project_ref: str,
        image: str,
        image_id: str,
        config: domain.WorkerConfig,
        environment_ref: str,
        min_replicas: int,
        max_replicas: int,
        expected_sequence: int,
        confirm: bool,
        reason: str,
    ) -> tuple[common_pb2.Deployment, MoveResult]:
        domain.validate_image(image, image_id)
        config = domain.validate_config(config)
        bounds = domain.resolve_bounds(min_replicas, max_replicas)
        domain.validate_reason(reason)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref or domain.DEFAULT_DEPLOY_ENVIRONMENT)
            domain.check_protected(env.name, env.protected, confirm)
            dep = DeploymentRow(
                id=domain.new_id(domain.DEPLOYMENT_ID_PREFIX),
                project_id=project.id,
                image=image,
                image_id=image_id or (image if domain.IMAGE_ID_PATTERN.match(image) else ""),
                config=config.to_json(),
                state=domain.Lifecycle.ACTIVE.value,
                created_at=utcnow(),
                created_by=principal.actor,
            )
            tx.session.add(dep)
            tx.session.flush()
            entry = self._move(
                tx, principal, env, dep, kind=domain.MoveKind.DEPLOY, bounds=bounds,
                expected_sequence=expected_sequence, reason=reason,
            )
            deployment = convert.deployment(dep)
            return deployment, MoveResult(convert.environment(env, project.name), convert.history_entry(entry), deployment)

    def promote(
        self,
        principal: Principal,
        *,
        project_ref: str,
        deployment_id: str,
        target_environment_ref: str,
        min_replicas: int,
        max_replicas: int,
        scale_previous_to_zero: bool,
        expected_sequence: int,
        confirm: bool,
        reason: str,
    ) -> MoveResult:
        domain.validate_reason(reason)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            env = self._environment(tx.session, project, target_environment_ref)
            if dep.state != domain.Lifecycle.ACTIVE.value:
                raise FailedPrecondition(
                    f"deployment {dep.id} is terminated and cannot be promoted",
                    hint=f"start it first: berth deployment start {dep.id}",
                )
            if env.deployment_id == dep.id:
                raise FailedPrecondition(f"deployment {dep.id} already serves environment {env.name!r}")
            domain.check_protected(env.name, env.protected, confirm)
            existing = tx.session.get(BindingRow, (env.id, dep.id))
            fallback = domain.ReplicaBounds(existing.min_replicas, existing.max_replicas) if existing else None
            if fallback is not None and fallback.min_replicas == 0:
                fallback = domain.ReplicaBounds(domain.DEFAULT_MIN_REPLICAS, fallback.max_replicas)
            bounds = domain.resolve_bounds(min_replicas, max_replicas, fallback=fallback)
            entry = self._move(
                tx, principal, env, dep, kind=domain.MoveKind.PROMOTE, bounds=bounds,
                expected_sequence=expected_sequence, reason=reason, scale_previous_to_zero=scale_previous_to_zero,
            )
            deployment = convert.deployment(dep)
            return MoveResult(convert.environment(env, project.name), convert.history_entry(entry), deployment)

    def rollback(
        self,
        principal: Principal,
        *,
        project_ref: str,
        environment_ref: str,
        to_deployment_id: str,
        expected_sequence: int,
        confirm: bool,
        reason: str,
    ) -> MoveResult:
        domain.validate_reason(reason)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref)
            history = list(
                tx.session.execute(
                    select(HistoryRow).where(HistoryRow.environment_id == env.id).order_by(HistoryRow.sequence.desc())
                ).scalars()
            )
            if to_deployment_id:
                if not any(h.deployment_id == to_deployment_id for h in history):
                    raise FailedPrecondition(
                        f"deployment {to_deployment_id!r} never served environment {env.name!r}",
                        hint=f"see: berth history --environment {env.name}",
                    )
                target_id = to_deployment_id
            else:
                target_id = history[0].previous_deployment_id if history else ""
                if not target_id:
                    raise FailedPrecondition(
                        f"environment {env.name!r} has no earlier deployment to roll back to"
                    )
            if target_id == env.deployment_id:
                raise FailedPrecondition(f"deployment {target_id} already serves environment {env.name!r}")
            domain.check_protected(env.name, env.protected, confirm)
            dep = self._deployment(tx.session, project, target_id)
            # Restore the bounds it last served with; a terminated or
            # scaled-to-zero deployment is started again.
            last_served = next(h for h in history if h.deployment_id == target_id)
            bounds = domain.ReplicaBounds(max(last_served.min_replicas, 1), max(last_served.max_replicas, 1))
            if dep.state != domain.Lifecycle.ACTIVE.value:
                dep.state = domain.Lifecycle.ACTIVE.value
                for other in tx.session.execute(
                    select(BindingRow).where(BindingRow.deployment_id == dep.id)
                ).scalars():
                    tx.touch_binding(other)  # their deployment's state changed
            entry = self._move(
                tx, principal, env, dep, kind=domain.MoveKind.ROLLBACK, bounds=bounds,
                expected_sequence=expected_sequence, reason=reason,
            )
            deployment = convert.deployment(dep)
            return MoveResult(convert.environment(env, project.name), convert.history_entry(entry), deployment)

    def get_deployment(self, principal: Principal, project_ref: str, deployment_id: str) -> common_pb2.Deployment:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            return convert.deployment(self._deployment(session, project, deployment_id))

    def list_deployments(
        self, principal: Principal, project_ref: str, environment_ref: str
    ) -> list[common_pb2.Deployment]:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            query = select(DeploymentRow).where(DeploymentRow.project_id == project.id)
            if environment_ref:
                env = self._environment(session, project, environment_ref)
                query = query.join(BindingRow, BindingRow.deployment_id == DeploymentRow.id).where(
                    BindingRow.environment_id == env.id
                )
            rows = session.execute(query.order_by(DeploymentRow.created_at.desc(), DeploymentRow.id)).scalars()
            return [convert.deployment(row) for row in rows]

    def list_history(self, principal: Principal, project_ref: str, environment_ref: str) -> list[common_pb2.HistoryEntry]:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            env = self._environment(session, project, environment_ref)
            rows = session.execute(
                select(HistoryRow).where(HistoryRow.environment_id == env.id).order_by(HistoryRow.sequence)
            ).scalars()
            return [convert.history_entry(row) for row in rows]

    def resolve_image(self, principal: Principal, deployment_id: str, image_id: str) -> common_pb2.Deployment:
        if not principal.service:
            raise PermissionDenied("only Berth's own services may record image ids")
        if not domain.IMAGE_ID_PATTERN.match(image_id):
            raise InvalidArgument(f"image_id {image_id!r} must be 'sha256:<64 hex digits>'")
        with self._write() as tx:
            dep = tx.session.get(DeploymentRow, deployment_id)
            if dep is None:
                raise NotFound(f"deployment {deployment_id!r} not found")
            if dep.image_id and dep.image_id != image_id:
                raise FailedPrecondition(f"deployment {deployment_id} already runs image {dep.image_id}; it is immutable")
            if not dep.image_id:
                dep.image_id = image_id
                for binding in tx.session.execute(
                    select(BindingRow).where(BindingRow.deployment_id == dep.id)
                ).scalars():
                    tx.touch_binding(binding)
            return convert.deployment(dep)

    # ---- watch --------------------------------------------------------

    def snapshot(self) -> tuple[int, list[Change]]:
        """Every environment and binding at one revision."""
        with self._read() as session, session.begin():
            revision = session.execute(select(MetaRow.revision).where(MetaRow.id == 1)).scalar_one()
            names = {row.id: row.name for row in session.execute(select(ProjectRow.id, ProjectRow.name))}
            envs = {row.id: row for row in session.execute(select(EnvironmentRow)).scalars()}
            deps = {row.id: row for row in session.execute(
                select(DeploymentRow).join(BindingRow, BindingRow.deployment_id == DeploymentRow.id)
            ).scalars()}
            changes = [Change(env.revision, "environment", convert.environment(env, names[env.project_id])) for env in envs.values()]
            for row in session.execute(select(BindingRow)).scalars():
                env = envs[row.environment_id]
                changes.append(
                    Change(row.revision, "binding", convert.binding(row, env, deps[row.deployment_id], names[row.project_id]))
                )
            return revision, changes
