"""Use cases of the secrets service. Values go in through ``set_secret`` and
come out only through ``resolve`` (service credential); nothing else ever
returns, logs or raises with a value.

Model: every change appends a version row to its secret (project, scope,
name). Setting appends a value, deleting appends a tombstone (no value),
rolling back appends a copy of an earlier value. Rows are never rewritten,
so versions only grow and the history stays listable after a deletion.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from berth.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.common import paging
from services.common.auth import Principal
from services.secrets import crypto, limits
from services.secrets.storage import DataKeyRow, SecretVersionRow

log = logging.getLogger("berth.secrets")

SECRET_TYPES = ("api_key", "password", "token", "certificate", "generic")
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_NAMES = frozenset({"PORT"})
MAX_VALUE_BYTES = limits.MAX_VALUE_BYTES
WRITE_ATTEMPTS = 5  # a unique-version race with another process is retried this often

T = TypeVar("T")


@dataclass(frozen=True)
class SecretInfo:
    name: str
    type: str
    environment_id: str
    environment_name: str
    version: int
    created_at: datetime  # of the first version
    updated_at: datetime  # of this version
    updated_by: str
    deleted: bool = False

    @property
    def scope(self) -> str:
        return f"environment:{self.environment_name}" if self.environment_id else "project"


@dataclass(frozen=True)
class ResolvedSecret:
    name: str
    value: str
    version: int
    scope: str


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _scope_text(environment_name: str) -> str:
    return f"environment {environment_name!r}" if environment_name else "the project scope"


def validate_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"name {name!r} is not usable as an environment variable: letters, digits and '_', "
            "not starting with a digit, at most 128 characters"
        )
    if name in RESERVED_NAMES or name.startswith("BERTH_"):
        raise InvalidArgument(f"name {name!r} is reserved: Berth sets it itself")


def validate_secret(name: str, type_: str, value: str) -> None:
    validate_name(name)
    if not type_:
        raise InvalidArgument(f"type is required: one of {', '.join(SECRET_TYPES)}")
    if type_ not in SECRET_TYPES:
        raise InvalidArgument(f"type {type_!r} is not one of: {', '.join(SECRET_TYPES)}")
    problem = limits.value_content_problem(value) or limits.value_size_problem(value)
    if problem:
        raise InvalidArgument(f"value {problem}")


class SecretsService:
    def __init__(self, sessions: sessionmaker[Session], keyring: crypto.MasterKeyring | bytes) -> None:
        self._sessions = sessions
        self._keyring = keyring if isinstance(keyring, crypto.MasterKeyring) else crypto.MasterKeyring(keyring)
        # Serialises this process's writers (SQLite has one writer anyway);
        # other processes are caught by the unique version constraint.
        self._write_lock = threading.Lock()

    @property
    def keyring(self) -> crypto.MasterKeyring:
        return self._keyring

    # -- plumbing -----------------------------------------------------------
    def _write(self, what: str, fn: Callable[[Session], T], *, rotating: bool = False) -> T:
        """Runs ``fn`` in one transaction under the write lock; a lost
        unique-version race (another process) is retried a few times. It
        holds the key file's lock shared (a rotation holds it exclusively,
        ``rotating``) and reads the current master key under it, so a data
        key it wraps is never under a key another instance just retired."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with contextlib.ExitStack() as stack:
                    if not rotating:
                        stack.enter_context(self._keyring.file_lock(exclusive=False))
                        self._keyring.refresh()
                    stack.enter_context(self._write_lock)
                    session = stack.enter_context(self._sessions())
                    stack.enter_context(session.begin())
                    return fn(session)
            except IntegrityError:
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise Aborted(f"{what} lost {WRITE_ATTEMPTS} races with concurrent writers; retry") from None
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            except OperationalError as exc:
                raise Unavailable("the secrets database is unavailable; retry shortly") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Session], T]) -> T:
        try:
            with self._sessions() as session:
                return fn(session)
        except OperationalError as exc:
            raise Unavailable("the secrets database is unavailable; retry shortly") from exc

    def _data_key(self, session: Session, project_id: str, *, create: bool) -> bytes | None:
        row = session.get(DataKeyRow, project_id)
        if row is None:
            if not create:
                return None
            data_key, nonce, wrapped = crypto.new_data_key(self._keyring.current, project_id)
            session.add(
                DataKeyRow(
                    project_id=project_id,
                    nonce=nonce,
                    wrapped_key=wrapped,
                    master_key_id=self._keyring.current_id,
                    created_at=datetime.now(UTC),
                )
            )
            session.flush()
            return data_key
        try:
            return crypto.unwrap_with(self._keyring, row.master_key_id, project_id, row.nonce, row.wrapped_key)
        except crypto.DecryptionFailed:
            log.error("data_key_decryption_failed", extra={"project": project_id, "master_key_id": row.master_key_id})
            raise

    @staticmethod
    def _versions(session: Session, project_id: str, environment_id: str, name: str) -> list[SecretVersionRow]:
        return list(
            session.execute(
                select(SecretVersionRow)
                .where(
                    SecretVersionRow.project_id == project_id,
                    SecretVersionRow.environment_id == environment_id,
                    SecretVersionRow.name == name,
                )
                .order_by(SecretVersionRow.version)
            ).scalars()
        )

    @staticmethod
    def _info(row: SecretVersionRow, first_created: datetime) -> SecretInfo:
        return SecretInfo(
            name=row.name,
            type=row.type,
            environment_id=row.environment_id,
            environment_name=row.environment_name,
            version=row.version,
            created_at=_aware(first_created),
            updated_at=_aware(row.created_at),
            updated_by=row.created_by,
            deleted=row.deleted,
        )

    def _append(
        self,
        session: Session,
        principal: Principal,
        *,
        project_id: str,
        environment_id: str,
        environment_name: str,
        name: str,
        type_: str,
        value: str | None,
    ) -> SecretVersionRow:
        """Appends the next version (a tombstone when ``value`` is None)."""
        latest = session.execute(
            select(func.max(SecretVersionRow.version)).where(
                SecretVersionRow.project_id == project_id,
                SecretVersionRow.environment_id == environment_id,
                SecretVersionRow.name == name,
            )
        ).scalar()
        version = (latest or 0) + 1
        nonce, ciphertext = b"", b""
        if value is not None:
            data_key = self._data_key(session, project_id, create=True)
            assert data_key is not None
            nonce, ciphertext = crypto.encrypt_value(
                data_key, value, crypto.secret_aad(project_id, environment_id, name, version)
            )
        row = SecretVersionRow(
            project_id=project_id,
            environment_id=environment_id,
            environment_name=environment_name,
            name=name,
            type=type_,
            version=version,
            nonce=nonce,
            ciphertext=ciphertext,
            created_at=datetime.now(UTC),
            created_by=principal.actor,
            deleted=value is None,
        )
        session.add(row)
        session.flush()  # a concurrent writer's same version fails here (IntegrityError)
        return row

    # -- writes -------------------------------------------------------------
    def set_secret(
        self,
        principal: Principal,
        *,
        project_id: str,
        environment_id: str,
        environment_name: str,
        name: str,
        type_: str,
        value: str,
    ) -> SecretInfo:
        validate_secret(name, type_, value)

        def write(session: Session) -> SecretInfo:
            first = self._first_created(session, project_id, environment_id, name)
            row = self._append(
                session, principal, project_id=project_id, environment_id=environment_id,
                environment_name=environment_name, name=name, type_=type_, value=value,
            )
            return self._info(row, first or row.created_at)

        return self._write(f"setting {name!r}", write)

    def delete_secret(
        self, principal: Principal, *, project_id: str, environment_id: str, environment_name: str, name: str
    ) -> SecretInfo:
        """Appends a tombstone: the secret stops resolving and listing; its
        versions stay listable; setting it again continues the numbering.
        Deleting an environment's secret uncovers the project's of the same
        name, if any."""
        validate_name(name)

        def write(session: Session) -> SecretInfo:
            rows = self._versions(session, project_id, environment_id, name)
            if not rows or rows[-1].deleted:
                raise NotFound(
                    f"secret {name!r} not found in {_scope_text(environment_name)}"
                    + (" (it was deleted)" if rows else ""),
                    hint="`berth secrets list` shows the secrets of a scope",
                    resource_type="secret", resource_name=name,
                )
            row = self._append(
                session, principal, project_id=project_id, environment_id=environment_id,
                environment_name=environment_name, name=name, type_=rows[-1].type, value=None,
            )
            return self._info(row, rows[0].created_at)

        return self._write(f"deleting {name!r}", write)

    def rollback_secret(
        self,
        principal: Principal,
        *,
        project_id: str,
        environment_id: str,
        environment_name: str,
        name: str,
        to_version: int,
    ) -> SecretInfo:
        """Appends a new version holding the value (and type) of
        ``to_version``. Works on a deleted secret too (it comes back)."""
        validate_name(name)
        if to_version <= 0:
            raise InvalidArgument(f"to_version must be a version number (1 or more), not {to_version}")

        def write(session: Session) -> SecretInfo:
            rows = self._versions(session, project_id, environment_id, name)
            if not rows:
                raise NotFound(
                    f"secret {name!r} not found in {_scope_text(environment_name)}",
                    resource_type="secret", resource_name=name,
                )
            target = next((r for r in rows if r.version == to_version), None)
            if target is None:
                raise NotFound(
                    f"secret {name!r} has no version {to_version} (versions 1..{rows[-1].version})",
                    hint="`berth secrets versions` lists them",
                    resource_type="secret_version", resource_name=f"{name}@{to_version}",
                )
            if target.deleted:
                raise FailedPrecondition(
                    f"version {to_version} of {name!r} is a deletion and holds no value; pick a version that does",
                    reason="VERSION_IS_DELETION", field="to_version", resource_name=name,
                )
            if target is rows[-1]:
                raise FailedPrecondition(
                    f"version {to_version} is already the current version of {name!r}",
                    reason="ALREADY_CURRENT_VERSION", field="to_version", resource_name=name,
                )
            data_key = self._data_key(session, project_id, create=False)
            if data_key is None:
                raise crypto.DecryptionFailed(f"project {project_id} has secrets but no data key")
            value = self._decrypt(data_key, project_id, target)
            problem = limits.value_content_problem(value)  # stored before values were checked on entry
            if problem:
                raise FailedPrecondition(
                    f"version {to_version} of {name!r} cannot be restored: its value {problem}",
                    hint="set a new value with `berth secrets set`",
                    reason="VERSION_NOT_RESTORABLE", field="to_version", resource_name=name,
                )
            row = self._append(
                session, principal, project_id=project_id, environment_id=environment_id,
                environment_name=environment_name, name=name, type_=target.type, value=value,
            )
            return self._info(row, rows[0].created_at)

        return self._write(f"rolling back {name!r}", write)

    # -- master key rotation ------------------------------------------------
    def _rewrap_all(self, session: Session) -> int:
        """Re-wraps every data key not yet under the current master key."""
        current, current_id = self._keyring.current, self._keyring.current_id
        count = 0
        for row in session.execute(select(DataKeyRow).order_by(DataKeyRow.project_id).with_for_update()).scalars():
            if row.master_key_id == current_id:
                continue
            data_key = crypto.unwrap_with(self._keyring, row.master_key_id, row.project_id, row.nonce, row.wrapped_key)
            row.nonce, row.wrapped_key = crypto.wrap_data_key(current, row.project_id, data_key)
            row.master_key_id = current_id
            count += 1
        return count

    def recover(self) -> int:
        """At start: finishes a rotation a crash interrupted (data keys
        still under the ``.previous`` key are re-wrapped, then that file
        goes). Returns how many data keys were re-wrapped."""
        if not self._keyring.rotatable:
            return 0
        with self._keyring.file_lock(exclusive=True):
            return self._recover_locked()

    def _recover_locked(self) -> int:
        assert self._keyring.key_file is not None
        self._keyring.refresh()  # another instance may have rotated since this one read the file
        if not crypto.previous_path(self._keyring.key_file).exists():
            return 0
        count = self._write("finishing the key rotation", self._rewrap_all, rotating=True)
        self._keyring.finish_rotation()
        log.info("rotation_finished", extra={"data_keys_rewrapped": count, "master_key_id": self._keyring.current_id})
        return count

    def rotate_master_key(self, principal: Principal) -> tuple[int, str]:
        """A new master key re-wraps every project's data key, without a
        pause in resolution: see ``crypto.MasterKeyring`` for the files.

        1. (an unfinished earlier rotation is finished first)
        2. the current key is written to ``<file>.previous``, the new key
           replaces the key file (both atomic); the process holds both;
        3. one transaction re-wraps every data key under the new key and
           records its fingerprint on the row;
        4. ``<file>.previous`` is deleted.
        A crash before 3 commits leaves rows under the old key, readable
        from ``.previous``; the next start (or rotation) finishes the job.
        """
        if not principal.admin:
            raise PermissionDenied("rotating the master key needs the platform's admin key")
        if not self._keyring.rotatable:
            raise FailedPrecondition(
                "the master key comes from BERTH_MASTER_KEY, which this service cannot change: rotating it here "
                "would leave the data keys wrapped by a key that the next start no longer has",
                hint="use a key file (unset BERTH_MASTER_KEY; --master-key-file) to rotate with `berth secrets rotate-key`",
            )
        with self._keyring.file_lock(exclusive=True):  # one rotation at a time over every instance
            self._recover_locked()
            with self._write_lock:
                old_id = self._keyring.current_id
                self._keyring.begin_rotation()
            try:
                count = self._write("re-wrapping the data keys", self._rewrap_all, rotating=True)
            except Unavailable as exc:
                raise Unavailable(
                    "the new master key is in place but the data keys could not be re-wrapped; they stay readable "
                    "with the previous key (kept next to the key file); run the rotation again",
                ) from exc
            self._keyring.finish_rotation()
        log.info(
            "master_key_rotated",
            extra={"from_key": old_id, "to_key": self._keyring.current_id, "data_keys_rewrapped": count},
        )
        return count, self._keyring.current_id

    def missing_master_keys(self) -> dict[str, int]:
        """Fingerprints of master keys that wrap data keys but are not held
        (data keys counted per fingerprint)."""
        held = self._keyring.ids()

        def read(session: Session) -> dict[str, int]:
            rows = session.execute(
                select(DataKeyRow.master_key_id, func.count()).group_by(DataKeyRow.master_key_id)
            ).all()
            return {key_id: n for key_id, n in rows if key_id and key_id not in held}

        return self._read(read)

    # -- reads --------------------------------------------------------------
    @staticmethod
    def _first_created(session: Session, project_id: str, environment_id: str, name: str) -> datetime | None:
        return session.execute(
            select(func.min(SecretVersionRow.created_at)).where(
                SecretVersionRow.project_id == project_id,
                SecretVersionRow.environment_id == environment_id,
                SecretVersionRow.name == name,
            )
        ).scalar()

    def list_secrets(
        self, project_id: str, environment_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[SecretInfo], str]:
        """Without an environment: every project-scoped secret. With one: what
        that environment resolves (its own secrets override the project's).
        By name, one page: the rows are read in (name, version) order after
        the token's last name and reading stops once the page is full."""
        size = paging.page_size(page_size)
        scope = f"ListSecrets/{project_id}/{environment_id}"
        after = paging.decode_token(page_token, scope)
        if after is not None and (len(after) != 1 or not isinstance(after[0], str)):
            raise paging.bad_token()
        scopes = {"", environment_id}

        def read(session: Session) -> list[SecretInfo]:
            query = select(SecretVersionRow).where(
                SecretVersionRow.project_id == project_id, SecretVersionRow.environment_id.in_(scopes)
            )
            if after is not None:
                query = query.where(SecretVersionRow.name > after[0])
            rows = session.execute(query.order_by(SecretVersionRow.name, SecretVersionRow.version)).scalars()
            out: list[SecretInfo] = []
            for _, group in itertools.groupby(rows, key=lambda r: r.name):
                first: dict[str, datetime] = {}
                latest: dict[str, SecretVersionRow] = {}
                for row in group:
                    first.setdefault(row.environment_id, row.created_at)
                    latest[row.environment_id] = row
                live = [e for e in sorted(latest) if not latest[e].deleted]
                if live:  # the environment's own ("env_..." sorts after "") overrides the project's
                    out.append(self._info(latest[live[-1]], first[live[-1]]))
                if len(out) > size:
                    break
            return out

        page, more = paging.split(self._read(read), size)
        return list(page), paging.encode_token(scope, [page[-1].name]) if more else ""

    def list_versions(
        self, project_id: str, environment_id: str, environment_name: str, name: str, *,
        page_size: int = 0, page_token: str = "",
    ) -> tuple[list[SecretInfo], str]:
        """Every version of one secret in one scope, oldest first (no values),
        one page after the token's last version."""
        validate_name(name)
        size = paging.page_size(page_size)
        scope = f"ListSecretVersions/{project_id}/{environment_id}/{name}"
        after = paging.decode_token(page_token, scope)
        if after is not None and (len(after) != 1 or not isinstance(after[0], int)):
            raise paging.bad_token()

        def read(session: Session) -> list[SecretInfo]:
            where = (
                SecretVersionRow.project_id == project_id,
                SecretVersionRow.environment_id == environment_id,
                SecretVersionRow.name == name,
            )
            first = session.execute(
                select(SecretVersionRow.created_at).where(*where).order_by(SecretVersionRow.version).limit(1)
            ).scalar_one_or_none()
            if first is None:
                return []
            query = select(SecretVersionRow).where(*where)
            if after is not None:
                query = query.where(SecretVersionRow.version > after[0])
            rows = session.execute(query.order_by(SecretVersionRow.version).limit(size + 1)).scalars().all()
            return [self._info(r, first) for r in rows]

        versions = self._read(read)
        if not versions and after is None:
            raise NotFound(
                f"secret {name!r} not found in {_scope_text(environment_name)}",
                hint="`berth secrets list` shows the secrets of a scope",
                resource_type="secret", resource_name=name,
            )
        page, more = paging.split(versions, size)
        return list(page), paging.encode_token(scope, [page[-1].version]) if more else ""

    def _decrypt(self, data_key: bytes, project_id: str, row: SecretVersionRow) -> str:
        scope = f"environment:{row.environment_name}" if row.environment_id else "project"
        try:
            return crypto.decrypt_value(
                data_key,
                row.nonce,
                row.ciphertext,
                crypto.secret_aad(project_id, row.environment_id, row.name, row.version),
                f"secret {row.name!r} version {row.version} ({scope})",
            )
        except crypto.DecryptionFailed:
            # Tampering or a moved row: loud, but never with a value.
            log.error(
                "secret_decryption_failed",
                extra={"project": project_id, "secret": row.name, "version": row.version, "scope": scope},
            )
            raise

    def resolve(self, principal: Principal, project_id: str, environment_id: str) -> list[ResolvedSecret]:
        if not principal.service:
            raise PermissionDenied("secret values are write-only; only Berth's scheduler resolves them")

        def read(session: Session) -> list[ResolvedSecret]:
            # One session (one snapshot) for the listing, the data key and the rows.
            ids = {"", environment_id} if environment_id else {""}
            rows = session.execute(
                select(SecretVersionRow)
                .where(SecretVersionRow.project_id == project_id, SecretVersionRow.environment_id.in_(ids))
                .order_by(SecretVersionRow.name, SecretVersionRow.version)
            ).scalars()
            latest: dict[tuple[str, str], SecretVersionRow] = {}
            for row in rows:
                latest[(row.environment_id, row.name)] = row
            chosen: dict[str, SecretVersionRow] = {}
            for (_env_id, name), row in sorted(latest.items()):  # "" (project) sorts first: environments override
                if not row.deleted:
                    chosen[name] = row
            if not chosen:
                return []
            data_key = self._data_key(session, project_id, create=False)
            if data_key is None:
                raise crypto.DecryptionFailed(f"project {project_id} has secrets but no data key")
            result = []
            for name in sorted(chosen):
                row = chosen[name]
                scope = f"environment:{row.environment_name}" if row.environment_id else "project"
                result.append(ResolvedSecret(name, self._decrypt(data_key, project_id, row), row.version, scope))
            return result

        return self._read(read)
