"""Errors shared by the services (raised by domain code) and the client
(raised from gRPC status codes). The mapping to gRPC codes lives in exactly two
places: ``services.common.server`` (domain -> status) and ``berth.client``
(status -> exception)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: ``ErrorInfo.domain`` of every error Berth's services send.
ERROR_DOMAIN = "berth.dev"

_FIELD_AT_START = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\b")


class BerthError(Exception):
    """Base of every error a caller can cause or act on.

    Besides the human ``message`` an error carries structured details that
    the services send as ``google.rpc.Status`` details and the client reads
    back: ``reason`` (a stable UPPER_SNAKE name, ``ErrorInfo.reason``) with
    ``metadata`` (``ErrorInfo.metadata``), ``field``/``description``
    (``BadRequest`` on INVALID_ARGUMENT), ``resource_type``/``resource_name``
    (``ResourceInfo`` on NOT_FOUND). ``hint`` is a suggestion a client may
    show (the CLI does); the services send it as ``metadata["hint"]``, not
    in the message."""

    #: ``reason`` when the raiser gives none.
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field: str = "",
        description: str = "",
        resource_type: str = "",
        resource_name: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.field = field
        self.description = description or (message if field else "")
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> dict[str, Any]:
        """The structured details as plain data (the CLI's JSON output)."""
        out: dict[str, Any] = {"reason": self.reason}
        if self.field:
            out["field"] = self.field
            out["description"] = self.description
        if self.resource_type or self.resource_name:
            out["resource"] = {"type": self.resource_type, "name": self.resource_name}
        metadata = {k: v for k, v in self.metadata.items() if k != "hint"}
        if metadata:
            out["metadata"] = metadata
        return out


class InvalidArgument(BerthError):
    """Bad input: the message names the field and why; ``field`` is its path
    in the request (``config.resources.cpus``). When the raiser gives none it
    is taken from the message's first word when that looks like a field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, **kwargs: Any) -> None:
        if not kwargs.get("field"):
            match = _FIELD_AT_START.match(message)
            if match and match.group(1) not in {"a", "the", "an"}:
                kwargs["field"] = match.group(1)
        super().__init__(message, **kwargs)


class NotFound(BerthError):
    default_reason = "NOT_FOUND"


class AlreadyExists(BerthError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BerthError):
    """The current state forbids the operation."""

    default_reason = "FAILED_PRECONDITION"


class Aborted(BerthError):
    """Lost a compare-and-swap; re-read and retry."""

    default_reason = "CONCURRENT_CHANGE"


class Unauthenticated(BerthError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BerthError):
    default_reason = "PERMISSION_DENIED"


class Unavailable(BerthError):
    """A dependency is down; retrying later may succeed."""

    default_reason = "UNAVAILABLE"


class ResourceExhausted(BerthError):
    """A bound was reached (too many streams at once); retry later."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unimplemented(BerthError):
    """The operation is not available in this configuration."""

    default_reason = "UNIMPLEMENTED"


class Internal(BerthError):
    """A bug or an unexpected failure; never caused by the caller."""

    default_reason = "INTERNAL"
