"""Who is calling: the principal an API key or service token stands for."""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets as _secrets
from dataclasses import dataclass

from berth.errors import Unauthenticated

API_KEY_METADATA = "x-api-key"
PROJECT_KEY_PREFIX = "berth_pk_"
ADMIN_KEY_PREFIX = "berth_admin_"
SERVICE_TOKEN_PREFIX = "berth_svc_"


@dataclass(frozen=True)
class Principal:
    project_id: str = ""
    project_name: str = ""
    key_name: str = ""
    admin: bool = False
    service: bool = False

    @property
    def actor(self) -> str:
        if self.service:
            return "service"
        if self.admin:
            return "admin"
        return self.key_name


SERVICE_PRINCIPAL = Principal(key_name="service", service=True)
ADMIN_PRINCIPAL = Principal(key_name="admin", admin=True)

current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


def caller() -> Principal:
    principal = current_principal.get()
    if principal is None:
        raise Unauthenticated("no API key given", hint="set BERTH_API_KEY")
    return principal


def new_key(prefix: str) -> str:
    return prefix + _secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Keys are random with 256 bits of entropy, so a plain SHA-256 is enough
    (no dictionary to resist); stored hashes never reveal the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
