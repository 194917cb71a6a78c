"""Image references and the registry HTTP API v2, for running images by
digest: resolving a tag to its manifest digest once (``berth deploy
--image``), and asking a registry why a reference cannot be pulled (the
scheduler on a cluster, where a node only reports ``No such image``).

A registry named in ``insecure`` (``HOST:PORT``, as Docker's
``insecure-registries``) is spoken to over plain HTTP; any other over HTTPS.
Anonymous bearer tokens are fetched when a registry asks for one."""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import requests

MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# A reference without a registry host means the engine's own default
# registry; Berth never guesses that host, it asks only registries named in
# the reference (or given with --image-registry).
DEFAULT_REGISTRY = ""
TIMEOUT = 5.0


class RegistryError(Exception):
    """The registry could not answer, or refused: ``message`` says why in
    the registry's (or the network's) own words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Reference:
    registry: str  # HOST[:PORT]; DEFAULT_REGISTRY ("") when the reference names none
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def by_digest(self) -> bool:
        return bool(self.digest)

    def with_digest(self, digest: str) -> str:
        host = f"{self.registry}/" if self.registry else ""
        return f"{host}{self.repository}@{digest}"


def parse(ref: str) -> Reference:
    """Splits ``[HOST[:PORT]/]REPO[:TAG][@sha256:...]`` (Docker's rules: the
    first component is a registry when it holds a dot or a colon or is
    ``localhost``)."""
    name, _, digest = ref.partition("@")
    if digest and not DIGEST.match(digest):
        raise ValueError(f"{ref!r}: the digest must be sha256:<64 hex digits>")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DEFAULT_REGISTRY, name if "/" in name else f"library/{name}"
    if not repository or not re.match(r"^[a-z0-9]+(?:[._/-][a-z0-9]+|__[a-z0-9]+)*$", repository):
        raise ValueError(f"{ref!r} is not an image reference")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def _base(r: Reference, insecure: Collection[str]) -> str:
    return f"{'http' if r.registry in insecure else 'https'}://{r.registry}"


def _anonymous_token(challenge: str, session: requests.Session) -> str:
    """A token for a ``Bearer realm=...,service=...,scope=...`` challenge."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = fields.pop("realm", "")
    if not realm:
        return ""
    answer = session.get(realm, params=fields, timeout=TIMEOUT)
    if answer.status_code != 200:
        return ""
    body = answer.json()
    return str(body.get("token") or body.get("access_token") or "")


def _manifest(r: Reference, insecure: Collection[str], method: str) -> requests.Response:
    if not r.registry:
        raise RegistryError(
            f"{r.repository}:{r.tag or r.digest} names no registry host: give HOST[:PORT]/REPOSITORY"
            " (the image registry's address) so its digest can be resolved"
        )
    url = f"{_base(r, insecure)}/v2/{r.repository}/manifests/{r.digest or r.tag}"
    headers = {"Accept": MANIFEST_TYPES}
    with requests.Session() as session:
        try:
            answer = session.request(method, url, headers=headers, timeout=TIMEOUT)
            challenge = answer.headers.get("WWW-Authenticate", "")
            if answer.status_code == 401 and challenge.lower().startswith("bearer "):
                token = _anonymous_token(challenge[7:], session)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                    answer = session.request(method, url, headers=headers, timeout=TIMEOUT)
        except requests.ConnectionError as exc:
            raise RegistryError(f"registry {r.registry} unreachable: {_root_cause(exc)}") from None
        except requests.Timeout:
            raise RegistryError(f"registry {r.registry} did not answer within {TIMEOUT:g} s") from None
        except requests.RequestException as exc:
            raise RegistryError(f"registry {r.registry}: {exc}") from None
        return answer


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None or exc.__cause__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return match.group(1) if match else text


def _registry_words(answer: requests.Response) -> str:
    """The registry's own error (``{"errors": [{"code", "message"}]}``), or the status."""
    try:
        items = answer.json().get("errors") or []
    except ValueError:
        items = []
    words = "; ".join(f"{e.get('message') or e.get('code')}" for e in items if isinstance(e, dict))
    return words or f"HTTP {answer.status_code}"


def resolve_digest(ref: str, *, insecure: Collection[str] = ()) -> str:
    """The manifest digest a reference names now (``Docker-Content-Digest``
    of a HEAD of its manifest); a reference by digest is returned as is."""
    r = parse(ref)
    if r.by_digest:
        return r.digest
    answer = _manifest(r, insecure, "HEAD")
    if answer.status_code == 200 and DIGEST.match(answer.headers.get("Docker-Content-Digest", "")):
        return answer.headers["Docker-Content-Digest"]
    if answer.status_code == 200:
        answer = _manifest(r, insecure, "GET")  # some registries send the digest on GET only
        if answer.status_code == 200 and DIGEST.match(answer.headers.get("Docker-Content-Digest", "")):
            return answer.headers["Docker-Content-Digest"]
        raise RegistryError(f"registry {r.registry} sent no digest for {ref}")
    if answer.request.method == "HEAD":
        answer = _manifest(r, insecure, "GET")  # a HEAD answer has no body: GET for the registry's words
    raise RegistryError(f"registry {r.registry} refused {r.repository}:{r.tag}: {_registry_words(answer)}")


def pull_problem(ref: str, *, insecure: Collection[str] = ()) -> str | None:
    """Why a node cannot pull ``ref``, in the registry's words ("manifest
    unknown", "repository name not known to registry", "connection
    refused"...), or None when the registry serves its manifest."""
    try:
        r = parse(ref)
    except ValueError as exc:
        return str(exc)
    try:
        answer = _manifest(r, insecure, "GET")
    except RegistryError as exc:
        return exc.message
    if answer.status_code == 200:
        return None
    return f"registry {r.registry} answered {answer.status_code}: {_registry_words(answer)}"
