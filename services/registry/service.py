"""Use cases of the registry. Each write runs in one transaction that bumps
the registry revision and records its watched changes in the ``changes``
table, the feed every registry process tails (services/registry/changes.py).

Callers pass the principal explicitly; authorisation is decided here.

Concurrency. Correctness rests on the database, not on this process:

- ``_Tx.bump`` increments the revision in the single ``registry_meta`` row
  (``UPDATE ... RETURNING``, which holds that row's lock until commit). Every
  transaction that changes watched state takes it, so revisions are handed
  out in commit order, across any number of processes: revision N+1 cannot
  be claimed before N's transaction has committed (or rolled back, and then
  N is claimed again), so a reader of the ``changes`` table never sees N+1
  without N. (A row lock rather than a transaction-level advisory lock: it
  works the same on SQLite, and the counter it protects is that same row, so
  no second object has to be kept in step with the lock.)
- A pointer move is a compare-and-swap: ``UPDATE environments SET
  sequence = s + 1 ... WHERE id = :id AND sequence = s``, where ``s`` is the
  sequence the move's decision was based on (and the caller's
  ``expected_sequence``, when given). Zero rows updated means another move
  won: the loser gets ABORTED and its transaction records nothing. The
  ``history`` primary key (environment, sequence) makes a duplicate entry
  impossible even then.
- Lock order, to stay free of deadlocks on PostgreSQL: a transaction calls
  ``bump()`` before it updates or deletes an existing row; only inserts of new
  rows may come before it.

On SQLite (one writer at a time anyway) writers of this process are also
serialised by ``_write_lock``, which spares them SQLite's busy-waiting; on
PostgreSQL there is no in-process lock around the transaction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, cast, delete, func, or_, select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
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
from berth.v1 import common_pb2, registry_pb2
from services.common import ids, paging
from services.common.auth import PROJECT_KEY_PREFIX, Principal, hash_key, new_key
from services.registry import canary as canaries
from services.registry import changes as feed
from services.registry import convert, domain
from services.registry.changes import Change, ChangeHub
from services.registry.storage import (
    ApiKeyRow,
    BindingRow,
    DeploymentRow,
    EnvironmentGateRow,
    EnvironmentRow,
    ExperimentRunRow,
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
    deleted_environments: dict[str, common_pb2.Environment] = field(default_factory=dict)
    # environment id -> the history entry its move appended
    moves: dict[str, HistoryRow] = field(default_factory=dict)
    revoked_keys: list[ApiKeyRow] = field(default_factory=list)
    # PostgreSQL: the change feed's NOTIFY channel. The revision's bump
    # queues the notification in the same statement (delivered at commit,
    # and only if the transaction commits): no round trip of its own.
    notify_channel: str = ""
    notified: bool = False

    def bump(self) -> int:
        if not self.revision:
            statement = update(MetaRow).where(MetaRow.id == 1).values(revision=MetaRow.revision + 1)
            if self.notify_channel:
                returning = statement.returning(
                    MetaRow.revision, func.pg_notify(self.notify_channel, cast(MetaRow.revision + 0, String))
                )
                self.revision = self.session.execute(
                    returning.execution_options(synchronize_session=False)
                ).scalars().one()
                self.notified = True
            else:
                self.revision = self.session.execute(
                    statement.returning(MetaRow.revision).execution_options(synchronize_session=False)
                ).scalar_one()
        return self.revision

    def touch_environment(self, row: EnvironmentRow, *, move: HistoryRow | None = None) -> None:
        row.revision = self.bump()
        self.environments[row.id] = row
        if move is not None:
            self.moves[row.id] = move

    def touch_binding(self, row: BindingRow) -> None:
        # updated_at marks the binding's last change, its serving flag
        # included: the scheduler's keep-warm window counts from it.
        row.revision = self.bump()
        row.updated_at = utcnow()
        self.bindings[(row.environment_id, row.deployment_id)] = row


def _rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE matched (a CursorResult; typed loosely by
    SQLAlchemy's stubs)."""
    return int(result.rowcount)


def read_revision(sessions: sessionmaker[Session]) -> int:
    try:
        with sessions() as session:
            return session.execute(select(MetaRow.revision).where(MetaRow.id == 1)).scalar_one()
    except OperationalError as exc:
        raise Unavailable("the registry database is unavailable; retry shortly") from exc


