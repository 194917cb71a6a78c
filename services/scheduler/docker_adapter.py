"""The only module that touches the Docker SDK.

Blocking SDK calls run in a small thread pool (about 4 threads: the engine is
the limit, see DOCKER-NOTES.md); pulls run in their own pool so a slow
registry cannot starve container operations. Docker errors are translated
here, once, into the scheduler's own exceptions below.

Fencing: with a ``fence`` (the scheduler's lease, ``lease.py``) every engine
write — create, start, stop, remove, pause, unpause, pull — first asks
``fence.ensure_leading()``, in the worker thread right before the SDK call,
and a scheduler that lost its lease gets ``LeaseLost`` instead of touching
the engine; every container created carries the fence's epoch as the
``berth.epoch`` label. Reads (list, inspect, images) are not fenced.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.utils import parse_repository_tag

from .lease import EPOCH_LABEL, Fence

log = logging.getLogger("berth.scheduler.docker")

T = TypeVar("T")

MANAGED_LABEL = "berth.managed"
INSTANCE_LABEL = "berth.instance"
PROJECT_LABEL = "berth.project"
ENVIRONMENT_LABEL = "berth.environment"
DEPLOYMENT_LABEL = "berth.deployment"
REPLICA_LABEL = "berth.replica"
GENERATION_LABEL = "berth.generation"
SPEC_HASH_LABEL = "berth.spec-hash"
RESTARTS_LABEL = "berth.restarts"  # replacements so far in this replica slot
CRASHES_LABEL = "berth.crashes"  # consecutive quick exits before this container


class EngineError(Exception):
    """Base of the scheduler's Docker errors; ``message`` is the engine's text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineUnavailable(EngineError):
    """The engine cannot be reached."""


class ContainerGone(EngineError):
    """The container vanished (NotFound): for a removal, that means done."""


class NameConflict(EngineError):
    """409: a container of that name exists already; re-read, do not fail."""


class StartFailed(EngineError):
    """The engine refused to create or start the container (bad command,
    invalid resources, port in use...). Any leftover container was removed."""


