"""Use cases of the secrets service. Values go in through ``set_secret`` and
come out only through ``resolve`` (service credential); nothing else ever
returns, logs or raises with a value."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from berth.errors import Aborted, InvalidArgument, PermissionDenied, Unavailable
from services.common.auth import Principal
from services.secrets import crypto
from services.secrets.storage import DataKeyRow, SecretVersionRow

SECRET_TYPES = ("api_key", "password", "token", "certificate", "generic")
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_NAMES = frozenset({"PORT"})
MAX_VALUE_BYTES = 64 * 1024


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
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def validate_secret(name: str, type_: str, value: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"name {name!r} is not usable as an environment variable: letters, digits and '_', not starting with a digit"
        )
    if name in RESERVED_NAMES or name.startswith("BERTH_"):
        raise InvalidArgument(f"name {name!r} is reserved: Berth sets it itself")
    if type_ not in SECRET_TYPES:
        raise InvalidArgument(f"type {type_!r} is not one of: {', '.join(SECRET_TYPES)}")
    if not value:
        raise InvalidArgument("value is empty")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"value is larger than {MAX_VALUE_BYTES // 1024} KiB")


class SecretsService:
    def __init__(self, sessions: sessionmaker[Session], master_key: bytes) -> None:
        self._sessions = sessions
        self._master_key = master_key
        self._write_lock = threading.Lock()

    def _data_key(self, session: Session, project_id: str, *, create: bool) -> bytes | None:
        row = session.get(DataKeyRow, project_id)
        if row is None:
            if not create:
                return None
            data_key, nonce, wrapped = crypto.new_data_key(self._master_key, project_id)
            session.add(DataKeyRow(project_id=project_id, nonce=nonce, wrapped_key=wrapped, created_at=datetime.now(timezone.utc)))
            session.flush()
            return data_key
        return crypto.unwrap_data_key(self._master_key, project_id, row.nonce, row.wrapped_key)

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
        try:
            with self._write_lock, self._sessions() as session, session.begin():
                data_key = self._data_key(session, project_id, create=True)
                assert data_key is not None
                latest = session.execute(
                    select(func.max(SecretVersionRow.version)).where(
                        SecretVersionRow.project_id == project_id,
                        SecretVersionRow.environment_id == environment_id,
                        SecretVersionRow.name == name,
                    )
                ).scalar()
                version = (latest or 0) + 1
                nonce, ciphertext = crypto.encrypt_value(
                    data_key, value, crypto.secret_aad(project_id, environment_id, name, version)
                )
                now = datetime.now(timezone.utc)
                session.add(
                    SecretVersionRow(
                        project_id=project_id,
                        environment_id=environment_id,
                        environment_name=environment_name,
                        name=name,
                        type=type_,
                        version=version,
                        nonce=nonce,
                        ciphertext=ciphertext,
                        created_at=now,
                        created_by=principal.actor,
                    )
                )
        except IntegrityError as exc:
            raise Aborted(f"secret {name!r} was set concurrently; retry") from exc
        except OperationalError as exc:
            raise Unavailable("the secrets database is unavailable; retry shortly") from exc
        infos = self._latest(project_id, {environment_id})
        return next(i for i in infos if i.name == name and i.environment_id == environment_id)

    def _latest(self, project_id: str, environment_ids: set[str]) -> list[SecretInfo]:
        """Latest version of every secret in the given scopes ("" = project)."""
        try:
            with self._sessions() as session:
                rows = session.execute(
                    select(SecretVersionRow)
                    .where(SecretVersionRow.project_id == project_id, SecretVersionRow.environment_id.in_(environment_ids))
                    .order_by(SecretVersionRow.name, SecretVersionRow.version)
                ).scalars()
                first: dict[tuple[str, str], datetime] = {}
                latest: dict[tuple[str, str], SecretVersionRow] = {}
                for row in rows:
                    key = (row.environment_id, row.name)
                    first.setdefault(key, row.created_at)
                    latest[key] = row
        except OperationalError as exc:
            raise Unavailable("the secrets database is unavailable; retry shortly") from exc
        return [
            SecretInfo(
                name=row.name,
                type=row.type,
                environment_id=row.environment_id,
                environment_name=row.environment_name,
                version=row.version,
                created_at=_aware(first[key]),
                updated_at=_aware(row.created_at),
                updated_by=row.created_by,
            )
            for key, row in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]

    def list_secrets(self, project_id: str, environment_id: str) -> list[SecretInfo]:
        """Without an environment: every project-scoped secret. With one: what
        that environment resolves (its own secrets override the project's)."""
        if not environment_id:
            return self._latest(project_id, {""})
        resolved: dict[str, SecretInfo] = {}
        for info in self._latest(project_id, {"", environment_id}):
            if info.name not in resolved or info.environment_id:
                resolved[info.name] = info
        return [resolved[name] for name in sorted(resolved)]

    def resolve(self, principal: Principal, project_id: str, environment_id: str) -> list[ResolvedSecret]:
        if not principal.service:
            raise PermissionDenied("secret values are write-only; only Berth's scheduler resolves them")
        infos = self.list_secrets(project_id, environment_id)
        if not infos:
            return []
        try:
            with self._sessions() as session:
                data_key = self._data_key(session, project_id, create=False)
                if data_key is None:
                    raise crypto.DecryptionFailed(f"project {project_id} has secrets but no data key")
                result = []
                for info in infos:
                    row = session.execute(
                        select(SecretVersionRow).where(
                            SecretVersionRow.project_id == project_id,
                            SecretVersionRow.environment_id == info.environment_id,
                            SecretVersionRow.name == info.name,
                            SecretVersionRow.version == info.version,
                        )
                    ).scalar_one()
                    value = crypto.decrypt_value(
                        data_key,
                        row.nonce,
                        row.ciphertext,
                        crypto.secret_aad(project_id, row.environment_id, row.name, row.version),
                        f"secret {row.name!r} version {row.version} ({info.scope})",
                    )
                    result.append(ResolvedSecret(info.name, value, info.version, info.scope))
                return result
        except OperationalError as exc:
            raise Unavailable("the secrets database is unavailable; retry shortly") from exc