def key_prefix(api_key: str) -> str:
    """What a listing shows of a key: the recognisable prefix and 4 more
    characters (24 bits of 256), never enough to use it."""
    return api_key[: len(PROJECT_KEY_PREFIX) + 4]


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
        bind = sessions.kw.get("bind")
        self.dialect = bind.dialect.name if bind is not None else "sqlite"
        # SQLite only: serialises this process's writers (see module doc).
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        )

    # ---- transactions -------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with self._sessions() as session:
                yield session
        except OperationalError as exc:
            raise Unavailable("the registry database is unavailable; retry shortly") from exc
        except DataError as exc:
            raise InvalidArgument("a value in the request cannot be stored or compared (check for control characters)") from exc

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        with self._write_lock:
            try:
                with self._sessions() as session:
                    tx = _Tx(session, notify_channel=feed.NOTIFY_CHANNEL if self.dialect == "postgresql" else "")
                    session.begin()
                    try:
                        yield tx
                        session.flush()
                        changes = self._changes(tx)
                        if changes:
                            session.add_all(feed.to_rows(changes))
                            session.flush()
                            if self.dialect == "postgresql" and not tx.notified:
                                # Delivered by PostgreSQL at commit, and only
                                # if the transaction commits.
                                session.execute(
                                    text("SELECT pg_notify(:channel, :revision)"),
                                    {"channel": feed.NOTIFY_CHANNEL, "revision": str(tx.revision)},
                                )
                        session.commit()
                    except BaseException:
                        session.rollback()
                        raise
                    if changes:
                        self._hub.committed(tx.revision)  # wakes this process's tailer at once
            except IntegrityError as exc:
                raise Aborted("a concurrent change won; re-read and retry") from exc
            except OperationalError as exc:
                raise Unavailable("the registry database is unavailable; retry shortly") from exc
            except DataError as exc:
                raise InvalidArgument(
                    "a value in the request cannot be stored (check for control characters)"
                ) from exc

    def current_revision(self) -> int:
        return read_revision(self._sessions)

    def _changes(self, tx: _Tx) -> list[Change]:
        changes: list[Change] = []
        names = self._project_names(tx.session, {r.project_id for r in tx.environments.values()} | {
            r.project_id for r in tx.bindings.values()
        })
        for env in tx.environments.values():
            move = tx.moves.get(env.id)
            changes.append(Change(
                tx.revision, feed.ENVIRONMENT, convert.environment(env, names[env.project_id]), env.project_id,
                feed.MOVED if move is not None else feed.CREATED,
                convert.history_entry(move) if move is not None else None,
            ))
        for row in tx.bindings.values():
            bound = tx.session.get(EnvironmentRow, row.environment_id)
            dep = tx.session.get(DeploymentRow, row.deployment_id)
            assert bound is not None and dep is not None
            changes.append(Change(
                tx.revision, feed.BINDING, convert.binding(row, bound, dep, names[row.project_id]), row.project_id
            ))
        for env_id, view in tx.deleted_environments.items():
            changes.append(Change(tx.revision, feed.ENVIRONMENT_DELETED, env_id, view.project_id, detail=view))
        for key in tx.revoked_keys:
            changes.append(Change(tx.revision, feed.KEY_REVOKED, key.id, key.project_id))
        return changes

    @staticmethod
    def _project_names(session: Session, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        names: dict[str, str] = {}
        for project_id in ids:  # the transaction has usually loaded its project already: no query then
            loaded = session.identity_map.get(session.identity_key(ProjectRow, project_id))
            if loaded is not None:
                names[project_id] = loaded.name
        missing = ids - set(names)
        if missing:
            rows = session.execute(select(ProjectRow.id, ProjectRow.name).where(ProjectRow.id.in_(missing)))
            names.update({row.id: row.name for row in rows})
        return names

    # ---- lookups ------------------------------------------------------

    def _project(self, session: Session, principal: Principal, ref: str) -> ProjectRow:
        if principal.admin:
            raise PermissionDenied(
                "the admin key only creates projects", hint="use the project's API key (BERTH_API_KEY)",
                reason="ADMIN_KEY_NOT_ALLOWED",
            )
        if not ref:
            if not principal.project_id:
                raise InvalidArgument("project is required")
            ref = principal.project_id
        domain.validate_reference(ref, field_name="project", what="project")
        column = ProjectRow.id if ref.startswith(domain.PROJECT_ID_PREFIX) else ProjectRow.name
        row = session.execute(select(ProjectRow).where(column == ref)).scalar_one_or_none()
        if not principal.service and (row is None or row.id != principal.project_id):
            raise PermissionDenied(
                f"your API key belongs to project {principal.project_name!r}, not {ref!r}",
                hint="use that project's API key",
                reason="WRONG_PROJECT", metadata={"key_project": principal.project_name},
            )
        if row is None:
            raise NotFound(f"project {ref!r} not found", resource_type="project", resource_name=ref)
        return row

    @staticmethod
    def _environment(session: Session, project: ProjectRow, ref: str) -> EnvironmentRow:
        domain.validate_reference(ref, field_name="environment", what="environment")
        column = EnvironmentRow.id if ref.startswith(domain.ENVIRONMENT_ID_PREFIX) else EnvironmentRow.name
        query = select(EnvironmentRow).where(EnvironmentRow.project_id == project.id, column == ref)
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            known = session.execute(
                select(EnvironmentRow.name).where(EnvironmentRow.project_id == project.id).order_by(EnvironmentRow.name)
            ).scalars()
            raise NotFound(
                f"environment {ref!r} not found in project {project.name!r}",
                hint="known environments: " + ", ".join(known),
                resource_type="environment", resource_name=ref,
            )
        return row

    @staticmethod
    def _deployment(session: Session, project: ProjectRow, deployment_id: str) -> DeploymentRow:
        if not deployment_id:
            raise InvalidArgument("deployment_id is required")
        # Deployment ids are only ever made here: anything else cannot exist,
        # and is the caller's error (INVALID_ID), not an unknown id.
        ids.validate_deployment_id(deployment_id)
        row = session.get(DeploymentRow, deployment_id)
        if row is None or row.project_id != project.id:
            raise NotFound(
                f"deployment {deployment_id!r} not found in project {project.name!r}",
                resource_type="deployment", resource_name=deployment_id,
            )
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
            raise Unauthenticated(
                "the API key is not valid (mistyped or revoked)", hint="check BERTH_API_KEY", reason="API_KEY_INVALID"
            )
        key, project_name = row
        return Principal(project_id=key.project_id, project_name=project_name, key_name=key.name)

    def create_project(self, principal: Principal, name: str) -> tuple[common_pb2.Project, str]:
        if not principal.admin:
            raise PermissionDenied(
                "creating a project needs the platform's admin key",
                hint="run it on the machine where 'berth up' runs, or set BERTH_ADMIN_KEY",
                reason="ADMIN_KEY_REQUIRED",
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
                        prefix=key_prefix(api_key),
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

    @staticmethod
    def _oldest_first_page(
        session: Session, query: Any, created: Any, unique: Any, scope: str, page_size: int, page_token: str
    ) -> tuple[list[Any], str]:
        """One page of ``query`` ordered by (created, unique) ascending, read
        with a keyset after the token's last pair."""
        size = paging.page_size(page_size)
        after = paging.decode_token(page_token, scope)
        if after is not None:
            try:
                created_at, last = datetime.fromisoformat(after[0]), str(after[1])
            except (IndexError, TypeError, ValueError):
                raise paging.bad_token() from None
            query = query.where(or_(created > created_at, and_(created == created_at, unique > last)))
        rows = session.execute(query.order_by(created, unique).limit(size + 1)).scalars().all()
        page, more = paging.split(rows, size)
        if not more:
            return list(page), ""
        last_row = page[-1]
        return list(page), paging.encode_token(
            scope, [getattr(last_row, created.key).isoformat(), getattr(last_row, unique.key)]
        )

    def list_environments(
        self, principal: Principal, project_ref: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[common_pb2.Environment], str]:
        """Oldest first (created_at, then name: unique in a project)."""
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            rows, token = self._oldest_first_page(
                session, select(EnvironmentRow).where(EnvironmentRow.project_id == project.id),
                EnvironmentRow.created_at, EnvironmentRow.name, f"ListEnvironments/{project.id}", page_size, page_token,
            )
            return [convert.environment(row, project.name) for row in rows], token

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

    def delete_environment(
        self,
        principal: Principal,
        project_ref: str,
        environment_ref: str,
        *,
        force: bool = False,
        confirm: bool = False,
    ) -> common_pb2.Environment:
        """Deletes an environment nothing points to; with ``force`` also one
        that points somewhere, with its bindings and history, in one
        transaction (a protected environment needs ``confirm`` too). Watchers
        get ``environment_deleted`` (they drop the environment and any
        binding of it)."""
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref)
            if env.protected and not force:
                raise FailedPrecondition(
                    f"environment {env.name!r} is protected and cannot be deleted",
                    hint=f"berth env delete {env.name} --force --yes deletes it with its bindings and history",
                    reason="PROTECTED_ENVIRONMENT", resource_name=env.name, field="force",
                )
            if env.protected and not confirm:
                raise FailedPrecondition(
                    f"environment {env.name!r} is protected: deleting it needs confirmation",
                    hint="pass --yes (CLI) or \"confirm\": true (API)",
                    reason="PROTECTED_ENVIRONMENT", resource_name=env.name, field="confirm",
                )
            if env.deployment_id and not force:
                raise FailedPrecondition(
                    f"environment {env.name!r} points to deployment {env.deployment_id}; "
                    "only an environment nothing points to can be deleted without --force",
                    hint=f"berth env delete {env.name} --force (\"force\": true in the API) deletes it "
                    "with its bindings and history",
                    reason="ENVIRONMENT_IN_USE", resource_name=env.name, field="force",
                    metadata={"deployment_id": env.deployment_id},
                )
            result = convert.environment(env, project.name)
            tx.bump()
            tx.session.execute(  # its gate goes with it (rolled back if the delete loses)
                delete(EnvironmentGateRow)
                .where(EnvironmentGateRow.environment_id == env.id)
                .execution_options(synchronize_session=False)
            )
            if force:
                tx.session.execute(
                    delete(BindingRow)
                    .where(BindingRow.environment_id == env.id)
                    .execution_options(synchronize_session=False)
                )
                tx.session.execute(
                    delete(HistoryRow)
                    .where(HistoryRow.environment_id == env.id)
                    .execution_options(synchronize_session=False)
                )
                # Compare-and-swap on what was read: a pointer move since
                # then makes this delete lose (and roll back).
                deleted = _rowcount(tx.session.execute(
                    delete(EnvironmentRow)
                    .where(
                        EnvironmentRow.id == env.id,
                        EnvironmentRow.sequence == env.sequence,
                        EnvironmentRow.revision == env.revision,
                    )
                    .execution_options(synchronize_session=False)
                ))
                if deleted != 1:
                    raise Aborted(f"environment {env.name!r} changed meanwhile; re-read and retry")
            else:
                deleted = _rowcount(tx.session.execute(
                    delete(EnvironmentRow)
                    .where(
                        EnvironmentRow.id == env.id,
                        EnvironmentRow.sequence == 0,
                        EnvironmentRow.deployment_id.is_(None),
                    )
                    .execution_options(synchronize_session=False)
                ))
                if deleted != 1:
                    still = tx.session.execute(
                        select(EnvironmentRow.deployment_id).where(EnvironmentRow.id == env.id)
                    ).one_or_none()
                    if still is None:
                        raise NotFound(f"environment {env.name!r} was deleted meanwhile",
                                       resource_type="environment", resource_name=env.name)
                    raise FailedPrecondition(
                        f"environment {env.name!r} was pointed at deployment {still[0]} meanwhile; "
                        "it cannot be deleted without --force",
                        reason="ENVIRONMENT_IN_USE", resource_name=env.name, field="force",
                    )
            tx.session.expunge(env)
            tx.deleted_environments[env.id] = result
            return result

    # ---- API keys -----------------------------------------------------

    def create_api_key(self, principal: Principal, project_ref: str, name: str) -> tuple[common_pb2.ApiKeyInfo, str]:
        domain.validate_name(name, field_name="key name")
        api_key = new_key(PROJECT_KEY_PREFIX)
        try:
            with self._write() as tx:
                project = self._project(tx.session, principal, project_ref)
                self._check_key_name_free(tx.session, project, name)
                row = ApiKeyRow(
                    id=domain.new_id(domain.API_KEY_ID_PREFIX),
                    project_id=project.id,
                    name=name,
                    key_hash=hash_key(api_key),
                    prefix=key_prefix(api_key),
                    created_at=utcnow(),
                )
                tx.session.add(row)
                tx.session.flush()
                return convert.api_key(row), api_key
        except Aborted:  # the partial unique index: a concurrent create won
            raise AlreadyExists(f"an active API key named {name!r} already exists") from None

    @staticmethod
    def _check_key_name_free(session: Session, project: ProjectRow, name: str) -> None:
        taken = session.execute(
            select(ApiKeyRow.id).where(
                ApiKeyRow.project_id == project.id, ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None)
            )
        ).first()
        if taken:
            raise AlreadyExists(
                f"an active API key named {name!r} already exists in project {project.name!r}",
                hint="choose another name, or revoke that key first",
            )

    def list_api_keys(
        self, principal: Principal, project_ref: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[common_pb2.ApiKeyInfo], str]:
        """Oldest first (created_at, then id)."""
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            rows, token = self._oldest_first_page(
                session, select(ApiKeyRow).where(ApiKeyRow.project_id == project.id),
                ApiKeyRow.created_at, ApiKeyRow.id, f"ListApiKeys/{project.id}", page_size, page_token,
            )
            return [convert.api_key(row) for row in rows], token

    def revoke_api_key(self, principal: Principal, project_ref: str, key_ref: str) -> common_pb2.ApiKeyInfo:
        """Revokes a key by id or name. It stops working everywhere once
        this commits: the other services ask the registry on every call and
        cache no answer (services/common/remote.py). The last
        active key of a project cannot be revoked: the admin key cannot make
        a new one, so the project would be locked out."""
        if not key_ref:
            raise InvalidArgument("key is required: give the key's id (key_...) or name")
        domain.validate_reference(key_ref, field_name="key", what="API key")
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            query = select(ApiKeyRow).where(ApiKeyRow.project_id == project.id)
            if key_ref.startswith(domain.API_KEY_ID_PREFIX):
                query = query.where(ApiKeyRow.id == key_ref)
            else:
                query = query.where(ApiKeyRow.name == key_ref, ApiKeyRow.revoked_at.is_(None))
            row = tx.session.execute(query).scalar_one_or_none()
            if row is None:
                raise NotFound(
                    f"no active API key {key_ref!r} in project {project.name!r}",
                    hint="see the keys with ListApiKeys",
                    resource_type="api_key", resource_name=key_ref,
                )
            if row.revoked_at is not None:
                return convert.api_key(row)  # already revoked: nothing to do
            # Lock the project's active keys so two revocations cannot both
            # see "another key is left" and lock the project out.
            active = tx.session.execute(
                select(ApiKeyRow.id)
                .where(ApiKeyRow.project_id == project.id, ApiKeyRow.revoked_at.is_(None))
                .with_for_update()
            ).scalars().all()
            if row.id not in active:
                return convert.api_key(tx.session.get(ApiKeyRow, row.id, populate_existing=True))  # type: ignore[arg-type]
            if len(active) <= 1:
                raise FailedPrecondition(
                    f"API key {row.name!r} is the last active key of project {project.name!r}; "
                    "revoking it would lock the project out",
                    hint="create another key first",
                    reason="LAST_ACTIVE_KEY", resource_name=row.name,
                )
            tx.bump()  # watch streams held with this key end (WatchEnvironments)
            row.revoked_at = utcnow()
            tx.session.flush()
            tx.revoked_keys.append(row)
            return convert.api_key(row)

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
        expected_sequence: int | None,
        reason: str,
        scale_previous_to_zero: bool = False,
        idle: domain.IdleWindows = domain.NO_IDLE_CHANGE,
        bindings: Mapping[str, BindingRow | None] | None = None,
        canary: dict[str, Any] | None = None,
    ) -> HistoryRow:
        """Moves ``env``'s pointer to ``dep`` with compare-and-swap on the
        sequence ``env`` was read at, appends the history entry and upserts
        the binding. Raises Aborted, recording nothing, if another move won.
        ``bindings``: the environment's bindings of ``dep`` and of the
        deployment serving now, by deployment id (None: it has none), when
        the caller loaded them already."""
        domain.check_expected_sequence(env.name, env.sequence, expected_sequence)
        previous_id = env.deployment_id or ""
        current = env.sequence
        revision = tx.bump()
        # The row as it is after the swap comes back with it (RETURNING): no
        # second round trip to re-read it.
        swapped = tx.session.execute(
            update(EnvironmentRow)
            .where(EnvironmentRow.id == env.id, EnvironmentRow.sequence == current)
            .values(
                sequence=current + 1, deployment_id=dep.id, previous_deployment_id=previous_id, revision=revision,
                # A move ends any canary (a canary's own end records it as promoted).
                canary=canary,
            )
            .returning(EnvironmentRow)
            .execution_options(synchronize_session=False, populate_existing=True)
        ).scalar_one_or_none()
        if swapped is None:
            now = tx.session.execute(
                select(EnvironmentRow.sequence).where(EnvironmentRow.id == env.id)
            ).scalar_one_or_none()
            if now is None:
                raise NotFound(
                    f"environment {env.name!r} was deleted meanwhile", resource_type="environment", resource_name=env.name
                )
            raise Aborted(
                f"environment {env.name!r} moved meanwhile: expected sequence {current}, it is at {now}",
                hint="re-read the history and retry",
                reason="SEQUENCE_CONFLICT",
                metadata={"environment": env.name, "current_sequence": str(now), "expected_sequence": str(current)},
            )
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
        tx.touch_environment(env, move=entry)

        binding = bindings[dep.id] if bindings is not None else tx.session.get(BindingRow, (env.id, dep.id))
        if binding is None:
            binding = BindingRow(environment_id=env.id, deployment_id=dep.id, project_id=env.project_id)
            tx.session.add(binding)
        binding.min_replicas = bounds.min_replicas
        binding.max_replicas = bounds.max_replicas
        _set_idle(binding, idle)
        binding.state = domain.Lifecycle.ACTIVE.value
        tx.touch_binding(binding)  # (sets updated_at): one INSERT or UPDATE at the flush below

        if previous_id and previous_id != dep.id:
            if bindings is not None and previous_id in bindings:
                previous = bindings[previous_id]
            else:
                previous = tx.session.get(BindingRow, (env.id, previous_id))
            if previous is not None:
                if scale_previous_to_zero:
                    previous.min_replicas = 0
                tx.touch_binding(previous)  # its "serving" flag changed (sets updated_at)
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
        min_replicas: int | None,
        max_replicas: int | None,
        expected_sequence: int | None,
        confirm: bool,
        reason: str,
        idle: domain.IdleWindows = domain.NO_IDLE_CHANGE,
    ) -> tuple[common_pb2.Deployment, MoveResult]:
        domain.validate_image(image, image_id)
        config = domain.validate_config(config)
        bounds = domain.resolve_bounds(min_replicas, max_replicas)
        idle = domain.validate_idle(idle.pause, idle.stop)
        domain.validate_reason(reason)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref or domain.DEFAULT_DEPLOY_ENVIRONMENT)
            self._refuse_gated_deploy(tx.session, env)
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
                expected_sequence=expected_sequence, reason=reason, idle=idle,
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
        min_replicas: int | None,
        max_replicas: int | None,
        scale_previous_to_zero: bool,
        expected_sequence: int | None,
        confirm: bool,
        reason: str,
        skip_gate: bool = False,
        idle: domain.IdleWindows = domain.NO_IDLE_CHANGE,
    ) -> MoveResult:
        domain.validate_reason(reason)
        idle = domain.validate_idle(idle.pause, idle.stop)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            env = self._environment(tx.session, project, target_environment_ref)
            if dep.state != domain.Lifecycle.ACTIVE.value:
                raise FailedPrecondition(
                    f"deployment {dep.id} is terminated and cannot be promoted",
                    hint=f"start it first: berth deployment start {dep.id}",
                    reason="DEPLOYMENT_TERMINATED", resource_name=dep.id, metadata={"deployment_id": dep.id},
                )
            if env.deployment_id == dep.id:
                raise FailedPrecondition(
                    f"deployment {dep.id} already serves environment {env.name!r}",
                    reason="ALREADY_SERVING", resource_name=env.name,
                )
            reason = self._check_gate(tx.session, env, dep, skip_gate=skip_gate, reason=reason)
            domain.check_protected(env.name, env.protected, confirm)
            # This deployment's binding there and the serving one's, with its
            # deployment (the move touches and publishes both), in one query.
            # (Held here until the commit: the session's identity map only
            # keeps what is referenced, and the change feed reads them.)
            bindings: dict[str, BindingRow | None] = {dep.id: None, env.deployment_id or dep.id: None}
            prefetched = tx.session.execute(
                select(BindingRow, DeploymentRow)
                .join(DeploymentRow, DeploymentRow.id == BindingRow.deployment_id)
                .where(BindingRow.environment_id == env.id, BindingRow.deployment_id.in_(set(bindings)))
            ).all()
            for row, _ in prefetched:
                bindings[row.deployment_id] = row
            existing = bindings[dep.id]
            fallback = domain.ReplicaBounds(existing.min_replicas, existing.max_replicas) if existing else None
            if fallback is not None and fallback.min_replicas == 0:
                fallback = domain.ReplicaBounds(domain.DEFAULT_MIN_REPLICAS, fallback.max_replicas)
            bounds = domain.resolve_bounds(min_replicas, max_replicas, fallback=fallback)
            entry = self._move(
                tx, principal, env, dep, kind=domain.MoveKind.PROMOTE, bounds=bounds,
                expected_sequence=expected_sequence, reason=reason, scale_previous_to_zero=scale_previous_to_zero,
                idle=idle, bindings=bindings,
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
        expected_sequence: int | None,
        confirm: bool,
        reason: str,
    ) -> MoveResult:
        domain.validate_reason(reason)
        if to_deployment_id:
            domain.validate_reference(to_deployment_id, field_name="to_deployment_id", what="deployment")
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
                        reason="NOT_IN_HISTORY", field="to_deployment_id", resource_name=env.name,
                    )
                target_id = to_deployment_id
            else:
                target_id = history[0].previous_deployment_id if history else ""
                if not target_id:
                    raise FailedPrecondition(
                        f"environment {env.name!r} has no earlier deployment to roll back to",
                        reason="NO_EARLIER_DEPLOYMENT", resource_name=env.name,
                    )
            if target_id == env.deployment_id:
                raise FailedPrecondition(
                    f"deployment {target_id} already serves environment {env.name!r}",
                    reason="ALREADY_SERVING", resource_name=env.name,
                )
            domain.check_protected(env.name, env.protected, confirm)
            dep = self._deployment(tx.session, project, target_id)
            # Restore the bounds it last served with; a terminated or
            # scaled-to-zero deployment is started again.
            last_served = next(h for h in history if h.deployment_id == target_id)
            bounds = domain.ReplicaBounds(max(last_served.min_replicas, 1), max(last_served.max_replicas, 1))
            entry = self._move(
                tx, principal, env, dep, kind=domain.MoveKind.ROLLBACK, bounds=bounds,
                expected_sequence=expected_sequence, reason=reason,
            )
            if dep.state != domain.Lifecycle.ACTIVE.value:
                dep.state = domain.Lifecycle.ACTIVE.value
                for other in tx.session.execute(
                    select(BindingRow).where(BindingRow.deployment_id == dep.id)
                ).scalars():
                    tx.touch_binding(other)  # their deployment's state changed
            deployment = convert.deployment(dep)
            return MoveResult(convert.environment(env, project.name), convert.history_entry(entry), deployment)

    # ---- bindings (desired state the scheduler converges on) ---------

    def list_bindings(
        self, principal: Principal, project_ref: str, deployment_id: str, environment_ref: str, *,
        page_size: int = 0, page_token: str = "",
    ) -> tuple[list[common_pb2.Binding], str]:
        """By environment name, then the deployment's (created_at, id): one
        page with a keyset after the token's last triple."""
        size = paging.page_size(page_size)
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            query = select(BindingRow, EnvironmentRow, DeploymentRow).join(
                EnvironmentRow, EnvironmentRow.id == BindingRow.environment_id
            ).join(DeploymentRow, DeploymentRow.id == BindingRow.deployment_id).where(
                BindingRow.project_id == project.id
            )
            dep_filter = env_filter = ""
            if deployment_id:
                dep_filter = self._deployment(session, project, deployment_id).id
                query = query.where(BindingRow.deployment_id == dep_filter)
            if environment_ref:
                env_filter = self._environment(session, project, environment_ref).id
                query = query.where(BindingRow.environment_id == env_filter)
            scope = f"ListBindings/{project.id}/{dep_filter}/{env_filter}"
            after = paging.decode_token(page_token, scope)
            if after is not None:
                try:
                    name, created_at, last_id = str(after[0]), datetime.fromisoformat(after[1]), str(after[2])
                except (IndexError, TypeError, ValueError):
                    raise paging.bad_token() from None
                query = query.where(or_(
                    EnvironmentRow.name > name,
                    and_(EnvironmentRow.name == name, DeploymentRow.created_at > created_at),
                    and_(EnvironmentRow.name == name, DeploymentRow.created_at == created_at, DeploymentRow.id > last_id),
                ))
            rows = session.execute(
                query.order_by(EnvironmentRow.name, DeploymentRow.created_at, DeploymentRow.id).limit(size + 1)
            ).all()
            page, more = paging.split(rows, size)
            token = ""
            if more:
                _, env, dep = page[-1]
                token = paging.encode_token(scope, [env.name, dep.created_at.isoformat(), dep.id])
            return [convert.binding(b, env, dep, project.name) for b, env, dep in page], token

    def _binding(
        self, session: Session, project: ProjectRow, dep: DeploymentRow, environment_ref: str
    ) -> tuple[BindingRow, EnvironmentRow]:
        """The binding of ``dep`` in the given environment; with none given,
        its only binding."""
        rows = session.execute(
            select(BindingRow, EnvironmentRow)
            .join(EnvironmentRow, EnvironmentRow.id == BindingRow.environment_id)
            .where(BindingRow.deployment_id == dep.id)
            .order_by(EnvironmentRow.name)
        ).all()
        if environment_ref:
            env = self._environment(session, project, environment_ref)
            for binding, bound_env in rows:
                if bound_env.id == env.id:
                    return binding, bound_env
            raise NotFound(
                f"deployment {dep.id} is not bound to environment {env.name!r}",
                hint="bound to: " + (", ".join(e.name for _, e in rows) or "no environment"),
                resource_type="binding", resource_name=f"{env.name}/{dep.id}",
            )
        if not rows:
            raise NotFound(
                f"deployment {dep.id} is not bound to any environment", resource_type="binding", resource_name=dep.id
            )
        if len(rows) > 1:
            raise InvalidArgument(
                f"deployment {dep.id} is bound to several environments "
                f"({', '.join(e.name for _, e in rows)}): environment is required",
                hint="pass --environment NAME",
                field="environment",
            )
        return rows[0][0], rows[0][1]

    @staticmethod
    def _require_active(dep: DeploymentRow) -> None:
        if dep.state != domain.Lifecycle.ACTIVE.value:
            raise FailedPrecondition(
                f"deployment {dep.id} is terminated; its replica bounds cannot change",
                hint=f"start it first: berth deployment start {dep.id}",
                reason="DEPLOYMENT_TERMINATED", resource_name=dep.id, metadata={"deployment_id": dep.id},
            )

    def _set_bounds(
        self, tx: _Tx, project: ProjectRow, binding: BindingRow, env: EnvironmentRow, dep: DeploymentRow,
        bounds: domain.ReplicaBounds, idle: domain.IdleWindows = domain.NO_IDLE_CHANGE,
    ) -> common_pb2.Binding:
        idle_changed = (idle.pause is not None and idle.pause != binding.idle_pause_seconds) or (
            idle.stop is not None and idle.stop != binding.idle_stop_seconds
        )
        if (binding.min_replicas, binding.max_replicas) != (bounds.min_replicas, bounds.max_replicas) or idle_changed:
            tx.bump()
            binding.min_replicas = bounds.min_replicas
            binding.max_replicas = bounds.max_replicas
            _set_idle(binding, idle)
            binding.updated_at = utcnow()
            tx.session.flush()
            tx.touch_binding(binding)
        return convert.binding(binding, env, dep, project.name)

    def scale_binding(
        self, principal: Principal, project_ref: str, deployment_id: str, environment_ref: str,
        min_replicas: int | None, max_replicas: int | None,
        idle: domain.IdleWindows = domain.NO_IDLE_CHANGE,
    ) -> common_pb2.Binding:
        idle = domain.validate_idle(idle.pause, idle.stop)
        bounds_given = min_replicas is not None or max_replicas is not None
        if bounds_given or (idle.pause is None and idle.stop is None):
            # What can be checked before any lookup (against the widest bounds), then against the binding's own.
            domain.validate_scale(min_replicas, max_replicas, domain.ReplicaBounds(0, domain.MAX_REPLICAS_LIMIT))
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            binding, env = self._binding(tx.session, project, dep, environment_ref)
            self._require_active(dep)
            current = domain.ReplicaBounds(binding.min_replicas, binding.max_replicas)
            bounds = domain.validate_scale(min_replicas, max_replicas, current) if bounds_given else current
            return self._set_bounds(tx, project, binding, env, dep, bounds, idle)

    def adjust_replicas(
        self, principal: Principal, project_ref: str, deployment_id: str, environment_ref: str, delta: int
    ) -> common_pb2.Binding:
        domain.adjust_bounds(domain.ReplicaBounds(0, 1), delta)  # validates delta before any lookup
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            binding, env = self._binding(tx.session, project, dep, environment_ref)
            self._require_active(dep)
            bounds = domain.adjust_bounds(domain.ReplicaBounds(binding.min_replicas, binding.max_replicas), delta)
            return self._set_bounds(tx, project, binding, env, dep, bounds)

    def terminate_deployment(self, principal: Principal, project_ref: str, deployment_id: str) -> common_pb2.Deployment:
        """Every binding of the deployment goes to 0 replicas; the record, its
        image and its history stay. Idempotent."""
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            bindings = list(tx.session.execute(select(BindingRow).where(BindingRow.deployment_id == dep.id)).scalars())
            terminated = domain.Lifecycle.TERMINATED.value
            if dep.state == terminated and all(b.state == terminated for b in bindings):
                return convert.deployment(dep)
            tx.bump()
            dep.state = terminated
            now = utcnow()
            for binding in bindings:
                binding.state = terminated
                binding.updated_at = now
            tx.session.flush()
            for binding in bindings:
                tx.touch_binding(binding)
            return convert.deployment(dep)

    def start_deployment(self, principal: Principal, project_ref: str, deployment_id: str) -> common_pb2.Deployment:
        """Brings a terminated deployment's bindings back to their bounds; a
        binding scaled to 0 stays there unless it serves its environment,
        which gets at least one replica. Idempotent."""
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            rows = tx.session.execute(
                select(BindingRow, EnvironmentRow)
                .join(EnvironmentRow, EnvironmentRow.id == BindingRow.environment_id)
                .where(BindingRow.deployment_id == dep.id)
            ).all()
            active = domain.Lifecycle.ACTIVE.value
            if dep.state == active and all(b.state == active for b, _ in rows):
                return convert.deployment(dep)
            tx.bump()
            dep.state = active
            now = utcnow()
            for binding, env in rows:
                bounds = domain.start_bounds(
                    domain.ReplicaBounds(binding.min_replicas, binding.max_replicas),
                    serving=env.deployment_id == dep.id,
                )
                binding.state = active
                binding.min_replicas, binding.max_replicas = bounds.min_replicas, bounds.max_replicas
                binding.updated_at = now
            tx.session.flush()
            for binding, _ in rows:
                tx.touch_binding(binding)
            return convert.deployment(dep)

    def get_deployment(self, principal: Principal, project_ref: str, deployment_id: str) -> common_pb2.Deployment:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            return convert.deployment(self._deployment(session, project, deployment_id))

    def list_deployments(
        self, principal: Principal, project_ref: str, environment_ref: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[common_pb2.Deployment], str]:
        """Newest first (``created_at`` descending, then ``id``), one page read
        with a keyset after the token's last (created_at, id)."""
        size = paging.page_size(page_size)
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            query = select(DeploymentRow).where(DeploymentRow.project_id == project.id)
            env_id = ""
            if environment_ref:
                env = self._environment(session, project, environment_ref)
                env_id = env.id
                query = query.join(BindingRow, BindingRow.deployment_id == DeploymentRow.id).where(
                    BindingRow.environment_id == env.id
                )
            scope = f"ListDeployments/{project.id}/{env_id}"
            after = paging.decode_token(page_token, scope)
            if after is not None:
                try:
                    created_at, last_id = datetime.fromisoformat(after[0]), str(after[1])
                except (IndexError, TypeError, ValueError):
                    raise paging.bad_token() from None
                query = query.where(
                    or_(
                        DeploymentRow.created_at < created_at,
                        and_(DeploymentRow.created_at == created_at, DeploymentRow.id > last_id),
                    )
                )
            rows = session.execute(
                query.order_by(DeploymentRow.created_at.desc(), DeploymentRow.id).limit(size + 1)
            ).scalars().all()
            page, more = paging.split(rows, size)
            token = paging.encode_token(scope, [page[-1].created_at.isoformat(), page[-1].id]) if more else ""
            return [convert.deployment(row) for row in page], token

    def list_history(
        self, principal: Principal, project_ref: str, environment_ref: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[common_pb2.HistoryEntry], str]:
        """Oldest first (by sequence, unique per environment)."""
        size = paging.page_size(page_size)
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            env = self._environment(session, project, environment_ref)
            scope = f"ListHistory/{project.id}/{env.id}"
            after = paging.decode_token(page_token, scope)
            query = select(HistoryRow).where(HistoryRow.environment_id == env.id)
            if after is not None:
                if len(after) != 1 or not isinstance(after[0], int):
                    raise paging.bad_token()
                query = query.where(HistoryRow.sequence > after[0])
            rows = session.execute(query.order_by(HistoryRow.sequence).limit(size + 1)).scalars().all()
            page, more = paging.split(rows, size)
            token = paging.encode_token(scope, [page[-1].sequence]) if more else ""
            return [convert.history_entry(row) for row in page], token

    # ---- experiments and gates ---------------------------------------

    @staticmethod
    def _gate(session: Session, env: EnvironmentRow) -> domain.Gate | None:
        row = session.get(EnvironmentGateRow, env.id)
        if row is None:
            return None
        return domain.Gate(environment=env.name, experiment=row.experiment, threshold=row.threshold,
                           dataset_digest=row.dataset_digest)

    @staticmethod
    def _latest_run(
        session: Session, project_id: str, name: str, *, deployment_id: str = "", dataset_digest: str = ""
    ) -> ExperimentRunRow | None:
        query = select(ExperimentRunRow).where(ExperimentRunRow.project_id == project_id,
                                               ExperimentRunRow.name == name)
        if deployment_id:
            query = query.where(ExperimentRunRow.deployment_id == deployment_id)
        if dataset_digest:
            query = query.where(ExperimentRunRow.dataset_digest == dataset_digest)
        order = (ExperimentRunRow.created_at.desc(), ExperimentRunRow.id.desc())
        return session.execute(query.order_by(*order).limit(1)).scalar_one_or_none()

    def _check_gate(
        self, session: Session, env: EnvironmentRow, dep: DeploymentRow, *, skip_gate: bool, reason: str
    ) -> str:
        """The reason to record for a promotion into ``env``: raises
        GATE_NOT_PASSED unless the deployment's latest run of the gate's
        experiment on its dataset passes (or ``skip_gate`` with a reason,
        then recorded with the gate it skipped)."""
        gate = self._gate(session, env)
        if gate is None:
            return reason
        if skip_gate:
            return domain.gate_skipped_reason(gate, reason)
        run = self._latest_run(session, env.project_id, gate.experiment, deployment_id=dep.id,
                               dataset_digest=gate.dataset_digest)
        facts = domain.RunFacts(id=run.id, pass_rate=run.pass_rate) if run is not None else None
        domain.check_gate(gate, dep.id, facts)
        return reason

    def _refuse_gated_deploy(self, session: Session, env: EnvironmentRow) -> None:
        gate = self._gate(session, env)
        if gate is not None:
            raise FailedPrecondition(
                f"environment {env.name!r} is gated on experiment {gate.experiment!r}: a new build cannot be "
                "deployed straight into it",
                hint=f"deploy to another environment, run the experiment, then berth promote ID --to {env.name}",
                reason="GATED_ENVIRONMENT", resource_name=env.name,
                metadata={"environment": env.name, "experiment": gate.experiment},
            )

    def record_experiment_run(
        self, principal: Principal, project_ref: str, *, name: str, deployment_id: str, dataset_digest: str,
        cases: list[domain.CaseResult],
    ) -> registry_pb2.ExperimentRun:
        domain.validate_name(name, field_name="experiment name")
        domain.validate_dataset_digest(dataset_digest)
        summary = domain.summarize_run(cases)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            row = ExperimentRunRow(
                id=domain.new_id(domain.EXPERIMENT_RUN_ID_PREFIX), project_id=project.id, name=name,
                deployment_id=dep.id, dataset_digest=dataset_digest, total=summary.total, passed=summary.passed,
                pass_rate=summary.pass_rate, latency_p50_ms=summary.latency_p50_ms,
                latency_p99_ms=summary.latency_p99_ms, cases=[c.to_json() for c in cases],
                actor=principal.actor, created_at=utcnow(),
            )
            tx.session.add(row)
            tx.session.flush()
            return convert.experiment_run(row, with_cases=True)

    def list_experiment_runs(
        self, principal: Principal, project_ref: str, deployment_id: str, name: str, *,
        page_size: int = 0, page_token: str = "",
    ) -> tuple[list[registry_pb2.ExperimentRun], str]:
        """Newest first (created_at, then id), without per-case results."""
        size = paging.page_size(page_size)
        if deployment_id:
            domain.validate_reference(deployment_id, field_name="deployment_id", what="deployment")
        if name:
            domain.validate_name(name, field_name="experiment name")
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            scope = f"ListExperimentRuns/{project.id}/{deployment_id}/{name}"
            after = paging.decode_token(page_token, scope)
            query = select(ExperimentRunRow).where(ExperimentRunRow.project_id == project.id)
            if deployment_id:
                query = query.where(ExperimentRunRow.deployment_id == deployment_id)
            if name:
                query = query.where(ExperimentRunRow.name == name)
            if after is not None:
                try:
                    created_at, last = datetime.fromisoformat(after[0]), str(after[1])
                except (IndexError, TypeError, ValueError):
                    raise paging.bad_token() from None
                query = query.where(or_(ExperimentRunRow.created_at < created_at,
                                        and_(ExperimentRunRow.created_at == created_at, ExperimentRunRow.id < last)))
            rows = session.execute(
                query.order_by(ExperimentRunRow.created_at.desc(), ExperimentRunRow.id.desc()).limit(size + 1)
            ).scalars().all()
            page, more = paging.split(rows, size)
            token = paging.encode_token(scope, [page[-1].created_at.isoformat(), page[-1].id]) if more else ""
            return [convert.experiment_run(row, with_cases=False) for row in page], token

    def get_experiment_run(self, principal: Principal, project_ref: str, run_id: str) -> registry_pb2.ExperimentRun:
        domain.validate_reference(run_id, field_name="run_id", what="experiment run")
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            row = session.get(ExperimentRunRow, run_id)
            if row is None or row.project_id != project.id:
                raise NotFound(f"experiment run {run_id!r} not found in project {project.name!r}",
                               resource_type="experiment_run", resource_name=run_id)
            return convert.experiment_run(row, with_cases=True)

    def set_environment_gate(
        self, principal: Principal, project_ref: str, environment_ref: str, *, experiment: str, threshold: float,
        dataset_digest: str,
    ) -> registry_pb2.EnvironmentGate:
        domain.validate_name(experiment, field_name="experiment name", field="experiment")
        domain.validate_threshold(threshold)
        if dataset_digest:
            domain.validate_dataset_digest(dataset_digest)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref)
            if not dataset_digest:
                newest = self._latest_run(tx.session, project.id, experiment)
                if newest is None:
                    raise FailedPrecondition(
                        f"project {project.name!r} has no run of experiment {experiment!r} to take the gate's "
                        "dataset from",
                        hint="run it first (berth experiments run --name NAME ...) or give the dataset "
                        "(berth env gate ENV --experiment NAME --dataset FILE)",
                        reason="NO_EXPERIMENT_RUN", resource_name=f"experiment/{experiment}", field="dataset_digest",
                    )
                dataset_digest = newest.dataset_digest
            row = tx.session.get(EnvironmentGateRow, env.id)
            if row is None:
                row = EnvironmentGateRow(environment_id=env.id, project_id=project.id)
                tx.session.add(row)
            row.experiment, row.threshold, row.dataset_digest = experiment, threshold, dataset_digest
            row.actor, row.updated_at = principal.actor, utcnow()
            tx.session.flush()
            return convert.environment_gate(row, env.name)

    def clear_environment_gate(self, principal: Principal, project_ref: str, environment_ref: str) -> bool:
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref)
            return _rowcount(tx.session.execute(
                delete(EnvironmentGateRow).where(EnvironmentGateRow.environment_id == env.id)
                .execution_options(synchronize_session=False)
            )) > 0

    def list_environment_gates(self, principal: Principal, project_ref: str) -> list[registry_pb2.EnvironmentGate]:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            rows = session.execute(
                select(EnvironmentGateRow, EnvironmentRow.name)
                .join(EnvironmentRow, EnvironmentRow.id == EnvironmentGateRow.environment_id)
                .where(EnvironmentGateRow.project_id == project.id)
                .order_by(EnvironmentRow.name)
            ).all()
            return [convert.environment_gate(gate, env_name) for gate, env_name in rows]

    def resolve_image(self, principal: Principal, deployment_id: str, image_id: str) -> common_pb2.Deployment:
        if not principal.service:
            raise PermissionDenied("only Berth's own services may record image ids")
        domain.validate_reference(deployment_id, field_name="deployment_id", what="deployment")
        if not domain.IMAGE_ID_PATTERN.match(image_id):
            raise InvalidArgument(f"image_id {image_id!r} must be 'sha256:<64 hex digits>'")
        with self._write() as tx:
            dep = tx.session.get(DeploymentRow, deployment_id)
            if dep is None:
                raise NotFound(
                    f"deployment {deployment_id!r} not found", resource_type="deployment", resource_name=deployment_id
                )
            if dep.image_id and dep.image_id != image_id:
                raise FailedPrecondition(
                    f"deployment {deployment_id} already runs image {dep.image_id}; it is immutable",
                    reason="IMAGE_ALREADY_RESOLVED", resource_name=deployment_id,
                )
            if not dep.image_id:
                tx.bump()
                dep.image_id = image_id
                for binding in tx.session.execute(
                    select(BindingRow).where(BindingRow.deployment_id == dep.id)
                ).scalars():
                    tx.touch_binding(binding)
            return convert.deployment(dep)

    # ---- watch --------------------------------------------------------

    def watch_project(self, principal: Principal, project_ref: str) -> tuple[str, str]:
        """The (id, name) of the project a ``WatchEnvironments`` stream
        follows: a project key's own; the admin key (or the service token)
        names one."""
        if not principal.admin:
            with self._read() as session:
                row = self._project(session, principal, project_ref)
                return row.id, row.name
        if not project_ref:
            raise InvalidArgument("project is required when watching with the admin key", field="project")
        domain.validate_reference(project_ref, field_name="project", what="project")
        column = ProjectRow.id if project_ref.startswith(domain.PROJECT_ID_PREFIX) else ProjectRow.name
        with self._read() as session:
            found = session.execute(select(ProjectRow).where(column == project_ref)).scalar_one_or_none()
        if found is None:
            raise NotFound(f"project {project_ref!r} not found", resource_type="project", resource_name=project_ref)
        return found.id, found.name

    def snapshot(self, project_id: str | None = None) -> tuple[int, list[Change]]:
        """Every environment and binding (of one project, if given) as of one
        revision: one consistent read (REPEATABLE READ on PostgreSQL; on
        SQLite, under the write lock, since its driver runs each SELECT on
        its own)."""
        with self._write_lock, self._read() as session:
            if self.dialect != "sqlite":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            revision = session.execute(select(MetaRow.revision).where(MetaRow.id == 1)).scalar_one()
            names = {row.id: row.name for row in session.execute(select(ProjectRow.id, ProjectRow.name))}
            env_query, binding_query = select(EnvironmentRow), select(BindingRow)
            dep_query = select(DeploymentRow).join(BindingRow, BindingRow.deployment_id == DeploymentRow.id)
            if project_id is not None:
                env_query = env_query.where(EnvironmentRow.project_id == project_id)
                binding_query = binding_query.where(BindingRow.project_id == project_id)
                dep_query = dep_query.where(BindingRow.project_id == project_id)
            envs = {row.id: row for row in session.execute(env_query).scalars()}
            deps = {row.id: row for row in session.execute(dep_query).scalars()}
            changes = [
                Change(env.revision, feed.ENVIRONMENT, convert.environment(env, names[env.project_id]), env.project_id)
                for env in envs.values()
            ]
            for row in session.execute(binding_query).scalars():
                env = envs[row.environment_id]
                changes.append(Change(
                    row.revision, feed.BINDING, convert.binding(row, env, deps[row.deployment_id], names[row.project_id]),
                    row.project_id,
                ))
            return revision, changes


    # ---- canaries (services/registry/canary.py) ----------------------

    def _canary_swap(
        self, tx: _Tx, principal: Principal, env: EnvironmentRow, new: canaries.Canary, *, history_reason: str,
        expected_sequence: int | None, bounds: domain.ReplicaBounds,
    ) -> HistoryRow:
        """Stores ``new`` as ``env``'s canary with compare-and-swap on the
        sequence (like a pointer move) and appends its `canary` history
        entry; the pointer stays."""
        domain.check_expected_sequence(env.name, env.sequence, expected_sequence)
        current = env.sequence
        revision = tx.bump()
        swapped = tx.session.execute(
            update(EnvironmentRow)
            .where(EnvironmentRow.id == env.id, EnvironmentRow.sequence == current)
            .values(sequence=current + 1, canary=new.to_json(), revision=revision)
            .returning(EnvironmentRow)
            .execution_options(synchronize_session=False, populate_existing=True)
        ).scalar_one_or_none()
        if swapped is None:
            raise Aborted(
                f"environment {env.name!r} moved meanwhile (expected sequence {current})",
                hint="re-read the canary and retry", reason="SEQUENCE_CONFLICT",
                metadata={"environment": env.name, "expected_sequence": str(current)},
            )
        entry = HistoryRow(
            environment_id=env.id, sequence=current + 1, kind=domain.MoveKind.CANARY.value,
            deployment_id=env.deployment_id or "", previous_deployment_id=env.previous_deployment_id or "",
            min_replicas=bounds.min_replicas, max_replicas=bounds.max_replicas, actor=principal.actor,
            reason=history_reason[: domain.MAX_REASON_LENGTH], created_at=utcnow(),
        )
        tx.session.add(entry)
        tx.touch_environment(env, move=entry)
        tx.session.flush()
        return entry

    @staticmethod
    def _release_candidate(tx: _Tx, env: EnvironmentRow, candidate: str) -> None:
        """An aborted candidate is no longer kept warm: its binding may scale
        to zero (the scheduler's idle windows stop it)."""
        binding = tx.session.get(BindingRow, (env.id, candidate))
        if binding is not None and binding.min_replicas != 0:
            binding.min_replicas = 0
            tx.touch_binding(binding)

    @staticmethod
    def _canary_of(env: EnvironmentRow) -> canaries.Canary | None:
        return canaries.Canary.from_json(env.canary) if env.canary else None

    def _candidate_bounds(self, session: Session, env: EnvironmentRow, candidate: str) -> domain.ReplicaBounds:
        row = session.get(BindingRow, (env.id, candidate))
        return domain.ReplicaBounds(row.min_replicas, row.max_replicas) if row else domain.ReplicaBounds(0, 0)

    def start_canary(
        self, principal: Principal, *, project_ref: str, deployment_id: str, environment_ref: str,
        steps: list[tuple[int, int]], thresholds: canaries.Thresholds, min_replicas: int | None,
        max_replicas: int | None, expected_sequence: int | None, confirm: bool, reason: str, skip_gate: bool,
    ) -> tuple[common_pb2.Environment, common_pb2.HistoryEntry]:
        domain.validate_reason(reason)
        plan = canaries.validate_steps(steps)
        thresholds = canaries.validate_thresholds(
            thresholds.max_error_rate_increase, thresholds.max_latency_ratio, thresholds.min_requests
        )
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            dep = self._deployment(tx.session, project, deployment_id)
            env = self._environment(tx.session, project, environment_ref)
            if dep.state != domain.Lifecycle.ACTIVE.value:
                raise FailedPrecondition(
                    f"deployment {dep.id} is terminated and cannot be a canary",
                    hint=f"start it first: berth deployment start {dep.id}",
                    reason="DEPLOYMENT_TERMINATED", resource_name=dep.id,
                )
            if not env.deployment_id:
                raise FailedPrecondition(
                    f"environment {env.name!r} has no deployment to be the stable side of a canary",
                    hint=f"promote without --canary: berth promote {dep.id} --to {env.name}",
                    reason="NO_DEPLOYMENT", resource_name=env.name,
                )
            if env.deployment_id == dep.id:
                raise FailedPrecondition(
                    f"deployment {dep.id} already serves environment {env.name!r}",
                    reason="ALREADY_SERVING", resource_name=env.name,
                )
            existing = self._canary_of(env)
            if existing is not None and existing.active:
                raise FailedPrecondition(
                    f"environment {env.name!r} already has a {existing.state.value} canary of "
                    f"{existing.candidate_deployment_id}",
                    hint=f"end it first: berth canary abort {env.name} (or promote-now)",
                    reason="CANARY_RUNNING", resource_name=env.name,
                )
            reason = self._check_gate(tx.session, env, dep, skip_gate=skip_gate, reason=reason)
            domain.check_protected(env.name, env.protected, confirm)
            binding = tx.session.get(BindingRow, (env.id, dep.id))
            fallback = domain.ReplicaBounds(binding.min_replicas, binding.max_replicas) if binding else None
            if fallback is not None and fallback.min_replicas == 0:
                fallback = domain.ReplicaBounds(domain.DEFAULT_MIN_REPLICAS, fallback.max_replicas)
            bounds = domain.resolve_bounds(min_replicas, max_replicas, fallback=fallback)
            if binding is None:
                binding = BindingRow(environment_id=env.id, deployment_id=dep.id, project_id=env.project_id,
                                     min_replicas=1, max_replicas=1, updated_at=utcnow())
                _set_idle(binding, domain.NO_IDLE_CHANGE)
                tx.session.add(binding)
            binding.min_replicas = max(bounds.min_replicas, 1)  # the candidate stays warm while it is judged
            binding.max_replicas = max(bounds.max_replicas, binding.min_replicas)
            binding.state = domain.Lifecycle.ACTIVE.value
            tx.touch_binding(binding)
            canary = canaries.start(
                env.deployment_id, dep.id, plan, thresholds, now=utcnow(), actor=principal.actor, reason=reason,
            )
            plan_words = ",".join(f"{s.weight}:{s.bake_seconds}s" for s in plan)
            entry = self._canary_swap(
                tx, principal, env, canary, expected_sequence=expected_sequence,
                bounds=domain.ReplicaBounds(binding.min_replicas, binding.max_replicas),
                history_reason=f"canary of {dep.id} started at {canary.candidate_weight}% (plan {plan_words})"
                + (f": {reason}" if reason else ""),
            )
            return convert.environment(env, project.name), convert.history_entry(entry)

    def get_canary(self, principal: Principal, project_ref: str, environment_ref: str) -> common_pb2.Environment:
        with self._read() as session:
            project = self._project(session, principal, project_ref)
            env = self._environment(session, project, environment_ref)
            return convert.environment(env, project.name)

    def canary_action(
        self, principal: Principal, *, project_ref: str, environment_ref: str, action: str,
        expected_sequence: int | None, reason: str, confirm: bool = False,
    ) -> tuple[common_pb2.Environment, common_pb2.HistoryEntry]:
        """``action``: pause, resume, abort or promote (PromoteCanaryNow)."""
        domain.validate_reason(reason)
        with self._write() as tx:
            project = self._project(tx.session, principal, project_ref)
            env = self._environment(tx.session, project, environment_ref)
            current = self._canary_of(env)
            now = utcnow()
            who = f" by {principal.actor}" + (f": {reason}" if reason else "")
            if action == "promote":
                canary = canaries.require_active(current, env.name)
                domain.check_protected(env.name, env.protected, confirm)
                entry = self._end_canary_promoted(
                    tx, principal, env, canary, reason=f"canary promoted at once{who}",
                    expected_sequence=expected_sequence,
                )
                return convert.environment(env, project.name), convert.history_entry(entry)
            if action == "pause":
                new = canaries.pause(current, env.name, reason=reason)
                words = f"canary paused at {new.candidate_weight}%{who}"
            elif action == "resume":
                new = canaries.resume(current, env.name, now=now, reason=reason)
                words = f"canary resumed at {new.candidate_weight}%{who}"
            elif action == "abort":
                new = canaries.abort(canaries.require_active(current, env.name), reason=f"aborted{who}")
                words = f"canary of {new.candidate_deployment_id} aborted (weight 0){who}"
                self._release_candidate(tx, env, new.candidate_deployment_id)
            else:
                raise InvalidArgument(f"unknown canary action {action!r}")
            entry = self._canary_swap(
                tx, principal, env, new, history_reason=words, expected_sequence=expected_sequence,
                bounds=self._candidate_bounds(tx.session, env, new.candidate_deployment_id),
            )
            return convert.environment(env, project.name), convert.history_entry(entry)

    def _end_canary_promoted(
        self, tx: _Tx, principal: Principal, env: EnvironmentRow, canary: canaries.Canary, *, reason: str,
        expected_sequence: int | None, analysis: str = "",
    ) -> HistoryRow:
        """The canary's end at 100%: a normal `promote` move of the pointer
        to the candidate (its binding keeps its bounds), the canary kept as
        promoted."""
        dep = tx.session.get(DeploymentRow, canary.candidate_deployment_id)
        if dep is None or dep.state != domain.Lifecycle.ACTIVE.value:
            raise FailedPrecondition(
                f"candidate {canary.candidate_deployment_id} is no longer active", reason="DEPLOYMENT_TERMINATED",
                resource_name=canary.candidate_deployment_id,
            )
        bounds = self._candidate_bounds(tx.session, env, dep.id)
        if bounds.max_replicas == 0:
            bounds = domain.resolve_bounds(None, None)
        done = canaries.promoted(canary, reason=reason, analysis=analysis, now=utcnow() if analysis else None)
        return self._move(
            tx, principal, env, dep, kind=domain.MoveKind.PROMOTE, bounds=bounds,
            expected_sequence=expected_sequence, reason=reason[: domain.MAX_REASON_LENGTH], canary=done.to_json(),
        )

    def advance_canary(
        self, principal: Principal, *, project_id: str, environment_id: str, expected_sequence: int, step: int,
        action: str, analysis: str,
    ) -> tuple[common_pb2.Environment, common_pb2.HistoryEntry | None]:
        """The controller's move (service token only); ``action``: advance,
        abort or record. Compare-and-swap on the sequence and the step."""
        if not principal.service:
            raise PermissionDenied("only Berth's own services may advance a canary")
        analysis = analysis[:400]
        with self._write() as tx:
            env = tx.session.get(EnvironmentRow, environment_id)
            if env is None or env.project_id != project_id:
                raise NotFound(f"environment {environment_id!r} not found", resource_type="environment",
                               resource_name=environment_id)
            project = tx.session.get(ProjectRow, env.project_id)
            assert project is not None
            canary = self._canary_of(env)
            if canary is None:
                canaries.require_active(canary, env.name)
            assert canary is not None
            if canary.state != canaries.State.RUNNING:
                raise FailedPrecondition(
                    f"the canary of {env.name!r} is {canary.state.value}, not running", reason="CANARY_NOT_RUNNING",
                    resource_name=env.name,
                )
            canaries.check_step(canary, env.name, step)
            now = utcnow()
            if action == "record":
                domain.check_expected_sequence(env.name, env.sequence, expected_sequence)
                recorded = dataclasses.replace(canary, last_analysis=analysis, last_analysis_at=now)
                revision = tx.bump()
                swapped = tx.session.execute(
                    update(EnvironmentRow)
                    .where(EnvironmentRow.id == env.id, EnvironmentRow.sequence == env.sequence)
                    .values(canary=recorded.to_json(), revision=revision)
                    .returning(EnvironmentRow)
                    .execution_options(synchronize_session=False, populate_existing=True)
                ).scalar_one_or_none()
                if swapped is None:
                    raise Aborted(f"environment {env.name!r} moved meanwhile", reason="SEQUENCE_CONFLICT")
                tx.touch_environment(env)
                return convert.environment(env, project.name), None
            if action == "abort":
                new = canaries.abort(canary, reason=f"analysis failed: {analysis}", analysis=analysis, now=now)
                self._release_candidate(tx, env, canary.candidate_deployment_id)
                entry = self._canary_swap(
                    tx, principal, env, new, expected_sequence=expected_sequence,
                    bounds=self._candidate_bounds(tx.session, env, canary.candidate_deployment_id),
                    history_reason=f"canary of {canary.candidate_deployment_id} aborted at "
                    f"{canary.candidate_weight}% (weight 0): {analysis}",
                )
            elif action == "advance":
                if canaries.is_last_step(canary):
                    entry = self._end_canary_promoted(
                        tx, principal, env, canary, expected_sequence=expected_sequence, analysis=analysis,
                        reason=f"canary of {canary.candidate_deployment_id} completed all {len(canary.steps)} "
                        f"steps: {analysis}",
                    )
                else:
                    new = canaries.next_step(canary, now=now, analysis=analysis)
                    entry = self._canary_swap(
                        tx, principal, env, new, expected_sequence=expected_sequence,
                        bounds=self._candidate_bounds(tx.session, env, canary.candidate_deployment_id),
                        history_reason=f"canary step {new.step + 1}/{len(new.steps)}: {canary.candidate_weight}% "
                        f"-> {new.candidate_weight}% ({analysis})",
                    )
            else:
                raise InvalidArgument(f"unknown canary action {action!r}", field="action")
            return convert.environment(env, project.name), convert.history_entry(entry)


def _set_idle(binding: BindingRow, idle: domain.IdleWindows) -> None:
    """The idle windows given (``None``: kept; a new binding's are 0)."""
    if idle.pause is not None:
        binding.idle_pause_seconds = idle.pause
    elif binding.idle_pause_seconds is None:
        binding.idle_pause_seconds = 0
    if idle.stop is not None:
        binding.idle_stop_seconds = idle.stop
    elif binding.idle_stop_seconds is None:
        binding.idle_stop_seconds = 0