class PullFailed(EngineError):
    """The image could not be pulled (or not within the deadline)."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: Mapping[str, str]
    status: str
    exit_code: int
    oom_killed: bool
    error: str
    started_at: datetime | None
    finished_at: datetime | None
    ip: str


@dataclass(frozen=True)
class HostResources:
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class RunSpec:
    name: str
    image_id: str
    environment: Mapping[str, str] = field(repr=False)  # holds secret values: never logged
    labels: Mapping[str, str]
    command: Sequence[str] = ()
    mem_limit: int = 0
    nano_cpus: int = 0


_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?$")


def _parse_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    match = _TIME.match(value or "")
    if not match or value.startswith("0001-01-01"):  # type: ignore[union-attr]
        return None
    whole, frac, zone = match.groups()
    parsed = datetime.fromisoformat(f"{whole}.{(frac or '0')[:6]:0<6}{'+00:00' if zone in (None, 'Z') else zone}")
    return parsed.astimezone(UTC)


def _explanation(exc: docker.errors.APIError) -> str:
    text = exc.explanation
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return str(text or exc)


class DockerAdapter:
    # Creating ten containers took 1.06 s with 10 threads and ~1.5 s with 4
    # on this kind of machine (bench/scheduler_bench.py): the engine overlaps
    # the starts, so a wider pool pays off for bursts of creates.
    def __init__(
        self, client: docker.DockerClient, *, network: str = "bridge", workers: int = 8, fence: Fence | None = None
    ) -> None:
        self._client = client
        self.network = network
        self.fence = fence
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._pull_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="docker-pull")
        # Called (in the worker thread) with a container's id after it is
        # stopped and before it is removed: the crash-tail keeper (logs.py).
        self.before_remove: Callable[[str], None] | None = None

    async def _run(self, fn: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool or self._pool, functools.partial(_translated, fn, *args))

    def _fenced(self) -> dict[str, str]:
        """Raises ``LeaseLost`` unless the lease is held now; the labels
        stamping what this write creates with the lease's epoch."""
        if self.fence is None:
            return {}
        self.fence.ensure_leading()
        return {EPOCH_LABEL: str(self.fence.epoch)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pull_pool.shutdown(wait=False, cancel_futures=True)

    # -- containers ---------------------------------------------------------
    async def list_managed(self, instance: str, extra: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """Every container labelled ``berth.managed=true`` and this instance
        (plus ``extra`` label filters), whatever its state."""
        labels = [f"{MANAGED_LABEL}=true", f"{INSTANCE_LABEL}={instance}"]
        labels += [f"{k}={v}" for k, v in (extra or {}).items()]

        def list_() -> list[ContainerInfo]:
            found = self._client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)
            return [self._info(c.attrs) for c in found]

        return await self._run(list_)

    async def inspect(self, container_id: str) -> ContainerInfo:
        def inspect_() -> ContainerInfo:
            return self._info(self._client.api.inspect_container(container_id))

        return await self._run(inspect_)

    def _info(self, attrs: Mapping[str, Any]) -> ContainerInfo:
        state = attrs.get("State") or {}
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (networks.get(self.network) or {}).get("IPAddress") or ""
        return ContainerInfo(
            id=attrs["Id"],
            name=(attrs.get("Name") or "").lstrip("/"),
            labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
            status=state.get("Status", "dead"),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
            started_at=_parse_time(state.get("StartedAt")),
            finished_at=_parse_time(state.get("FinishedAt")),
            ip=ip,
        )

    async def run(self, spec: RunSpec) -> ContainerInfo:
        """Creates and starts a container (detached, ``init``, no restart
        policy: the scheduler replaces). On a start failure the leftover
        container is removed and ``StartFailed`` carries the engine's text."""

        def run_() -> ContainerInfo:
            epoch = self._fenced()
            kwargs: dict[str, Any] = {
                "name": spec.name,
                "environment": dict(spec.environment),
                "labels": {**spec.labels, **epoch},
                "detach": True,
                "init": True,
                "network": self.network,
            }
            if spec.command:
                kwargs["command"] = list(spec.command)
            if spec.mem_limit:
                kwargs["mem_limit"] = spec.mem_limit
                kwargs["memswap_limit"] = spec.mem_limit  # a hard limit: no swap beyond it
            if spec.nano_cpus:
                kwargs["nano_cpus"] = spec.nano_cpus
            try:
                container = self._client.containers.create(spec.image_id, **kwargs)
            except docker.errors.ImageNotFound as exc:
                raise StartFailed(_explanation(exc)) from None
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise NameConflict(_explanation(exc)) from None
                raise StartFailed(_explanation(exc)) from None
            try:
                self._fenced()
                container.start()
            except docker.errors.APIError as exc:
                message = _explanation(exc)
                try:
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass  # NotFound: gone already; otherwise the next pass removes it
                raise StartFailed(message) from None
            return self._info(self._client.api.inspect_container(container.id))

        return await self._run(run_)

    def _thaw(self, container_id: str) -> None:
        """A paused container gets no signal until thawed: unpaused before
        a stop, so SIGTERM is handled within the grace period."""
        try:
            self._client.api.unpause(container_id)
        except docker.errors.APIError:
            pass  # not paused (or gone): the stop decides

    async def stop(self, container_id: str, *, grace: float = 10.0, paused: bool = False) -> None:
        """Stops (SIGTERM, then ``grace`` seconds) without removing: the
        exited container stays as the record of what happened to it.
        ``paused``: it was last seen paused (thawed first)."""

        def stop_() -> None:
            self._fenced()
            if paused:
                self._thaw(container_id)
            try:
                self._client.api.stop(container_id, timeout=int(max(grace, 0)))
            except docker.errors.NotFound:
                return

        await self._run(stop_)

    async def pause(self, container_id: str) -> None:
        """Freezes a running container (``docker pause``: the cgroup
        freezer; its memory stays, it gets no CPU). Fenced."""

        def pause_() -> None:
            self._fenced()
            self._client.api.pause(container_id)

        await self._run(pause_)

    async def unpause(self, container_id: str) -> None:
        """Thaws a paused container. One that is not paused (thawed
        meanwhile) counts as done. Fenced."""

        def unpause_() -> None:
            self._fenced()
            try:
                self._client.api.unpause(container_id)
            except docker.errors.APIError as exc:
                if exc.status_code == 409 or "is not paused" in _explanation(exc):
                    return
                raise

        await self._run(unpause_)

    def memory_available(self) -> int | None:
        """Bytes of memory available on this host (``MemAvailable`` of
        /proc/meminfo), None when unknown. The local runtime's engine runs
        on this host; the paused tier stops paused replicas when this falls
        below its floor."""
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    async def host_resources(self) -> HostResources:
        """What the engine's host has (``docker info`` NCPU and MemTotal)."""

        def info() -> HostResources:
            data = self._client.info()
            return HostResources(cpus=int(data.get("NCPU") or 0), memory_bytes=int(data.get("MemTotal") or 0))

        return await self._run(info)

    async def remove(self, container_id: str, *, grace: float = 10.0, paused: bool = False) -> None:
        """Stops (SIGTERM, then ``grace`` seconds) and removes. A container
        that is already gone counts as removed. ``paused``: it was last seen
        paused (thawed first, so it gets its SIGTERM)."""

        def remove_() -> None:
            self._fenced()
            if paused:
                self._thaw(container_id)
            try:
                self._client.api.stop(container_id, timeout=int(max(grace, 0)))
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                pass  # not running, or being removed: remove(force) decides
            self._before_remove(container_id)
            try:
                self._fenced()  # the stop may have taken its whole grace period
                self._client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in _explanation(exc):
                    return
                raise

        await self._run(remove_)

    def _before_remove(self, container_id: str) -> None:
        if self.before_remove is None:
            return
        try:
            self.before_remove(container_id)
        except Exception:  # noqa: BLE001 - keeping a tail never blocks a removal
            log.exception("before_remove_failed", extra={"container": container_id[:12]})

    # -- logs (blocking: called from the log readers' own threads, logs.py) ----
    def inspect_with_environment(self, container_id: str) -> tuple[ContainerInfo, dict[str, str]]:
        """Blocking: a container and its environment (``NAME=value`` split),
        without what its image sets (same name and value); the values are
        for redaction only, never logged or answered."""
        try:
            attrs = self._client.api.inspect_container(container_id)
        except docker.errors.NotFound as exc:
            raise ContainerGone(_explanation(exc)) from None
        except docker.errors.APIError as exc:
            raise EngineError(_explanation(exc)) from None
        env = _environment((attrs.get("Config") or {}).get("Env"))
        try:  # what the image itself sets is not the replica's configuration: left out
            image_env = _environment((self._client.api.inspect_image(attrs.get("Image", "")).get("Config") or {})
                                     .get("Env"))
        except docker.errors.APIError:
            image_env = {}
        return self._info(attrs), {k: v for k, v in env.items() if image_env.get(k) != v}

    def open_log(
        self, container_id: str, stream: str, *, since: datetime | None, tail: int | None, follow: bool
    ) -> ContainerLog:
        """Blocking: one stream (``stdout`` or ``stderr``) of a container's
        log, with the engine's timestamps. ``tail`` None means all lines.
        ``ContainerLog.close`` (from any thread) ends a follow."""
        kwargs: dict[str, Any] = {
            "stdout": stream == "stdout", "stderr": stream == "stderr", "stream": True, "timestamps": True,
            "follow": follow, "tail": "all" if tail is None else max(tail, 0),
        }
        if since is not None:
            kwargs["since"] = max(since.timestamp(), 0.000001)  # a float: sub-second precision
        try:
            raw = self._client.api.logs(container_id, **kwargs)
        except docker.errors.NotFound as exc:
            raise ContainerGone(_explanation(exc)) from None
        except docker.errors.APIError as exc:
            raise EngineError(_explanation(exc)) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise EngineUnavailable(f"Docker engine unreachable: {exc}") from None
        return ContainerLog(raw)

    # -- images -------------------------------------------------------------
    async def image_id(self, ref: str) -> str | None:
        """The local image id for a reference or id, or None when absent."""

        def get() -> str | None:
            try:
                return self._client.images.get(ref).id
            except docker.errors.ImageNotFound:
                return None

        return await self._run(get)

    async def pull(self, ref: str, *, timeout: float) -> str:
        """Pulls ``ref`` explicitly and returns its image id. The SDK's
        timeout does not bound a pull, so this has its own deadline; the
        stream is checked for ``{"error": ...}`` items."""
        repository, tag = parse_repository_tag(ref)

        def pull_() -> str:
            self._fenced()
            try:
                for item in self._client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                    if isinstance(item, dict) and item.get("error"):
                        raise PullFailed(str(item.get("error")))
                return self._client.images.get(ref).id
            except docker.errors.APIError as exc:
                raise PullFailed(_explanation(exc)) from None

        try:
            async with asyncio.timeout(timeout):  # (not wait_for: it can swallow a cancellation on 3.11)
                return await self._run(pull_, pool=self._pull_pool)
        except TimeoutError:
            raise PullFailed(f"pulling {ref} did not finish within {timeout:g} s") from None


def _environment(items: Sequence[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or ():
        name, _, value = str(item).partition("=")
        env[name] = value
    return env


# A log line longer than this is cut (the engine itself splits lines at 16 KiB).
MAX_LOG_LINE = 8192


class ContainerLog:
    """Iterates ``(time, text)`` over one stream of a container's log (the
    engine's ``TIMESTAMP text`` lines, split and cut at ``MAX_LOG_LINE``
    bytes); ``close`` ends it from another thread."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self._raw.close()
        except Exception:  # noqa: BLE001 - closing a socket already gone
            pass

    def __iter__(self) -> Iterator[tuple[datetime, str]]:
        pending = b""
        try:
            for chunk in self._raw:
                if self.closed:
                    return
                pending += chunk
                while True:
                    cut = pending.find(b"\n")
                    if cut < 0:
                        if len(pending) > 2 * MAX_LOG_LINE + 64:  # a line with no end yet: cut it
                            parsed = _log_line(pending)
                            pending = b""
                            if parsed is not None:
                                yield parsed
                        break
                    line, pending = pending[:cut], pending[cut + 1:]
                    parsed = _log_line(line)
                    if parsed is not None:
                        yield parsed
            if pending and not self.closed:
                parsed = _log_line(pending)
                if parsed is not None:
                    yield parsed
        except (requests.exceptions.RequestException, OSError, ValueError):
            return  # the stream was closed under us (close) or the engine went away


def _log_line(line: bytes) -> tuple[datetime, str] | None:
    stamp, _, text = line.partition(b" ")
    when = _parse_time(stamp.decode("ascii", errors="replace"))
    if when is None:
        return None
    if text.endswith(b"\r"):
        text = text[:-1]
    if len(text) > MAX_LOG_LINE:
        text = text[:MAX_LOG_LINE] + f" [... {len(text) - MAX_LOG_LINE} bytes cut]".encode()
    return when, text.decode("utf-8", errors="replace")


def _translated(fn: Callable[..., T], *args: Any) -> T:
    """Runs a blocking SDK call, turning transport failures and unexpected
    NotFound into scheduler errors."""
    try:
        return fn(*args)
    except EngineError:
        raise
    except docker.errors.NotFound as exc:
        raise ContainerGone(_explanation(exc)) from None
    except docker.errors.APIError as exc:
        raise EngineError(_explanation(exc)) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise EngineUnavailable(f"Docker engine unreachable: {exc}") from None
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(str(exc)) from None
