"""What a secret value may be. Shared by the secrets service, where values
enter (every path: gRPC, CLI, REST), and the router's REST API, which
answers 400/413 before calling the service. No dependencies beyond the
standard library, so the router can import it.

A value becomes an environment variable of the replicas, so it is text:
valid UTF-8 (the gRPC field is a proto ``string``, so the wire already
guarantees that; an in-process caller could still pass a lone surrogate),
never a NUL character (``execve`` cannot pass one: the container would fail
to start with an engine message quoting the value), and small.
"""
from __future__ import annotations

# 64 KiB of UTF-8 per value: a PEM certificate chain or a service-account key
# fits with room to spare; anything larger is data, not configuration, and
# every replica carries every value in its environment.
MAX_VALUE_BYTES = 64 * 1024


def value_content_problem(value: str) -> str | None:
    """Why ``value`` cannot be a secret's value (not counting its size), or
    None. Never quotes the value."""
    if not value:
        return "is empty; give the secret's value"
    nul = value.find("\x00")
    if nul >= 0:
        return (
            f"contains a NUL character (at position {nul}); an environment variable cannot hold one "
            "(encode binary values, e.g. with base64)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text (a lone surrogate at position {exc.start})"
    return None


def value_size_problem(value: str) -> str | None:
    """Why ``value`` is too large, or None. Assumes valid Unicode."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_VALUE_BYTES:
        return (f"is larger than {MAX_VALUE_BYTES // 1024} KiB: {size} bytes of UTF-8, at most {MAX_VALUE_BYTES} "
                "are allowed")
    return None
