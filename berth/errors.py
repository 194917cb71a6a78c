"""Errors shared by the services (raised by domain code) and the client
(raised from gRPC status codes). The mapping to gRPC codes lives in exactly two
places: ``services.common.server`` (domain -> status) and ``berth.client``
(status -> exception)."""
from __future__ import annotations


class BerthError(Exception):
    """Base of every error a caller can cause or act on."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidArgument(BerthError):
    """Bad input: the message names the field and why."""


class NotFound(BerthError):
    pass


class AlreadyExists(BerthError):
    pass


class FailedPrecondition(BerthError):
    """The current state forbids the operation."""


class Aborted(BerthError):
    """Lost a compare-and-swap; re-read and retry."""


class Unauthenticated(BerthError):
    pass


class PermissionDenied(BerthError):
    pass


class Unavailable(BerthError):
    """A dependency is down; retrying later may succeed."""


class Internal(BerthError):
    """A bug or an unexpected failure; never caused by the caller."""
