"""Syntax of Berth's ids, shared by the services that take them.

An id that cannot be one is ``INVALID_ARGUMENT`` (reason ``INVALID_ID``,
naming the field) before anything is looked up; a well-formed id that is not
the caller's is ``NOT_FOUND``, the same answer as one that does not exist, so
other tenants' ids are never confirmed."""
from __future__ import annotations

import re

from berth.errors import InvalidArgument

DEPLOYMENT_ID_PREFIX = "dep_"
DEPLOYMENT_ID_PATTERN = re.compile(r"^dep_[0-9a-f]{12}$")


def validate_deployment_id(value: str, *, field: str = "deployment_id") -> str:
    if not DEPLOYMENT_ID_PATTERN.match(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is not a deployment id ('dep_' and 12 lowercase hex digits)",
            field=field, reason="INVALID_ID",
        )
    return value


def deployment_not_found_message(deployment_id: str, project: str) -> str:
    """The registry's wording, so every service answers alike."""
    if project:
        return f"deployment {deployment_id!r} not found in project {project!r}"
    return f"deployment {deployment_id!r} not found"


_REFERENCE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


def validate_reference(value: str, *, field: str) -> str:
    """A name or id used to look something up (at most 80 letters, digits,
    '-', '_' and '.'): anything else cannot exist and is a caller error."""
    if not _REFERENCE_PATTERN.match(value):
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a valid name or id (at most 80 letters, digits, '-', '_' and '.')",
            field=field, reason="INVALID_ID",
        )
    return value
