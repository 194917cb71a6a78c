"""The router's in-memory view of the platform: which deployment each
environment points at (from the registry's watch), and which replica
addresses are ready for each binding (from the scheduler's watch).

Everything here is pure and synchronous: resolution is a dictionary lookup,
done once per request on the event loop, never an RPC.
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

RESOLVED_CACHE_SIZE = 4096  # resolutions remembered until the table changes (bounded whatever clients send)


@dataclass(frozen=True)
class EnvironmentEntry:
    id: str
    project_id: str
    project_name: str
    name: str
    deployment_id: str  # "" = nothing deployed yet
    sequence: int = 0  # of the latest history entry (read-your-write after a move)
    previous_deployment_id: str = ""  # where traffic falls back while the binding has failed
    # A running/paused canary: this share (percent, 0-100) of new requests
    # goes to the candidate's binding, the rest to the pointer's (stable).
    canary_deployment_id: str = ""
    canary_weight: int = 0


@dataclass(frozen=True)
class BindingEntry:
    project_id: str
    environment_id: str
    deployment_id: str
    state: str  # "active" | "terminated"
    serving: bool
    min_replicas: int = 0
    max_replicas: int = 0

    @property
    def active(self) -> bool:
        return self.state != "terminated"


@dataclass(frozen=True)
class Route:
    """Where one request goes: the binding (environment, deployment) that
    takes it. A request keeps its route until it finishes."""

    project_id: str
    project_name: str
    environment_id: str
    environment_name: str
    deployment_id: str
    fallback: bool = False  # the pointer's binding failed; served by the previous deployment

    @functools.cached_property
    def binding_key(self) -> tuple[str, str]:
        return (self.environment_id, self.deployment_id)

    @functools.cached_property
    def response_headers(self) -> bytes:
        """What the proxy adds to every response it relays on this route:
        which deployment answered (and that it was the fallback)."""
        headers = b"X-Berth-Deployment: " + self.deployment_id.encode() + b"\r\n"
        if self.fallback:
            headers += b"X-Berth-Fallback: 1\r\n"
        return headers


class RouteError(Exception):
    """Why a request cannot be routed; ``status`` and ``code`` become the
    HTTP error response, ``deployment_id`` is set once one was resolved."""

    def __init__(self, status: int, code: str, message: str, *, deployment_id: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.deployment_id = deployment_id


class RoutingTable:
    """Environments and bindings, indexed for lookup by name or id."""

    def __init__(self) -> None:
        self._environments: dict[str, EnvironmentEntry] = {}
        self._bindings: dict[tuple[str, str], BindingEntry] = {}
        # project id -> name, and name -> id (names are unique platform-wide)
        self._project_names: dict[str, str] = {}
        self._project_ids_by_name: dict[str, str] = {}
        # (project id, environment name) -> environment id
        self._env_by_name: dict[tuple[str, str], str] = {}
        # (project, environment, deployment) as requested -> (route, fallback route or None, environment);
        # emptied by every change, so a hit is what resolving again would give
        self._resolved: dict[tuple[str, str, str], tuple[Route, Route | None, EnvironmentEntry | None]] = {}
        # environment id -> (candidate route, weight) while it has a canary
        self._canary_routes: dict[str, Route] = {}
        # environment id -> requests split so far (the split is deterministic per counter)
        self._canary_counters: dict[str, int] = {}

    # -- changes -----------------------------------------------------------
    def upsert_environment(self, env: EnvironmentEntry) -> None:
        self._resolved.clear()
        self._canary_routes.pop(env.id, None)
        old = self._environments.get(env.id)
        if old is not None and old.name != env.name:
            self._env_by_name.pop((old.project_id, old.name), None)
        self._environments[env.id] = env
        self._env_by_name[(env.project_id, env.name)] = env.id
        self._note_project(env.project_id, env.project_name)

    def upsert_binding(self, binding: BindingEntry, project_name: str = "") -> None:
        self._resolved.clear()
        self._canary_routes.pop(binding.environment_id, None)
        self._bindings[(binding.environment_id, binding.deployment_id)] = binding
        self._note_project(binding.project_id, project_name)

    def delete_environment(self, environment_id: str) -> None:
        self._resolved.clear()
        self._canary_routes.pop(environment_id, None)
        env = self._environments.pop(environment_id, None)
        if env is not None:
            self._env_by_name.pop((env.project_id, env.name), None)
        for key in [k for k in self._bindings if k[0] == environment_id]:
            del self._bindings[key]

    def _note_project(self, project_id: str, project_name: str) -> None:
        if not project_id or not project_name:
            return
        self._resolved.clear()
        old = self._project_names.get(project_id)
        if old is not None and old != project_name and self._project_ids_by_name.get(old) == project_id:
            del self._project_ids_by_name[old]
        self._project_names[project_id] = project_name
        self._project_ids_by_name[project_name] = project_id

    # -- queries -----------------------------------------------------------
    @property
    def environments(self) -> Mapping[str, EnvironmentEntry]:
        return self._environments

    @property
    def bindings(self) -> Mapping[tuple[str, str], BindingEntry]:
        return self._bindings

    def project_id(self, project: str) -> str | None:
        if project in self._project_names:
            return project
        found = self._project_ids_by_name.get(project)
        if found is None and project.lower() != project:
            found = self._project_ids_by_name.get(project.lower())
        return found

    def environment(self, project_id: str, environment: str) -> EnvironmentEntry | None:
        env = self._environments.get(environment)
        if env is not None and env.project_id == project_id:
            return env
        env_id = self._env_by_name.get((project_id, environment))
        if env_id is None and environment.lower() != environment:
            env_id = self._env_by_name.get((project_id, environment.lower()))
        return self._environments.get(env_id) if env_id else None

    def resolve(
        self, project: str, environment: str, deployment: str = "", endpoints: EndpointSet | None = None
    ) -> Route:
        """The route for a request addressed to ``project``/``environment``
        (each a name or an id), optionally pinned to ``deployment``.
        Raises ``RouteError`` with a message a person can act on.

        With ``endpoints``: when the pointer's binding has failed and the
        previous deployment's binding in the same environment is active, the
        route falls back to it (``Route.fallback``), woken like any binding
        if it was scaled to zero. A pinned request never falls back. A
        terminated deployment is answered at once (503
        ``deployment_terminated``), never waited for."""
        key = (project, environment, deployment)
        resolved = self._resolved.get(key)
        if resolved is None:
            resolved = self._resolve(project, environment, deployment)
            if len(self._resolved) >= RESOLVED_CACHE_SIZE:
                self._resolved.clear()
            self._resolved[key] = resolved
        route, fallback, env = resolved
        if env is not None and env.canary_weight > 0 and env.canary_deployment_id:
            candidate = self._canary_route(env, route)
            # Only to a candidate with a ready replica (when the caller knows):
            # a request never waits on a candidate still starting.
            if candidate is not None and (endpoints is None or endpoints.get(candidate.binding_key)):
                count = self._canary_counters.get(env.id, 0)
                self._canary_counters[env.id] = count + 1
                if canary_pick(count, env.canary_weight):
                    return candidate
        if fallback is not None and endpoints is not None and env is not None and (
            endpoints.status((env.id, env.deployment_id)) == "failed"
        ):
            return fallback
        return route

    def _canary_route(self, env: EnvironmentEntry, stable: Route) -> Route | None:
        """The candidate's route of ``env``'s canary, None while its binding
        is not known active (then the stable takes everything)."""
        cached = self._canary_routes.get(env.id)
        if cached is not None:
            return cached
        binding = self._bindings.get((env.id, env.canary_deployment_id))
        if binding is None or not binding.active:
            return None
        route = Route(stable.project_id, stable.project_name, env.id, env.name, env.canary_deployment_id)
        self._canary_routes[env.id] = route
        return route

    def _resolve(
        self, project: str, environment: str, deployment: str
    ) -> tuple[Route, Route | None, EnvironmentEntry | None]:
        """``resolve`` without the endpoint check: the route, the fallback
        route if the environment has a previous deployment, the environment."""
        project_id = self.project_id(project)
        if project_id is None:
            raise RouteError(404, "project_not_found", f"no project named or with id {project!r}")
        project_name = self._project_names.get(project_id, "")
        env = self.environment(project_id, environment)
        if env is None:
            raise RouteError(
                404,
                "environment_not_found",
                f"project {project_name!r} has no environment named or with id {environment!r}",
            )
        if deployment:
            binding = self._bindings.get((env.id, deployment))
            if binding is None or not binding.active:
                binding = next(
                    (
                        b
                        for b in self._bindings.values()
                        if b.project_id == project_id and b.deployment_id == deployment and b.active
                    ),
                    None,
                )
            if binding is None and self._terminated(env.id, deployment):
                raise _terminated(deployment, env.name)
            if binding is None:
                raise RouteError(
                    404,
                    "deployment_not_bound",
                    f"deployment {deployment!r} is not bound to environment {env.name!r} nor active in any "
                    f"environment of project {project_name!r}; promote it first or drop the X-Berth-Deployment header",
                )
            bound_env = self._environments.get(binding.environment_id, env)
            return Route(project_id, project_name, bound_env.id, bound_env.name, deployment), None, None
        if not env.deployment_id:
            raise RouteError(
                404,
                "no_deployment",
                f"environment {env.name!r} of project {project_name!r} has no deployment yet; "
                f"deploy one with `berth deploy --env {env.name}`",
            )
        if self._terminated(env.id, env.deployment_id):
            raise _terminated(env.deployment_id, env.name)
        fallback = None
        previous = self._bindings.get((env.id, env.previous_deployment_id)) if env.previous_deployment_id else None
        if previous is not None and previous.active:
            fallback = Route(project_id, project_name, env.id, env.name, env.previous_deployment_id, fallback=True)
        return Route(project_id, project_name, env.id, env.name, env.deployment_id), fallback, env

    def _terminated(self, environment_id: str, deployment_id: str) -> bool:
        binding = self._bindings.get((environment_id, deployment_id))
        return binding is not None and not binding.active


def canary_pick(counter: int, weight: int) -> bool:
    """Whether request number ``counter`` of a canary goes to the candidate:
    exactly ``weight`` of every 100 consecutive requests do, scattered
    (counter x 37 + block mod 100 visits every residue once per 100, and any regular
    subsequence, e.g. every second request, keeps the ratio), so the split
    holds over any window of a few hundred requests. A client stays on one
    side by sending back the ``X-Berth-Deployment`` every response carries
    (pinning wins over the split)."""
    return (counter * 37 + counter // 100) % 100 < weight


def _terminated(deployment_id: str, environment_name: str) -> RouteError:
    return RouteError(
        503,
        "deployment_terminated",
        f"deployment {deployment_id} serving environment {environment_name!r} was terminated; start it again with "
        f"`berth deployment start {deployment_id}`, or move the environment with `berth rollback --environment "
        f"{environment_name}` or `berth promote`",
        deployment_id=deployment_id,
    )


def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """``{environment}.{project}.{domain}[:port]`` -> (project, environment),
    or None when the host is not of that form."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal is never a routed name
        return None
    host = host.rsplit(":", 1)[0] if ":" in host else host
    host = host.rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not host.endswith(suffix):
        return None
    labels = host[: -len(suffix)]
    environment, _, project = labels.partition(".")
    if not environment or not project:
        return None
    return project, environment


