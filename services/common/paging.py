"""Pagination of the public List RPCs (AIP-158): ``page_size`` (0 means the
default, at most ``MAX_PAGE_SIZE``; negative is INVALID_ARGUMENT) and an
opaque ``page_token`` that the previous page's ``next_page_token`` gave.

A token is the url-safe base64 (no padding) of a small JSON object: the
list it belongs to (``s``: the method and what the request named, e.g. the
project and environment) and the key of the last item returned (``k``). The
next page is read from the store with that key (keyset pagination: ``WHERE
(order columns) after key ... LIMIT page_size + 1``), so an item inserted
while a client pages neither repeats nor hides one on a later page. A token
that does not decode, or that another list (another method, project,
environment or filter) gave, is INVALID_ARGUMENT naming ``page_token``."""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from berth.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size cannot be negative (got {value})", field="page_size")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def encode_token(scope: str, key: Sequence[Any]) -> str:
    raw = json.dumps({"s": scope, "k": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: str) -> list[Any] | None:
    """The last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("k"), list):
            raise ValueError("not a token")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "page_token is not valid: pass next_page_token from the previous page unchanged", field="page_token"
        ) from None
    if data.get("s") != scope:
        raise InvalidArgument(
            "page_token belongs to another list: a token is valid only with the request that gave it "
            "(same method, project and filters)",
            field="page_token",
        )
    return data["k"]


def bad_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not valid: pass next_page_token from the previous page unchanged", field="page_token"
    )


def split(rows: Sequence[T], size: int) -> tuple[Sequence[T], bool]:
    """``rows`` were read with LIMIT size + 1: the page, and whether more follow."""
    return rows[:size], len(rows) > size
