"""Proto enums <-> the lowercase words of Berth's contract.

The public protos carry states and kinds as enums (``HistoryEntry.KIND_PROMOTE``,
AIP-216 style: nested, ``*_UNSPECIFIED = 0``); the CLI's JSON output, the REST
API and the services' own domain code speak the lowercase words DESIGN.md
names (``"promote"``). A value's word is its name without the enum's prefix,
lowercased: ``KIND_PROMOTE`` -> ``promote``, ``STATUS_SCALED_TO_ZERO`` ->
``scaled_to_zero``. These two functions are the only place that mapping
lives.

Proto3 enums are open: a newer server may send a number this client's stubs
do not know. :func:`label` reads it as ``"unknown"`` instead of raising, so an
older CLI or SDK keeps working against a newer platform.
"""
from __future__ import annotations

from typing import Any, TypeVar, cast

E = TypeVar("E", bound=int)
UNSPECIFIED = "unspecified"
UNKNOWN = "unknown"


def _prefix(enum_type: Any) -> str:
    zero = enum_type.DESCRIPTOR.values_by_number[0].name  # e.g. KIND_UNSPECIFIED
    if not zero.endswith("_UNSPECIFIED"):
        raise TypeError(f"{enum_type.DESCRIPTOR.full_name} has no *_UNSPECIFIED zero value")
    return zero[: -len("UNSPECIFIED")]


def label(enum_type: Any, number: int) -> str:
    """The contract's word for ``number``: ``"unspecified"`` for 0 and
    ``"unknown"`` for a number these stubs do not know (a newer server)."""
    value = enum_type.DESCRIPTOR.values_by_number.get(number)
    if value is None:
        return UNKNOWN
    if number == 0:
        return UNSPECIFIED
    return value.name[len(_prefix(enum_type)):].lower()


def number(enum_type: type[E], word: str) -> E:
    """The enum value named by the contract's ``word`` (``"promote"``); 0
    (``*_UNSPECIFIED``) for a word the enum does not have."""
    wrapper: Any = enum_type  # at run time an EnumTypeWrapper, a class in the stubs' .pyi
    value = wrapper.DESCRIPTOR.values_by_name.get(_prefix(wrapper) + word.upper())
    return cast(E, 0 if value is None else int(value.number))


def words(enum_type: Any) -> list[str]:
    """Every word of the enum but the zero value, in number order (for docs
    and OpenAPI ``enum`` lists)."""
    return [label(enum_type, v.number) for v in enum_type.DESCRIPTOR.values if v.number != 0]