class EndpointSet:
    """Ready replica addresses per binding (environment id, deployment id),
    replaced whole on every scheduler snapshot. Waiters are woken on change."""

    def __init__(self) -> None:
        self._addresses: dict[tuple[str, str], tuple[str, ...]] = {}
        self._status: dict[tuple[str, str], str] = {}
        self._failed_since: dict[tuple[str, str], float] = {}  # wall-clock time this process first saw "failed"
        self._changed: asyncio.Future[None] | None = None
        self.waiting = 0  # requests currently held for a ready replica

    def replace(
        self, sets: Iterable[tuple[str, str, Iterable[str]]], statuses: Mapping[tuple[str, str], str] | None = None
    ) -> set[str]:
        """Installs a complete snapshot; returns the addresses that left
        every set (no new request goes to them from now on)."""
        fresh: dict[tuple[str, str], tuple[str, ...]] = {}
        for environment_id, deployment_id, addresses in sets:
            merged = fresh.get((environment_id, deployment_id), ()) + tuple(a for a in addresses if a)
            fresh[(environment_id, deployment_id)] = tuple(dict.fromkeys(merged))
        before = {a for addresses in self._addresses.values() for a in addresses}
        after = {a for addresses in fresh.values() for a in addresses}
        self._addresses = fresh
        self._status = dict(statuses or {})
        now = time.time()
        self._failed_since = {
            key: self._failed_since.get(key, now) for key, status in self._status.items() if status == "failed"
        }
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
        return before - after

    def get(self, key: tuple[str, str]) -> tuple[str, ...]:
        return self._addresses.get(key, ())

    def status(self, key: tuple[str, str]) -> str:
        """The binding's status as the scheduler last reported it ("" if unknown)."""
        return self._status.get(key, "")

    def failed_since(self, key: tuple[str, str]) -> float | None:
        """Since when (Unix time, as this router first saw it) the binding
        has been reported ``failed`` without a break; None if it is not."""
        return self._failed_since.get(key)

    def snapshot(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return dict(self._addresses)

    def changed(self) -> asyncio.Future[None]:
        """A future completed at the next ``replace``."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def wait_for(self, key: tuple[str, str], timeout: float) -> tuple[str, ...]:
        """The binding's addresses, waiting up to ``timeout`` seconds for at
        least one; () when none became ready in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            addresses = self.get(key)
            if addresses:
                return addresses
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ()
            self.waiting += 1
            try:
                async with asyncio.timeout(remaining):  # (not wait_for: it can swallow a cancellation on 3.11)
                    await asyncio.shield(self.changed())
            except TimeoutError:
                return ()
            finally:
                self.waiting -= 1


class RoutingState:
    """What the proxy reads: the current table (replaced whole when a new
    registry snapshot completes) and the endpoint sets."""

    def __init__(self, table: RoutingTable | None = None, endpoints: EndpointSet | None = None) -> None:
        self.table = table or RoutingTable()
        self.endpoints = endpoints or EndpointSet()
        self.revision = 0  # the registry revision the table reflects
        # False from the router's start until the registry's first snapshot:
        # an empty table then means "not loaded", not "no such project".
        self.loaded = True
        self._table_changed: asyncio.Future[None] | None = None
        self.on_revision: Callable[[int], None] | None = None  # told each revision applied (worker processes)

    def table_updated(self) -> None:
        """Called by the registry watcher after it applied changes."""
        if self.on_revision is not None:
            self.on_revision(self.revision)
        if self._table_changed is not None and not self._table_changed.done():
            self._table_changed.set_result(None)
        self._table_changed = None

    def environment_sequence(self, environment_id: str) -> int:
        env = self.table.environments.get(environment_id)
        return env.sequence if env is not None else -1

    async def wait_for_sequence(self, environment_id: str, sequence: int, timeout: float) -> bool:
        """Waits (bounded) until the table shows ``environment_id`` at
        ``sequence`` or later: after a pointer move returns, the router's own
        table routes new requests by it (read your own write)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.environment_sequence(environment_id) < sequence:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._table_changed is None or self._table_changed.done():
                self._table_changed = loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(self._table_changed)
            except TimeoutError:
                return self.environment_sequence(environment_id) >= sequence
        return True
