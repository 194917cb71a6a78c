"""``berth dev``: the working directory as a live replica, through the
platform itself.

Why a deployment and not a container of its own: a replica's secret values
are resolved by the scheduler with the service token (the public Secrets API
never returns a value), so the only way to give the dev replica the same
secrets, ``PORT`` and ``BERTH_*`` variables as any replica, without secret
values ever leaving the platform, is to let the scheduler run it. Each build
is registered as a deployment of a dev environment of its own (default
``dev``, created on first use; managed, protected and gated environments are
refused), so no managed environment's pointer ever moves.

The session:

1. sweep: a deployment bound only to the dev environment is what an earlier
   session left (one that crashed before its cleanup); it is terminated, so
   the scheduler removes its containers;
2. build the directory as ``berth deploy`` does, deploy it to the dev
   environment, wait until its replica is ready, print its URL and stream
   its output (the replica containers carry the scheduler's ``berth.*``
   labels, ``berth.environment`` the dev environment's id);
3. poll the directory's files (mtime, size) every ``poll`` seconds; after a
   change, wait until nothing changed for a debounce period, then rebuild,
   deploy, and terminate the build it replaces;
4. on Ctrl-C (SIGINT) or SIGTERM terminate the session's deployments and
   wait (bounded) until the engine holds no container of theirs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from berth import errors, local
from berth.v1 import common_pb2, registry_pb2, scheduler_pb2

if TYPE_CHECKING:
    from berth.cli import Ctx

MANAGED_ENVIRONMENTS = frozenset({"preview", "staging", "production"})
DEPLOYMENT_LABEL = "berth.deployment"
DEBOUNCE_SECONDS = 0.3
MAX_FILES = 20000
REMOVAL_TIMEOUT = 60.0
IGNORED_DIRECTORIES = frozenset({".git", "__pycache__", ".venv", "node_modules"})


class _Stop(Exception):
    """SIGTERM, handled as Ctrl-C."""


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under ``root`` (bounded in count)."""
    files: dict[str, tuple[int, int]] = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in IGNORED_DIRECTORIES]
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # removed meanwhile
            files[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
            if len(files) >= MAX_FILES:
                return files
    return files


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def platform_runtime() -> str:
    path = local.data_dir() / local.PLATFORM_FILE
    try:
        return str(json.loads(path.read_text()).get("runtime", "local"))
    except (OSError, ValueError):
        return "local"


def dev_environment(ctx: Ctx, name: str) -> common_pb2.Environment:
    """The dev environment, created on first use; a managed, protected or
    gated one is refused (dev never moves their pointers)."""
    c = ctx.client()
    envs = c.list_all(c.registry.ListEnvironments, registry_pb2.ListEnvironmentsRequest(project=ctx.project),
                      "environments")
    env = next((e for e in envs if name in (e.name, e.id)), None)
    label = env.name if env is not None else name
    if label in MANAGED_ENVIRONMENTS or (env is not None and env.protected):
        raise errors.FailedPrecondition(
            f"berth dev does not run in environment {label!r}: it would move a managed environment's pointer",
            hint="use a dev environment of its own: berth dev -e dev (the default)", reason="MANAGED_ENVIRONMENT",
        )
    if env is None:
        env = c.call(c.registry.CreateEnvironment, registry_pb2.CreateEnvironmentRequest(project=ctx.project, name=name))
    gates = c.call(c.registry.ListEnvironmentGates, registry_pb2.ListEnvironmentGatesRequest(project=ctx.project))
    if any(g.environment_id == env.id for g in gates.gates):
        raise errors.FailedPrecondition(
            f"environment {env.name!r} is gated: berth dev does not run there", reason="GATED_ENVIRONMENT",
            hint="use a dev environment of its own: berth dev -e dev (the default)",
        )
    return env


def sweep(ctx: Ctx, env: common_pb2.Environment) -> list[str]:
    """Terminates the deployments bound to the dev environment and nowhere
    else (an earlier session's); returns their ids."""
    c = ctx.client()
    here = c.list_all(c.registry.ListBindings,
                      registry_pb2.ListBindingsRequest(project=ctx.project, environment=env.id), "bindings")
    swept = []
    for b in here:
        dep = b.deployment
        if dep.state == common_pb2.Deployment.STATE_TERMINATED:
            continue
        everywhere = c.list_all(c.registry.ListBindings,
                                registry_pb2.ListBindingsRequest(project=ctx.project, deployment_id=dep.id), "bindings")
        if all(x.environment_id == env.id for x in everywhere):
            c.call(c.registry.TerminateDeployment,
                   registry_pb2.TerminateDeploymentRequest(project=ctx.project, deployment_id=dep.id))
            swept.append(dep.id)
    return swept


class LogStreamer:
    """Streams the output of a deployment's containers to stderr, one thread
    per container, until the container goes."""

    def __init__(self, deployment_id: str) -> None:
        self.deployment_id = deployment_id
        self._seen: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._client: Any = None

    def poll(self) -> None:
        """Follows the containers of the deployment not followed yet."""
        import docker

        try:
            if self._client is None:
                self._client = docker.from_env(timeout=10)
            containers = self._client.containers.list(filters={"label": f"{DEPLOYMENT_LABEL}={self.deployment_id}"},
                                                ignore_removed=True)
        except Exception:  # noqa: BLE001 - the engine is busy or gone; the next poll retries
            return
        for container in containers:
            if container.id in self._seen:
                continue
            self._seen.add(container.id)
            thread = threading.Thread(target=self._follow, args=(container,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _follow(self, container: Any) -> None:
        prefix = f"[{self.deployment_id}] "
        try:
            for chunk in container.logs(stream=True, follow=True, since=int(time.time()) - 60):
                for line in chunk.decode(errors="replace").splitlines():
                    print(prefix + line, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - the container was removed: its stream ends
            return


def containers_of(deployment_ids: list[str]) -> list[Any]:
    import docker

    client = docker.from_env(timeout=30)
    found = []
    for dep in deployment_ids:
        found += client.containers.list(all=True, filters={"label": f"{DEPLOYMENT_LABEL}={dep}"}, ignore_removed=True)
    return found


@contextlib.contextmanager
def _sigterm_as_stop() -> Iterator[None]:
    def stop(*_: object) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(ctx: Ctx, path: pathlib.Path, environment: str, *, poll: float, timeout: float) -> None:
    from berth import cli

    root = path.resolve()
    if not root.is_dir():
        raise errors.InvalidArgument(f"{path} is not a directory", field="path")
    if not 0.05 <= poll <= 60:
        raise errors.InvalidArgument(f"--poll {poll} must be between 0.05 and 60 seconds", field="poll")
    if platform_runtime() != "local":
        raise errors.FailedPrecondition(
            "berth dev needs the platform's local engine, and this platform runs replicas on a swarm",
            hint="run 'berth up' (runtime local) on this machine", reason="ENGINE_NOT_LOCAL",
        )
    project_file = local.load_project_file(root)
    explicit, origin = ctx.project_and_origin()
    if origin in ("--project", "BERTH_PROJECT") or not project_file.project:
        ctx.use_project(explicit, origin)
    else:
        ctx.use_project(project_file.project, str(project_file.path))
    env = dev_environment(ctx, environment)
    c = ctx.client()
    swept = sweep(ctx, env)
    if swept:
        cli.err.print(f"[dim]swept an earlier dev session: terminated {', '.join(swept)}[/]", markup=True)
    config = common_pb2.WorkerConfig(
        port=project_file.port, health_path=project_file.health_path, command=project_file.command,
        variables=dict(project_file.variables),
        resources=common_pb2.Resources(memory_bytes=project_file.memory_bytes, cpus=project_file.cpus),
    )
    router = local.router_url()
    session: list[str] = []
    streamer: LogStreamer | None = None

    def build_and_run() -> None:
        nonlocal streamer
        image, image_id = cli.build_image(root, project_file.dockerfile, env.project_name, quiet=True)
        resp = c.call(c.registry.Deploy, registry_pb2.DeployRequest(
            project=env.project_id, image=image, image_id=image_id, config=config, environment=env.id,
            reason="berth dev"))
        dep = resp.deployment
        session.append(dep.id)
        status = cli.wait_for_binding(ctx, dep.id, env.id, timeout)
        if status is None or status.status != scheduler_pb2.BindingStatus.STATUS_RUNNING:
            cli.err.print(f"[bold red]{dep.id} is not running[/] (see: berth deployment errors {dep.id}); "
                          "fix the code, the next change rebuilds", markup=True)
        else:
            cli.out.print(f"Serving [bold]{dep.id}[/] at {router}  (headers X-Berth-Project: {env.project_name}, "
                          f"X-Berth-Environment: {env.name})", markup=True)
        if streamer is not None:
            streamer.close()
        streamer = LogStreamer(dep.id)
        streamer.poll()
        for old in session[:-1]:
            with contextlib.suppress(errors.BerthError):
                c.call(c.registry.TerminateDeployment,
                       registry_pb2.TerminateDeploymentRequest(project=env.project_id, deployment_id=old))

    try:
        with _sigterm_as_stop():
            files = snapshot(root)
            build_and_run()
            while True:
                time.sleep(poll)
                if streamer is not None:
                    streamer.poll()
                now = snapshot(root)
                if not changed(files, now):
                    continue
                # debounce: wait until the files stop changing (bounded)
                for _ in range(int(10 / DEBOUNCE_SECONDS)):
                    time.sleep(DEBOUNCE_SECONDS)
                    later = snapshot(root)
                    if later == now:
                        break
                    now = later
                cli.err.print(f"[dim]changed: {', '.join(changed(files, now)[:5])}; rebuilding[/]", markup=True)
                files = now
                try:
                    build_and_run()
                except errors.InvalidArgument as exc:  # a build that failed: wait for the next change
                    cli.err.print(f"[bold red]build failed:[/] {exc.message}", markup=True)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        cleanup(ctx, env, session)


def cleanup(ctx: Ctx, env: common_pb2.Environment, session: list[str]) -> None:
    """Terminates the session's deployments and waits until no container of
    theirs is left (bounded)."""
    from berth import cli

    if not session:
        return
    c = ctx.client()
    for dep in session:
        with contextlib.suppress(errors.BerthError):
            c.call(c.registry.TerminateDeployment,
                   registry_pb2.TerminateDeploymentRequest(project=env.project_id, deployment_id=dep))
    deadline = time.monotonic() + REMOVAL_TIMEOUT
    while time.monotonic() < deadline:
        try:
            left = containers_of(session)
        except Exception:  # noqa: BLE001 - engine unreachable: nothing more to wait for here
            return
        if not left:
            cli.err.print("dev session ended: its replicas are removed", markup=False)
            return
        time.sleep(0.3)
    cli.err.print(f"[yellow]warning:[/] containers of {', '.join(session)} still exist after "
                  f"{REMOVAL_TIMEOUT:.0f} s; the next 'berth dev' sweeps them", markup=True)
