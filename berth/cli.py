"""The ``berth`` command line: a thin wrapper over the gRPC services.

Human output goes to a terminal as tables; ``--output json`` prints
``{"data": ...}`` on stdout, or ``{"error": {...}}`` on stderr with a
non-zero exit code.
"""
from __future__ import annotations

import functools
import getpass
import json
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from berth import enums, errors, local
from berth.client import Client, error_from_rpc
from berth.sdk import Berth
from berth.shapes import (
    api_key_json,
    binding_json,
    binding_status,
    canary_json,
    canary_state,
    deployment_json,
    deployment_state,
    entry_json,
    environment_json,
    error_json,
    error_kind,
    log_line_json,
    parse_canary_plan,
    secret_json,
    secret_scope,
    status_json,
    timestamp,
)
from berth.v1 import common_pb2, registry_pb2, scheduler_pb2

EXIT_CODES: dict[type[errors.BerthError], int] = {
    errors.InvalidArgument: 2,
    errors.NotFound: 3,
    errors.Unauthenticated: 4,
    errors.PermissionDenied: 4,
    errors.FailedPrecondition: 5,
    errors.Aborted: 6,
    errors.AlreadyExists: 7,
    errors.Unavailable: 8,
}
ERROR_CODES: dict[type[errors.BerthError], str] = {
    errors.InvalidArgument: "invalid_argument",
    errors.NotFound: "not_found",
    errors.AlreadyExists: "already_exists",
    errors.FailedPrecondition: "failed_precondition",
    errors.Aborted: "aborted",
    errors.Unauthenticated: "unauthenticated",
    errors.PermissionDenied: "permission_denied",
    errors.Unavailable: "unavailable",
    errors.Internal: "internal",
}

# Piped output is not cut to 80 columns: ids must stay whole for scripts.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 250)


class Ctx:
    def __init__(self, output: str, project: str | None) -> None:
        self.output = output
        self._project = project
        self._origin = "--project" if project else ""
        self._client: Client | None = None
        self._sdk: Berth | None = None

    @property
    def json(self) -> bool:
        return self.output == "json"

    @property
    def project(self) -> str:
        return self.project_and_origin()[0]

    def project_and_origin(self) -> tuple[str, str]:
        """The project and where it came from (the flag, the variable, or
        the berth.toml that names it; "" when nothing names one)."""
        if self._project:
            return self._project, self._origin
        if os.environ.get("BERTH_PROJECT"):
            return os.environ["BERTH_PROJECT"], "BERTH_PROJECT"
        found = local.load_project_file(pathlib.Path.cwd())
        return found.project, str(found.path) if found.project else ""

    def use_project(self, project: str, origin: str) -> None:
        self._project, self._origin = project, origin

    @staticmethod
    def _key(api_key: str | None) -> str:
        key = api_key if api_key is not None else os.environ.get("BERTH_API_KEY", "")
        if not key:
            raise errors.Unauthenticated(
                "no API key: set BERTH_API_KEY", hint="'berth projects create NAME' prints a project's first key"
            )
        return key

    def client(self, api_key: str | None = None) -> Client:
        if self._client is None:
            self._client = Client(api_key=self._key(api_key), endpoints=local.endpoints())
        return self._client

    def sdk(self, api_key: str | None = None) -> Berth:
        """The typed SDK client (berth.sdk) with the same key and addresses
        as :meth:`client`; the commands moved to the SDK use it."""
        if self._sdk is None:
            self._sdk = Berth(self._key(api_key), endpoints=local.endpoints())
        return self._sdk

    def emit(self, data: dict[str, Any], human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps({"data": data}, indent=2, sort_keys=False))
        else:
            human()


def fail(ctx: Ctx | None, error: errors.BerthError) -> None:
    code = next((c for cls, c in ERROR_CODES.items() if isinstance(error, cls)), "internal")
    if isinstance(error, errors.Unavailable) and "connect" in error.message.lower():
        error.hint = error.hint or "is the platform running? start it with 'berth up'"
    if ctx is not None and ctx.json:
        body: dict[str, Any] = {"code": code, "message": error.message}
        if error.hint:
            body["hint"] = error.hint
        # reason, field/description, resource, metadata (google.rpc.Status details)
        body.update(error.details())
        click.echo(json.dumps({"error": body}), err=True)
    else:
        err.print(f"[bold red]error:[/] {error.message}", markup=True)
        if error.hint:
            err.print(f"[dim]hint:[/] {error.hint}", markup=True)
    sys.exit(next((c for cls, c in EXIT_CODES.items() if isinstance(error, cls)), 1))


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Adds --output and --project and turns Berth errors into one clear line."""

    @click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", help="Output format.")
    @click.option("--project", "-p", default=None, help="Project name or id (default: BERTH_PROJECT or berth.toml).")
    @functools.wraps(fn)
    def wrapper(output: str, project: str | None, **kwargs: Any) -> None:
        ctx = Ctx(output, project)
        try:
            fn(ctx, **kwargs)
        except errors.BerthError as error:
            fail(ctx, error)
        finally:
            if ctx._client is not None:
                ctx._client.close()

    return wrapper


def environment_option(*names: str, default: str = "", required: bool = False, help: str = "",
                       dest: str = "environment") -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The environment flag, spelled the same on every command that names
    one: ``-e``, ``--env`` and ``--environment`` (plus ``names``, such as
    promote's ``--to``). A name or an id."""
    return click.option(*names, "--environment", "--env", "-e", dest, default=default, required=required,
                        show_default=bool(default), help=help or "Environment (name or id).")


def table(*columns: str) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    return t


def short_time(ts: str) -> str:
    return ts.replace("T", " ")[:19] if ts else "-"


# ---------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="berth")
def main() -> None:
    """Berth: deploy immutable builds, promote them between environments, roll back precisely."""


# ---------------------------------------------------------------- berth up


@main.command()
@click.option("--data-dir", default=None, help="Where the platform keeps its state (default ~/.local/share/berth).")
@click.option("--database-url", default=None, envvar="BERTH_DATABASE_URL", help="Registry database (default: SQLite in the data dir).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--router-port", default=8080, envvar="BERTH_ROUTER_PORT", show_default=True)
@click.option("--registry-port", default=50051, envvar="BERTH_REGISTRY_PORT", show_default=True)
@click.option("--secrets-port", default=50052, envvar="BERTH_SECRETS_PORT", show_default=True)
@click.option("--scheduler-port", default=50053, envvar="BERTH_SCHEDULER_PORT", show_default=True)
@click.option("--domain", default="localhost", envvar="BERTH_DOMAIN", show_default=True)
@click.option("--instances", default=1, envvar="BERTH_INSTANCES", show_default=True, type=int,
              help="Instances of each service (needs --database-url postgresql://...): instance i listens on each "
                   "port + 100*i; one scheduler leads, the others stand by.")
@click.option("--runtime", type=click.Choice(["local", "swarm"]), default="local", envvar="BERTH_RUNTIME",
              show_default=True, expose_value=False, callback=lambda _c, _p, v: use_runtime(v),
              help="Where replicas run: this Docker engine, or the Docker Swarm whose manager DOCKER_HOST names.")
@click.option("--image-registry", default="", envvar="BERTH_IMAGE_REGISTRY", metavar="HOST:PORT", expose_value=False,
              callback=lambda _c, _p, v: use_image_registry(v),
              help="Registry 'berth deploy' pushes to; replicas run from it by digest (plain HTTP, as the "
                   "nodes' insecure-registries).")
@click.option("--detach", "-d", is_flag=True, help="Run in the background; return once the platform serves.")
def up(data_dir: str | None, database_url: str | None, host: str, router_port: int, registry_port: int,
       secrets_port: int, scheduler_port: int, domain: str, instances: int, detach: bool) -> None:
    """Run the whole platform here until interrupted (replicas keep running)."""
    from berth.platform import ConfigError, Platform, PlatformConfig, start_detached

    config = PlatformConfig(
        data_dir=local.data_dir(data_dir), host=host, registry_port=registry_port, secrets_port=secrets_port,
        scheduler_port=scheduler_port, router_port=router_port, database_url=database_url or "", domain=domain,
        instances=instances,
    )
    try:
        config.check()
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    if detach:
        args = [a for a in sys.argv[1:] if a not in ("--detach", "-d")]
        try:
            print(start_detached(local.data_dir(data_dir), args), end="")
        except RuntimeError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            sys.exit(8)
        return

    platform = Platform(config)
    stopping = {"flag": False}

    def request_stop(*_: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        # one berth up per data dir; stops what a killed one left; refuses taken ports
        platform.start()
    except RuntimeError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(8)
    for record in platform.leftovers:
        out.print(f"stopped {record.name} (pid {record.pid}), left running by a previous berth up")
    try:
        status = platform.wait_healthy(timeout=90)
        if not all(status.values()):
            down = ", ".join(n for n, ok in status.items() if not ok)
            err.print(f"[bold red]error:[/] not serving after 90 s: {down}; logs in {config.data_dir / 'logs'}")
            sys.exit(8)
        out.print(f"Berth is up (data in {config.data_dir})")
        if instances == 1:
            out.print(f"  router    http://{host}:{router_port}")
            out.print(f"  registry  {host}:{registry_port}   secrets {host}:{secrets_port}   scheduler {host}:{scheduler_port}")
        else:
            out.print(f"  routers   {', '.join(f'http://{host}:{config.port(router_port, i)}' for i in range(instances))}")
            out.print(f"  registry  {config.addrs(registry_port)}")
            out.print(f"  secrets   {config.addrs(secrets_port)}")
            out.print(f"  scheduler {config.addrs(scheduler_port)}   (one leads, {instances - 1} stand by)")
        out.print("  create a project: berth projects create NAME   (Ctrl-C stops the platform; replicas keep running)")
        platform.supervise(lambda: stopping["flag"])
    except RuntimeError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(8)
    finally:
        platform.stop()


@main.command()
@click.option("--data-dir", default=None, help="The data directory of the platform to stop.")
def down(data_dir: str | None) -> None:
    """Stop a platform started with 'berth up' (replicas keep running).

    Also stops whatever a killed 'berth up' left running (recorded in <data dir>/run).
    """
    from berth.platform import stop_running

    directory = local.data_dir(data_dir)
    stopped = stop_running(directory)
    if stopped:
        out.print(f"Berth is down: stopped {', '.join(stopped)} "
                  "(replicas keep running; the next 'berth up' adopts them)")
    else:
        out.print(f"No platform is running from {directory}")


# ---------------------------------------------------------------- projects


@main.group()
def projects() -> None:
    """Create and inspect projects."""


@projects.command("create")
@click.argument("name")
@click.option("--print-env", is_flag=True, help='Print only shell exports: eval "$(berth projects create NAME --print-env)".')
@command
def projects_create(ctx: Ctx, name: str, print_env: bool) -> None:
    """Create a project; prints its id and first API key (shown once)."""
    admin = local.admin_key()
    if not admin:
        raise errors.Unauthenticated(
            "no admin key found", hint="run 'berth up' on this machine first, or set BERTH_ADMIN_KEY"
        )
    resp = ctx.sdk(api_key=admin).create_project(name)
    data = {"project": {"id": resp.project.id, "name": resp.project.name}, "api_key": resp.api_key}

    if print_env and not ctx.json:
        click.echo(f"export BERTH_API_KEY={resp.api_key}\nexport BERTH_PROJECT={resp.project.name}")
        return

    def human() -> None:
        out.print(f"Created project [bold]{resp.project.name}[/] ({resp.project.id})")
        out.print("Its API key, shown only once:")
        out.print(f"  export BERTH_API_KEY={resp.api_key}")
        out.print(f"  export BERTH_PROJECT={resp.project.name}")

    ctx.emit(data, human)


# ---------------------------------------------------------------- environments


@main.group("env")
def env_group() -> None:
    """List, create and delete environments."""



@env_group.command("list")
@command
def env_list(ctx: Ctx) -> None:
    envs = [e.raw for e in ctx.sdk().list_environments(ctx.project)]

    def human() -> None:
        t = table("ENVIRONMENT", "ID", "DEPLOYMENT", "SEQUENCE", "PROTECTED")
        for e in envs:
            t.add_row(e.name, e.id, e.deployment_id or "-", str(e.sequence), "yes" if e.protected else "")
        out.print(t)

    ctx.emit({"environments": [environment_json(e) for e in envs]}, human)


@env_group.command("create")
@click.argument("name")
@command
def env_create(ctx: Ctx, name: str) -> None:
    e = ctx.sdk().create_environment(ctx.project, name).raw
    ctx.emit({"environment": environment_json(e)}, lambda: out.print(f"Created environment [bold]{e.name}[/] ({e.id})"))


@env_group.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Also delete an environment that points to a deployment, with its bindings and history "
              "(its replicas stop, routing to it ends).")
@click.option("--yes", is_flag=True, help="Confirm --force (asked on a terminal); needed for a protected environment.")
@command
def env_delete(ctx: Ctx, name: str, force: bool, yes: bool) -> None:
    """Delete an environment nothing points to (--force: any, with its bindings and history)."""
    berth = ctx.sdk()
    if force and not yes:
        if not sys.stdin.isatty():
            raise errors.FailedPrecondition(
                f"deleting environment {name!r} with --force needs confirmation, and there is no terminal to ask on",
                hint="pass --yes to confirm",
            )
        question = (f"Delete environment '{name}' with its bindings and history? "
                    "Its replicas stop and routing to it ends")
        if not click.confirm(question, default=False, err=True):
            raise errors.FailedPrecondition(f"not confirmed: '{name}' was not deleted", hint="pass --yes to skip the prompt")
        yes = True
    e = berth.delete_environment(ctx.project, name, force=force, confirm=force and yes).raw
    ctx.emit({"environment": environment_json(e)}, lambda: out.print(f"Deleted environment [bold]{e.name}[/] ({e.id})"))


# ---------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """Create, list and revoke a project's API keys."""



@keys.command("create")
@click.argument("name")
@command
def keys_create(ctx: Ctx, name: str) -> None:
    """Create a named key; the key itself is shown once."""
    resp = ctx.sdk().create_api_key(ctx.project, name)

    def human() -> None:
        out.print(f"Created key [bold]{resp.key.name}[/] ({resp.key.id}); shown only once:")
        out.print(f"  {resp.api_key}")

    ctx.emit({"key": api_key_json(resp.key.raw), "api_key": resp.api_key}, human)


@keys.command("list")
@command
def keys_list(ctx: Ctx) -> None:
    rows = [api_key_json(k.raw) for k in ctx.sdk().list_api_keys(ctx.project)]

    def human() -> None:
        t = table("NAME", "ID", "PREFIX", "CREATED", "REVOKED")
        for r in rows:
            t.add_row(r["name"], r["id"], r["prefix"] + "…", short_time(r["created_at"]), short_time(r["revoked_at"]) if r["revoked_at"] else "")
        out.print(t)

    ctx.emit({"keys": rows}, human)


@keys.command("revoke")
@click.argument("key")
@command
def keys_revoke(ctx: Ctx, key: str) -> None:
    """Revoke a key by name or id; every service refuses it before this returns."""
    k = ctx.sdk().revoke_api_key(ctx.project, key).raw
    ctx.emit({"key": api_key_json(k)}, lambda: out.print(f"Revoked key [bold]{k.name}[/] ({k.id})"))


# ---------------------------------------------------------------- deploy


def build_image(path: pathlib.Path, dockerfile: str, project: str, quiet: bool) -> tuple[str, str]:
    """Builds PATH with the local Docker engine; returns (tag, image id)."""
    import docker

    if not (path / dockerfile).is_file():
        raise errors.InvalidArgument(f"no {dockerfile} in {path}", hint="give a directory with a Dockerfile, or use --image REF")
    try:
        api = docker.from_env(timeout=600).api if os.environ.get("DOCKER_HOST") else docker.APIClient(timeout=600)
        api.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no engine"
        raise errors.Unavailable(f"cannot reach the Docker engine to build: {exc}", hint="is dockerd running?") from None
    image_id = ""
    for chunk in api.build(path=str(path), dockerfile=dockerfile, rm=True, decode=True, labels={"berth.project": project or ""}):
        if "error" in chunk:
            raise errors.InvalidArgument(f"image build failed: {chunk['error'].strip()}")
        if "stream" in chunk and not quiet:
            text = chunk["stream"].rstrip()
            if text:
                err.print(f"[dim]{text}[/]", markup=True)
        aux = chunk.get("aux") or {}
        if "ID" in aux:
            image_id = aux["ID"]
    if not image_id:
        raise errors.InvalidArgument("image build finished without an image id")
    tag = f"berth/{project or 'local'}:{image_id.split(':', 1)[1][:12]}"
    repo, version = tag.rsplit(":", 1)
    api.tag(image_id, repo, version)
    return tag, image_id


def use_runtime(runtime: str) -> str:
    """``berth up --runtime``: swarm needs DOCKER_HOST to name a swarm
    manager (checked now, so the error is one line, not a scheduler that
    never serves); the scheduler child reads BERTH_RUNTIME."""
    if runtime == "swarm":
        import docker
        import requests

        where = os.environ.get("DOCKER_HOST") or "the default Docker socket"
        try:
            swarm = docker.from_env(version="1.41", timeout=10).info().get("Swarm") or {}
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise click.BadParameter(f"swarm needs DOCKER_HOST to name a swarm manager; {where} cannot be "
                                     f"reached: {exc}", param_hint="--runtime") from None
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            what = "a swarm worker" if swarm.get("LocalNodeState") == "active" else "not in a swarm"
            raise click.BadParameter(f"swarm needs DOCKER_HOST to name a swarm manager; {where} is {what}",
                                     param_hint="--runtime")
    os.environ["BERTH_RUNTIME"] = runtime
    return runtime


def use_image_registry(registry: str) -> str:
    """``berth up --image-registry``: HOST:PORT, passed to the scheduler
    (BERTH_IMAGE_REGISTRY) and recorded in the platform file for the CLI."""
    registry = registry.strip()
    if registry and ("/" in registry or " " in registry or not registry.rsplit(":", 1)[-1]):
        raise click.BadParameter(f"{registry!r} is not HOST:PORT", param_hint="--image-registry")
    os.environ["BERTH_IMAGE_REGISTRY"] = registry
    return registry


def image_registry() -> str:
    """The registry deployments are pushed to: BERTH_IMAGE_REGISTRY, else
    what the running platform was started with (its platform file)."""
    if os.environ.get("BERTH_IMAGE_REGISTRY"):
        return os.environ["BERTH_IMAGE_REGISTRY"].strip()
    try:
        recorded = json.loads((local.data_dir() / local.PLATFORM_FILE).read_text())
    except (OSError, ValueError):
        return ""
    return str(recorded.get("image_registry") or "") if isinstance(recorded, dict) else ""


def push_image(image_id: str, registry: str, project: str, quiet: bool) -> str:
    """Tags the built image into ``registry`` and pushes it (through the
    engine DOCKER_HOST names); returns ``REGISTRY/berth-PROJECT@sha256:...``,
    the reference every node runs."""
    import docker

    api = docker.from_env(timeout=600).api
    repository = f"{registry}/berth-{(project or 'local').lower()}"
    tag = image_id.split(":", 1)[1][:12]
    api.tag(image_id, repository, tag)
    digest = ""
    try:
        for chunk in api.push(repository, tag=tag, stream=True, decode=True):
            if chunk.get("error"):
                raise errors.Unavailable(f"pushing {repository}:{tag} failed: {chunk['error'].strip()}",
                                         hint=f"is the image registry {registry} up and reachable from the engine?")
            if "status" in chunk and not quiet and chunk.get("id") is None:
                err.print(f"[dim]{escape(str(chunk['status']))}[/]", markup=True)
            digest = (chunk.get("aux") or {}).get("Digest", digest)
    except docker.errors.APIError as exc:
        raise errors.Unavailable(f"pushing {repository}:{tag} failed: {exc.explanation or exc}") from None
    if not digest:
        raise errors.Unavailable(f"pushing {repository}:{tag} reported no digest")
    return f"{repository}@{digest}"


def pin_reference(ref: str, registry: str) -> str:
    """``--image REF`` as the digest it names now (asked once, of the
    registry's v2 API); a reference by digest stays as given."""
    from berth import images

    try:
        parsed = images.parse(ref)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc), field="image") from None
    if parsed.by_digest:
        return ref
    try:
        digest = images.resolve_digest(ref, insecure=(registry,))
    except images.RegistryError as exc:
        raise errors.InvalidArgument(f"cannot resolve {ref} to a digest: {exc.message}", field="image",
                                     hint="push it first, or give REPO@sha256:...") from None
    return parsed.with_digest(digest)


def find_environment(ctx: Ctx, ref: str) -> common_pb2.Environment:
    """The project's environment named ``ref`` (a name or an id), in one
    cheap call that also checks the API key and that the project is the
    key's: what ``deploy`` settles before it builds anything."""
    c = ctx.client()
    project, origin = ctx.project_and_origin()
    try:
        envs = c.list_all(c.registry.ListEnvironments, registry_pb2.ListEnvironmentsRequest(project=project), "environments")
    except errors.PermissionDenied as error:
        if project and origin:
            error.hint = (f"the project {project!r} comes from {origin}; use that project's API key "
                          "(BERTH_API_KEY), or name the key's project with --project")
        raise
    for e in envs:
        if ref in (e.name, e.id):
            return e
    name = envs[0].project_name if envs else project
    raise errors.NotFound(
        f"environment {ref!r} not found in project {name!r}",
        hint=f"known environments: {', '.join(e.name for e in envs)}; create one with 'berth env create NAME'",
    )


def confirm_protected(ctx: Ctx, environment: common_pb2.Environment, yes: bool, question: str = "") -> bool:
    """Moving a protected environment's pointer (production) needs --yes or,
    on a terminal, a yes at the prompt; without a terminal it is refused
    here, before anything is built or moved. A "no" moves nothing."""
    if yes or not environment.protected:
        return yes
    name = environment.name
    if not sys.stdin.isatty():
        raise errors.FailedPrecondition(
            f"environment {name!r} is protected: moving its pointer needs confirmation, and there is no terminal to ask on",
            hint="pass --yes to confirm", reason="PROTECTED_ENVIRONMENT", resource_name=name,
        )
    if not click.confirm(question or f"Move the pointer of protected environment '{name}'?", default=False, err=True):
        raise errors.FailedPrecondition(
            f"not confirmed: '{name}' did not move", hint="pass --yes to skip the prompt",
            reason="PROTECTED_ENVIRONMENT", resource_name=name,
        )
    return True


def is_terminated(ctx: Ctx, deployment_id: str) -> bool:
    c = ctx.client()
    d = c.call(c.registry.GetDeployment, registry_pb2.GetDeploymentRequest(project=ctx.project, deployment_id=deployment_id))
    return d.state == common_pb2.Deployment.STATE_TERMINATED


def refuse_terminated(ctx: Ctx, deployment_id: str) -> None:
    """Promote never moves a pointer to a terminated deployment: it is
    started explicitly first (rollback, which returns to what served
    before, starts it again and says so)."""
    if is_terminated(ctx, deployment_id):
        d_id = deployment_id
        raise errors.FailedPrecondition(
            f"deployment {d_id} is terminated; start it with `berth deployment start {d_id}`",
            hint="then run this command again", reason="DEPLOYMENT_TERMINATED", resource_name=d_id,
        )


#: Binding statuses a wait for readiness stops at.
SETTLED = (scheduler_pb2.BindingStatus.STATUS_RUNNING, scheduler_pb2.BindingStatus.STATUS_FAILED)


def requests_line(requests: dict[str, Any] | None) -> str:
    """"Requests: 1m 12.3/s, errors 1.0%, p50 4 ms, p99 120 ms · 5m ...": a
    binding's request figures over the last minute and five minutes."""
    if requests is None:
        return "Requests: none in the last 5 minutes"

    def ms(seconds: float) -> str:
        if seconds >= 1:
            return f"{seconds:.2f} s"
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"

    parts = []
    for label, key in (("1m", "last_minute"), ("5m", "last_five_minutes")):
        w = requests[key]
        parts.append(f"{label} {w['requests_per_second']:.2f}/s, errors {w['error_rate'] * 100:.1f}%, "
                     f"p50 {ms(w['p50_seconds'])}, p99 {ms(w['p99_seconds'])}")
    return "Requests: " + " · ".join(parts)


def replicas_ready(b: scheduler_pb2.BindingStatus) -> str:
    """"2/3 ready (min 1, max 5)": ready replicas over the count the scheduler
    is driving the binding to (desired_replicas), then the bounds; more ready
    than that reads "3 ready, scaling to 2 (min 2, max 3)", never "3/2"."""
    ready = sum(1 for r in b.replicas if r.state == scheduler_pb2.Replica.STATE_READY)
    bounds = f"(min {b.min_replicas}, max {b.max_replicas})"
    if ready > b.desired_replicas:
        return f"{ready} ready, scaling to {b.desired_replicas} {bounds}"
    return f"{ready}/{b.desired_replicas} ready {bounds}"


def wait_for_binding(ctx: Ctx, deployment_id: str, environment: str, timeout: float) -> scheduler_pb2.BindingStatus | None:
    """Polls the scheduler until the binding runs or fails (bounded), with a
    live line on a terminal."""
    c = ctx.client()
    deadline = time.monotonic() + timeout
    last: scheduler_pb2.BindingStatus | None = None
    live = out.status("waiting for the scheduler...") if out.is_terminal and not ctx.json else None
    try:
        if live is not None:
            live.start()
        while time.monotonic() < deadline:
            try:
                status = c.call(
                    c.scheduler.GetDeploymentStatus,
                    scheduler_pb2.GetDeploymentStatusRequest(project=ctx.project, deployment_id=deployment_id, environment=environment),
                    timeout=5,
                )
                for b in status.bindings:
                    if environment in (b.environment, b.environment_id):
                        last = b
                        if live is not None:
                            live.update(f"{b.environment}: {binding_status(b)}, {replicas_ready(b)}")
                        if b.status in SETTLED:
                            return b
            except errors.NotFound:
                pass  # the scheduler has not seen the binding yet
            time.sleep(0.3)
        return last
    finally:
        if live is not None:
            live.stop()


def binding_reason(ctx: Ctx, deployment_id: str, environment_id: str, patience: float = 0.0) -> scheduler_pb2.DeploymentError | None:
    """The newest error the scheduler recorded for this binding; waits up to
    ``patience`` seconds for one (a failed status can be seen a moment
    before its event is stored). With none for the binding, the newest of
    the deployment in another environment (the same image failing there is
    the best reason there is)."""
    c = ctx.client()
    deadline = time.monotonic() + patience
    while True:
        found = c.list_all(c.scheduler.ListDeploymentErrors,
                           scheduler_pb2.ListDeploymentErrorsRequest(project=ctx.project, deployment_id=deployment_id),
                           "errors")
        mine = [e for e in found if e.environment_id == environment_id]
        if mine or time.monotonic() >= deadline:
            candidates = mine or list(found)
            return max(candidates, key=lambda e: (e.last_seen.seconds, e.last_seen.nanos)) if candidates else None
        time.sleep(0.3)


class WaitResult:
    """What a deploy/promote/rollback that waited for readiness reports: the
    binding's status and, unless it runs, the newest reason it has."""

    def __init__(self, ctx: Ctx, deployment_id: str, environment_id: str, timeout: float) -> None:
        self.timeout = timeout
        self.environment_id = environment_id
        self.status = wait_for_binding(ctx, deployment_id, environment_id, timeout)
        self.reason: scheduler_pb2.DeploymentError | None = None
        if self.status is None or self.status.status != scheduler_pb2.BindingStatus.STATUS_RUNNING:
            failed = self.status is not None and self.status.status == scheduler_pb2.BindingStatus.STATUS_FAILED
            self.reason = binding_reason(ctx, deployment_id, environment_id, patience=5.0 if failed else 0.0)

    @property
    def failed(self) -> bool:
        return self.status is not None and self.status.status == scheduler_pb2.BindingStatus.STATUS_FAILED

    def add_to(self, data: dict[str, Any]) -> None:
        data["status"] = binding_status(self.status) if self.status is not None else "unknown"
        if self.reason is not None:
            data["reason"] = error_json(self.reason)

    def print(self) -> None:
        if self.status is None:
            out.print(f"  status unknown: the scheduler did not report this binding within {self.timeout:.0f} s")
        else:
            late = "" if self.status.status in SETTLED else f" (not ready after {self.timeout:.0f} s)"
            out.print(f"  status {binding_status(self.status)}: {replicas_ready(self.status)}{late}")
        if self.reason is not None:
            r = self.reason
            times = f", x{r.count}" if r.count > 1 else ""
            where = f" (in {r.environment or r.environment_id})" if r.environment_id != self.environment_id else ""
            out.print(f"  reason{where}: {error_kind(r)}{times}: {escape(r.message)}")
            out.print("  see: berth deployment errors " + (r.deployment_id or ""))
        elif self.failed:
            out.print("  reason: none recorded yet; see: berth deployment errors")


class IdleDuration(click.ParamType):
    """A paused-tier window: seconds, or a number with s, m or h (``60s``,
    ``15m``, ``1h``); 0 is the scheduler's default."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        unit = self._UNITS.get(text[-1:], 0)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a duration such as 90, 60s, 15m or 1h", param, ctx)
        if not 0 <= seconds <= 86_400 or seconds != int(seconds):
            self.fail(f"{value!r} must be a whole number of seconds from 0 to 24h", param, ctx)
        return int(seconds)


def idle_options(fn: Any) -> Any:
    """--idle-pause / --idle-stop: the binding's paused tier (min 0 only)."""
    fn = click.option(
        "--idle-stop", type=IdleDuration(), default=None,
        help="Idle time before its replicas are stopped (scaled to zero), e.g. 15m; 0: the scheduler's default.",
    )(fn)
    return click.option(
        "--idle-pause", type=IdleDuration(), default=None,
        help="Idle time (no request in flight) before a min-0 binding's replicas are paused (memory kept, "
             "resumed in milliseconds), e.g. 60s; 0: the scheduler's default.",
    )(fn)


@main.command()
@click.argument("path", required=False, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--image", default=None, help="Register an existing image reference instead of building PATH.")
@environment_option(default="preview", help="Environment to point at it (name or id).")
@click.option("--min-replicas", type=int, default=None, help="Replicas kept running; 0 allows scale to zero (default 1).")
@click.option("--max-replicas", type=int, default=None, help="Replicas autoscaling may reach (default: the larger of min and 3).")
@click.option("--port", type=int, default=0, help="Port the worker listens on (default 8080 or berth.toml).")
@click.option("--health-path", default="", help="Readiness path (default '/').")
@click.option("--var", "variables", multiple=True, help="Plain variable KEY=VALUE (repeatable).")
@click.option("--yes", is_flag=True, help="Confirm a move of a protected environment (asked on a terminal).")
@click.option("--wait/--no-wait", default=True, help="Wait until the replicas are ready (or failed).")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the deployment id (for scripts).")
@idle_options
@command
def deploy(ctx: Ctx, path: pathlib.Path | None, image: str | None, environment: str, min_replicas: int | None,
           max_replicas: int | None, port: int, health_path: str, variables: tuple[str, ...], yes: bool, wait: bool,
           timeout: float, quiet: bool, idle_pause: int | None = None, idle_stop: int | None = None) -> None:
    """Build PATH (or take --image) and point an environment at the new deployment.

    With neither, builds the directory of the berth.toml found here (or in a
    parent directory), as it describes. The project, the API key and the
    environment are checked before anything is built.
    """
    if path is not None and image is not None:
        raise errors.InvalidArgument("give either a PATH to build or --image REF, not both")
    if path is None and image is None:
        found = local.find_project_file(pathlib.Path.cwd())
        if found is None:
            raise errors.InvalidArgument(
                "give a PATH to build or --image REF (no berth.toml here or in a parent directory)",
                hint="berth deploy ./app  or  berth deploy --image repo/app:1  ('berth init' writes berth.toml)",
            )
        path = found.parent
    project_file = local.load_project_file(path.resolve() if path else pathlib.Path.cwd())
    explicit, origin = ctx.project_and_origin()
    if origin in ("--project", "BERTH_PROJECT") or not project_file.project:
        ctx.use_project(explicit, origin)
    else:
        ctx.use_project(project_file.project, str(project_file.path))
    plain = dict(project_file.variables)
    for item in variables:
        if "=" not in item:
            raise errors.InvalidArgument(f"--var {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        plain[k] = v
    config = common_pb2.WorkerConfig(
        port=port or project_file.port,
        health_path=health_path or project_file.health_path,
        command=project_file.command,
        variables=plain,
        resources=common_pb2.Resources(memory_bytes=project_file.memory_bytes, cpus=project_file.cpus),
    )
    # key, project and environment first: nothing is built for a deploy that cannot happen
    target = find_environment(ctx, environment)
    confirm = confirm_protected(ctx, target, yes, f"Deploy to protected environment '{target.name}' (moves its pointer)?")
    c = ctx.client()
    image_id = ""
    if path is not None:
        if not (quiet or ctx.json):
            described = f" as {project_file.path} describes" if project_file.path else ""
            err.print(f"[dim]building {escape(str(path.resolve()))}{escape(described)}[/]", markup=True)
        image, image_id = build_image(path.resolve(), project_file.dockerfile, target.project_name, quiet=ctx.json or quiet)
    registry = image_registry()
    if registry and path is not None:
        image = push_image(image_id, registry, target.project_name, quiet=ctx.json or quiet)
    elif registry and image:
        image = pin_reference(image, registry)
    resp = c.call(
        c.registry.Deploy,
        registry_pb2.DeployRequest(
            project=target.project_id, image=image or "", image_id=image_id, config=config, environment=target.id,
            min_replicas=min_replicas, max_replicas=max_replicas, confirm=confirm,
            idle_pause_seconds=idle_pause, idle_stop_seconds=idle_stop,
        ),
    )
    d, e = resp.deployment, resp.environment
    waited = WaitResult(ctx, d.id, e.id, timeout) if wait else None
    data: dict[str, Any] = {"deployment": deployment_json(d), "environment": environment_json(e)}
    if waited is not None:
        waited.add_to(data)

    def human() -> None:
        if quiet:
            click.echo(d.id)
            return
        out.print(f"Deployed [bold]{d.id}[/] ({d.image}) to [bold]{e.name}[/]")
        if waited is not None:
            waited.print()

    ctx.emit(data, human)
    if waited is not None and waited.failed:
        if quiet and not ctx.json:  # the id went to stdout; say why on stderr
            r = waited.reason
            why = f": {error_kind(r)}: {escape(r.message)}" if r is not None else " (see: berth deployment errors)"
            err.print(f"[bold red]error:[/] {d.id} failed in {e.name}{why}", markup=True)
        sys.exit(5)


@main.command("deployments")
@environment_option(help="Only deployments bound to this environment.")
@command
def deployments_list(ctx: Ctx, environment: str) -> None:
    """The project's deployments, newest first."""
    deps = [d.raw for d in ctx.sdk().list_deployments(ctx.project, environment=environment)]

    def human() -> None:
        t = table("DEPLOYMENT", "IMAGE", "STATE", "CREATED", "BY")
        for d in deps:
            t.add_row(d.id, d.image, deployment_state(d), short_time(timestamp(d, "created_at")), d.created_by)
        out.print(t)

    ctx.emit({"deployments": [deployment_json(d) for d in deps]}, human)


# ---------------------------------------------------------------- deployment ...


@main.group()
def deployment() -> None:
    """Inspect and operate one deployment: status, errors, scale, terminate, start."""


def latest_deployment_id(ctx: Ctx) -> str:
    c = ctx.client()
    deps = c.call(c.registry.ListDeployments, registry_pb2.ListDeploymentsRequest(project=ctx.project, page_size=1)).deployments
    if not deps:
        raise errors.NotFound("this project has no deployments yet", hint="berth deploy PATH")
    return deps[0].id



def uptime(started_at: str) -> str:
    if not started_at:
        return "-"
    from datetime import datetime

    seconds = int((datetime.now(UTC) - datetime.fromisoformat(started_at.replace("Z", "+00:00"))).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def current_deployment_id(ctx: Ctx, environment: str) -> str:
    """The deployment an environment points at."""
    e = find_environment(ctx, environment)
    if not e.deployment_id:
        raise errors.NotFound(
            f"environment {e.name!r} points at no deployment yet",
            hint=f"berth deploy -e {e.name}  or  berth promote ID --to {e.name}",
        )
    return e.deployment_id


@deployment.command("status")
@click.argument("deployment_id", required=False)
@environment_option(help="Only this environment's binding; with no ID, the deployment it points at.")
@command
def deployment_status(ctx: Ctx, deployment_id: str | None, environment: str) -> None:
    """Replicas, uptime and state of a deployment.

    With no ID: the deployment --environment points at, or else the latest.
    """
    c = ctx.client()
    if not deployment_id:
        deployment_id = current_deployment_id(ctx, environment) if environment else latest_deployment_id(ctx)
    s = c.call(
        c.scheduler.GetDeploymentStatus,
        scheduler_pb2.GetDeploymentStatusRequest(project=ctx.project, deployment_id=deployment_id, environment=environment),
    )
    data = status_json(s)

    def human() -> None:
        out.print(f"Deployment [bold]{s.deployment.id}[/]  {s.deployment.image}  ({deployment_state(s.deployment)})")
        if "scheduler_leader" in data:
            leader = data["scheduler_leader"]
            out.print(f"Scheduler leader: {leader['instance']} (epoch {leader['epoch']})")
        for b in data["bindings"]:
            mark = " (serving)" if b["serving"] else ""
            out.print(f"\n[bold]{b['environment']}[/]{mark}: {b['status']}, replicas {b['min_replicas']}..{b['max_replicas']}")
            out.print(requests_line(b["requests"]))
            nodes = any(r.get("node") for r in b["replicas"])
            t = table("REPLICA", "STATE", "UPTIME", "RESTARTS", "ADDRESS", *(["NODE"] if nodes else []))
            for r in b["replicas"]:
                t.add_row(r["name"] or r["id"][:12], r["state"], uptime(r["started_at"]), str(r["restarts"]), r["address"],
                          *([r.get("node") or "-"] if nodes else []))
            out.print(t)

    ctx.emit(data, human)


@deployment.command("errors")
@click.argument("deployment_id", required=False)
@command
def deployment_errors(ctx: Ctx, deployment_id: str | None) -> None:
    """Scheduling failures and image-pull errors of a deployment."""
    deployment_id = deployment_id or latest_deployment_id(ctx)
    rows = [error_json(e.raw) for e in ctx.sdk().errors(ctx.project, deployment_id=deployment_id)]

    def human() -> None:
        if not rows:
            out.print(f"No errors for {deployment_id}.")
            return
        t = table("KIND", "ENVIRONMENT", "REPLICA", "COUNT", "LAST SEEN", "MESSAGE")
        for r in rows:
            t.add_row(r["kind"], r["environment"], r["replica"] or "-", str(r["count"]), short_time(r["last_seen"]), r["message"])
        out.print(t)

    ctx.emit({"deployment_id": deployment_id, "errors": rows}, human)



def report_binding(ctx: Ctx, verb: str, b: common_pb2.Binding) -> None:
    ctx.emit(
        {"binding": binding_json(b)},
        lambda: out.print(
            f"{verb} {b.deployment.id} in [bold]{b.environment_name}[/]: replicas {b.min_replicas}..{b.max_replicas}"
            + _idle_text(b)
        ),
    )


def _idle_text(b: common_pb2.Binding) -> str:
    """The binding's own idle windows, when it has any (else the scheduler's apply)."""
    parts = [f"{name} {seconds}s" for name, seconds in (("idle pause", b.idle_pause_seconds),
                                                        ("idle stop", b.idle_stop_seconds)) if seconds]
    return f", {', '.join(parts)}" if parts else ""


# ---------------------------------------------------------------- logs (issue 16)


def parse_since(value: str) -> datetime:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``,
    ``1d``) or an RFC 3339 time (``2026-01-02T15:04:05Z``)."""
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:].lower() in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1:].lower()])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidArgument(
            f"--since: {value!r} is neither a duration (90s, 10m, 2h, 1d) nor a time (2026-01-02T15:04:05Z)",
            field="since",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@main.command("logs")
@click.argument("deployment_id", required=False)
@environment_option(help="Only this environment's replicas; with no ID, the deployment it points at.")
@click.option("--replica", default="", help="Only this replica: its id (or a prefix), container name or index.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (replicas started later join); Ctrl-C ends.")
@click.option("--since", default=None, help="Only lines from this long ago (10m, 2h, 1d) or this time (RFC 3339).")
@click.option("--tail", type=click.IntRange(0, 10000), default=None, help="Only the last N lines (0 to 10000).")
@command
def logs(ctx: Ctx, deployment_id: str | None, environment: str, replica: str, follow: bool, since: str | None,
         tail: int | None) -> None:
    """Lines the replicas of a deployment printed, merged in time order.

    One line per log line: TIME REPLICA STREAM TEXT (REPLICA is the replica's
    id, shortened; lines kept from a removed replica are marked). With no ID:
    the deployment --environment points at, or else the project's latest.
    --output json prints one JSON object per line.
    """
    c = ctx.client()
    request = scheduler_pb2.StreamDeploymentLogsRequest(project=ctx.project, environment=environment,
                                                         replica=replica, follow=follow)
    if deployment_id:
        request.deployment_id = deployment_id
    elif environment:
        request.deployment_id = current_deployment_id(ctx, environment)
    else:
        request.latest = True
    if since is not None:
        request.since.FromDatetime(parse_since(since))
    if tail is not None:
        request.tail = tail
    call = c.scheduler.StreamDeploymentLogs(
        request, metadata=(("x-api-key", c.api_key),), timeout=None if follow else 120.0,
    )
    try:
        for line in call:
            if ctx.json:
                click.echo(json.dumps(log_line_json(line)))
                continue
            when = line.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            stream = enums.label(scheduler_pb2.LogLine.Stream, line.stream)
            mark = " (kept)" if line.archived else ""
            click.echo(f"{when} {line.replica_id[:12]}{mark} {stream} {line.text}")
    except KeyboardInterrupt:  # Ctrl-C ends a follow: not an error
        call.cancel()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            return
        raise error_from_rpc(exc) from None


@deployment.command("scale")
@click.argument("deployment_id")
@click.option("--min-replicas", type=int, default=None, help="New lowest replica count (0 allows scale to zero).")
@click.option("--max-replicas", type=int, default=None, help="New highest replica count.")
@environment_option(help="Needed when the deployment serves several environments.")
@idle_options
@command
def deployment_scale(ctx: Ctx, deployment_id: str, min_replicas: int | None, max_replicas: int | None,
                     environment: str, idle_pause: int | None = None, idle_stop: int | None = None) -> None:
    """Set a binding's replica bounds and idle windows (any of them; the others stay)."""
    b = ctx.sdk().scale(ctx.project, deployment_id, environment, min_replicas=min_replicas, max_replicas=max_replicas,
                        idle_pause_seconds=idle_pause, idle_stop_seconds=idle_stop).raw
    report_binding(ctx, "Scaled", b)


def _adjust(ctx: Ctx, deployment_id: str, environment: str, delta: int, verb: str) -> None:
    b = ctx.sdk().adjust_replicas(ctx.project, deployment_id, environment, delta).raw
    report_binding(ctx, verb, b)


@deployment.command("scale-up")
@click.argument("deployment_id")
@click.option("--by", type=click.IntRange(min=1), default=1, show_default=True)
@environment_option()
@command
def deployment_scale_up(ctx: Ctx, deployment_id: str, by: int, environment: str) -> None:
    """Raise min replicas by N (max widens if needed)."""
    _adjust(ctx, deployment_id, environment, by, "Scaled up")


@deployment.command("scale-down")
@click.argument("deployment_id")
@click.option("--by", type=click.IntRange(min=1), default=1, show_default=True)
@environment_option()
@command
def deployment_scale_down(ctx: Ctx, deployment_id: str, by: int, environment: str) -> None:
    """Lower min replicas by N (may reach 0)."""
    _adjust(ctx, deployment_id, environment, -by, "Scaled down")


@deployment.command("terminate")
@click.argument("deployment_id")
@command
def deployment_terminate(ctx: Ctx, deployment_id: str) -> None:
    """Stop every replica; the record and image stay."""
    d = ctx.sdk().terminate(ctx.project, deployment_id).raw
    ctx.emit({"deployment": deployment_json(d)}, lambda: out.print(f"Terminated [bold]{d.id}[/] (start it again with 'berth deployment start {d.id}')"))


@deployment.command("start")
@click.argument("deployment_id")
@command
def deployment_start(ctx: Ctx, deployment_id: str) -> None:
    """Bring a terminated deployment back to its bounds."""
    d = ctx.sdk().start(ctx.project, deployment_id).raw
    ctx.emit({"deployment": deployment_json(d)}, lambda: out.print(f"Started [bold]{d.id}[/]"))


# ---------------------------------------------------------------- promote / rollback / history



def report_move(ctx: Ctx, verb: str, resp: registry_pb2.PointerMoveResponse, wait: bool, timeout: float) -> None:
    e, h = resp.environment, resp.entry
    waited = WaitResult(ctx, h.deployment_id, e.id, timeout) if wait else None
    data: dict[str, Any] = {"environment": environment_json(e), "entry": entry_json(h)}
    if waited is not None:
        waited.add_to(data)

    def human() -> None:
        out.print(f"{verb} [bold]{e.name}[/]: {h.previous_deployment_id or '(none)'} -> [bold]{h.deployment_id}[/] (sequence {h.sequence})")
        if waited is not None:
            waited.print()
        if verb == "Rolled back":
            out.print("  note: secrets are not rolled back; 'berth secrets list' shows what the environment resolves")

    ctx.emit(data, human)
    if waited is not None and waited.failed:
        sys.exit(5)


@main.command()
@click.argument("deployment_id")
@environment_option("--to", dest="target", required=True, help="Target environment (name or id).")
@click.option("--min-replicas", type=int, default=None,
              help="Bounds there (default: the deployment's bounds there, else min 1, max the larger of min and 3).")
@click.option("--max-replicas", type=int, default=None)
@click.option("--scale-previous-to-zero", is_flag=True)
@click.option("--reason", default="", help="Recorded in the history (required with --skip-gate).")
@click.option("--skip-gate", is_flag=True,
              help="Promote into a gated environment without a passing experiment run (needs --reason).")
@click.option("--yes", is_flag=True, help="Confirm moving a protected environment (asked on a terminal).")
@click.option("--wait/--no-wait", default=True)
@click.option("--timeout", default=180.0, show_default=True)
@click.option("--canary", "canary_plan", default=None, metavar="W:DUR,...",
              help="Promote through a canary: the candidate takes W%% of requests for DUR at each step "
                   "(e.g. 10:5m,50:10m; weights increasing within 1-99; DUR as 30s, 5m, 1h), then 100%%.")
@click.option("--max-error-rate-increase", type=float, default=None,
              help="Canary: abort when the candidate's 5xx rate exceeds the stable's by more (default 0.01).")
@click.option("--max-latency-ratio", type=float, default=None,
              help="Canary: abort when the candidate's p99 exceeds the stable's times this (default 1.2).")
@click.option("--min-requests", type=int, default=None,
              help="Canary: requests the candidate must serve before it is judged (default 100).")
@idle_options
@command
def promote(ctx: Ctx, deployment_id: str, target: str, min_replicas: int | None, max_replicas: int | None,
            scale_previous_to_zero: bool, reason: str, skip_gate: bool, yes: bool, wait: bool, timeout: float,
            canary_plan: str | None = None, max_error_rate_increase: float | None = None,
            max_latency_ratio: float | None = None, min_requests: int | None = None,
            idle_pause: int | None = None, idle_stop: int | None = None) -> None:
    """Point TARGET at a deployment that proved itself elsewhere (nothing is rebuilt).

    A terminated deployment is refused: start it first with 'berth deployment start ID'.
    Into a gated environment ('berth env gate') only a deployment with a passing
    experiment run, unless --skip-gate --reason TEXT. With --canary the pointer
    stays until the canary's last step passed ('berth canary status ENV').
    """
    if skip_gate and not reason.strip():
        raise errors.InvalidArgument("--skip-gate needs --reason TEXT: say why the gate is skipped", field="reason")
    thresholds_given = any(v is not None for v in (max_error_rate_increase, max_latency_ratio, min_requests))
    if canary_plan is None and thresholds_given:
        raise errors.InvalidArgument("--max-error-rate-increase, --max-latency-ratio and --min-requests need "
                                     "--canary PLAN", field="canary")
    steps = parse_canary_plan(canary_plan) if canary_plan is not None else None
    env = find_environment(ctx, target)
    refuse_terminated(ctx, deployment_id)
    confirm = confirm_protected(ctx, env, yes)
    c = ctx.client()
    if steps is not None:
        started = c.call(
            c.registry.StartCanary,
            registry_pb2.StartCanaryRequest(
                project=ctx.project, deployment_id=deployment_id, environment=env.id,
                steps=[common_pb2.Canary.Step(weight=w, bake_seconds=b) for w, b in steps],
                thresholds=common_pb2.Canary.Thresholds(
                    max_error_rate_increase=max_error_rate_increase or 0, max_latency_ratio=max_latency_ratio or 0,
                    min_requests=min_requests or 0,
                ),
                min_replicas=min_replicas, max_replicas=max_replicas, confirm=confirm, reason=reason,
                skip_gate=skip_gate,
            ),
        )
        report_canary(ctx, "Canary started", started)
        return
    resp = c.call(
        c.registry.Promote,
        registry_pb2.PromoteRequest(
            project=ctx.project, deployment_id=deployment_id, target_environment=env.id, min_replicas=min_replicas,
            max_replicas=max_replicas, scale_previous_to_zero=scale_previous_to_zero, confirm=confirm,
            reason=reason, skip_gate=skip_gate, idle_pause_seconds=idle_pause, idle_stop_seconds=idle_stop,
        ),
    )
    report_move(ctx, "Promoted", resp, wait, timeout)


# ---- canaries (issue 20) ----------------------------------------------------

def report_canary(ctx: Ctx, verb: str, resp: registry_pb2.CanaryResponse) -> None:
    e = resp.environment
    data: dict[str, Any] = {"environment": environment_json(e),
                            "canary": canary_json(e.canary) if e.HasField("canary") else None}
    if resp.HasField("entry"):
        data["entry"] = entry_json(resp.entry)

    def human() -> None:
        if not e.HasField("canary"):
            out.print(f"[bold]{e.name}[/] has no canary; it serves {e.deployment_id or '(nothing)'}")
            return
        k = e.canary
        plan = ", ".join(f"{s.weight}% for {s.bake_seconds}s" for s in k.steps)
        out.print(f"{verb}: [bold]{e.name}[/] {canary_state(k)}, candidate {k.candidate_deployment_id} at "
                  f"[bold]{k.candidate_weight}%[/], stable {k.stable_deployment_id} (step {k.step + 1}/{len(k.steps)}: {plan})")
        if k.last_analysis:
            out.print(f"  last analysis: {escape(k.last_analysis)}")
        if k.reason:
            out.print(f"  reason: {escape(k.reason)}")

    ctx.emit(data, human)


@main.group()
def canary() -> None:
    """Watch and steer an environment's canary (started by 'berth promote ID --to ENV --canary PLAN')."""


@canary.command("status")
@click.argument("environment")
@command
def canary_status(ctx: Ctx, environment: str) -> None:
    """The canary of ENVIRONMENT: weights, step, last analysis."""
    c = ctx.client()
    resp = c.call(c.registry.GetCanary, registry_pb2.GetCanaryRequest(project=ctx.project, environment=environment))
    report_canary(ctx, "Canary", resp)


def _canary_action(name: str, request_type: Any, method: str, verb: str, doc: str) -> None:
    @canary.command(name, help=doc)
    @click.argument("environment")
    @click.option("--reason", default="", help="Recorded in the history.")
    @click.option("--yes", is_flag=True, help="Confirm moving a protected environment (promote-now).")
    @command
    def action(ctx: Ctx, environment: str, reason: str, yes: bool) -> None:
        c = ctx.client()
        fields: dict[str, Any] = {"project": ctx.project, "environment": environment, "reason": reason}
        if name == "promote-now":
            fields["confirm"] = confirm_protected(ctx, find_environment(ctx, environment), yes)
        resp = c.call(getattr(c.registry, method), request_type(**fields))
        report_canary(ctx, verb, resp)


_canary_action("pause", registry_pb2.PauseCanaryRequest, "PauseCanary", "Canary paused",
               "Hold ENVIRONMENT's canary at its weight (no analysis, no step).")
_canary_action("resume", registry_pb2.ResumeCanaryRequest, "ResumeCanary", "Canary resumed",
               "Resume a paused canary; its step bakes again from now.")
_canary_action("abort", registry_pb2.AbortCanaryRequest, "AbortCanary", "Canary aborted",
               "End the canary with the candidate at 0%: the stable serves everything.")
_canary_action("promote-now", registry_pb2.PromoteCanaryNowRequest, "PromoteCanaryNow", "Canary promoted",
               "End the canary at once by pointing ENVIRONMENT at the candidate (100%).")


@main.command()
@environment_option(required=True)
@click.option("--to", "target", default="", help="A deployment from this environment's history.")
@click.option("--reason", default="")
@click.option("--yes", is_flag=True, help="Confirm moving a protected environment (asked on a terminal).")
@click.option("--wait/--no-wait", default=True)
@click.option("--timeout", default=180.0, show_default=True)
@command
def rollback(ctx: Ctx, environment: str, target: str, reason: str, yes: bool, wait: bool, timeout: float) -> None:
    """Point ENV back at the previously serving deployment (or --to one from its history).

    A terminated deployment is started again (it served here before; promote,
    by contrast, refuses one until 'berth deployment start ID').
    """
    env = find_environment(ctx, environment)
    c = ctx.client()
    entries = c.list_all(c.registry.ListHistory, registry_pb2.ListHistoryRequest(project=ctx.project, environment=env.id), "entries")
    if target:
        target_id = target if any(h.deployment_id == target for h in entries) else ""
    else:  # what the registry picks: the deployment the newest entry moved away from
        newest = max(entries, key=lambda h: h.sequence, default=None)
        target_id = newest.previous_deployment_id if newest is not None else ""
    if target_id and target_id != env.deployment_id:
        if is_terminated(ctx, target_id):
            click.echo(f"deployment {target_id} was terminated: rolling back to it starts it again", err=True)
        confirm = confirm_protected(ctx, env, yes)
    else:
        confirm = yes  # nothing to roll back to: the registry says why; nothing to ask
    resp = c.call(
        c.registry.Rollback,
        registry_pb2.RollbackRequest(
            project=ctx.project, environment=env.id, to_deployment_id=target, confirm=confirm, reason=reason,
        ),
    )
    report_move(ctx, "Rolled back", resp, wait, timeout)


@main.command()
@environment_option(required=True)
@command
def history(ctx: Ctx, environment: str) -> None:
    """The promotion history of an environment, oldest first."""
    rows = [entry_json(h.raw) for h in ctx.sdk().history(ctx.project, environment)]

    def human() -> None:
        t = table("SEQ", "KIND", "DEPLOYMENT", "PREVIOUS", "REPLICAS", "BY", "WHEN", "REASON")
        for r in rows:
            t.add_row(str(r["sequence"]), r["kind"], r["deployment_id"], r["previous_deployment_id"] or "-",
                      f"{r['min_replicas']}..{r['max_replicas']}", r["actor"], short_time(r["created_at"]), r["reason"])
        out.print(t)

    ctx.emit({"environment": environment, "entries": rows}, human)


# ---------------------------------------------------------------- secrets


@main.group()
def secrets() -> None:
    """Set, list, version and delete secrets (values are write-only)."""



def _secret_from_stdin() -> str:
    """The value piped to ``secrets set --stdin``: UTF-8 text without NUL
    (an environment variable cannot hold one), a trailing newline dropped."""
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(
            f"the value on standard input is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            hint="secret values are text; encode binary data first, e.g. `base64 < FILE | berth secrets set --stdin ...`",
        ) from None
    if "\0" in value:
        raise errors.InvalidArgument(
            f"the value on standard input contains a NUL byte (offset {raw.index(0)}); an environment "
            "variable cannot hold one",
            hint="remove it, or encode the value first, e.g. with base64",
        )
    from services.secrets.limits import value_size_problem  # the service's own rule, before a 4 MiB gRPC refusal

    value = value.rstrip("\n")
    problem = value_size_problem(value)
    if problem:
        raise errors.InvalidArgument(f"the value on standard input {problem}")
    return value


@secrets.command("set")
@click.option("--name", required=True)
@click.option("--type", "type_", default="generic", show_default=True,
              type=click.Choice(["api_key", "password", "token", "certificate", "generic"]))
@environment_option(help="Scope it to one environment (default: the project).")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the value from standard input.")
@command
def secrets_set(ctx: Ctx, name: str, type_: str, environment: str, from_stdin: bool) -> None:
    """Set a secret; prompts without echo unless --stdin."""
    if from_stdin:
        value = _secret_from_stdin()
    elif sys.stdin.isatty():
        value = getpass.getpass(f"Value for {name}: ")
    else:
        raise errors.InvalidArgument("no terminal to prompt on", hint="pipe the value and pass --stdin")
    s = ctx.sdk().set_secret(ctx.project, name, value, type=type_, environment=environment).raw
    ctx.emit({"secret": secret_json(s)}, lambda: out.print(f"Set {s.name} ({s.type}, {secret_scope(s)}) version {s.version}"))


@secrets.command("list")
@environment_option(help="Show what this environment resolves.")
@command
def secrets_list(ctx: Ctx, environment: str) -> None:
    rows = [secret_json(s.raw) for s in ctx.sdk().list_secrets(ctx.project, environment=environment)]

    def human() -> None:
        t = table("NAME", "TYPE", "SCOPE", "VERSION", "UPDATED")
        for r in rows:
            t.add_row(r["name"], r["type"], r["scope"], str(r["version"]), short_time(r["updated_at"]))
        out.print(t)

    ctx.emit({"secrets": rows}, human)


@secrets.command("delete")
@click.option("--name", required=True)
@environment_option()
@command
def secrets_delete(ctx: Ctx, name: str, environment: str) -> None:
    s = ctx.sdk().delete_secret(ctx.project, name, environment=environment).raw
    ctx.emit({"secret": secret_json(s)}, lambda: out.print(f"Deleted {s.name} ({secret_scope(s)}) as version {s.version}; replicas that resolved it are replaced"))


@secrets.command("versions")
@click.option("--name", required=True)
@environment_option()
@command
def secrets_versions(ctx: Ctx, name: str, environment: str) -> None:
    """Every version of a secret (never the values)."""
    rows = [secret_json(v.raw) for v in ctx.sdk().secret_versions(ctx.project, name, environment=environment)]

    def human() -> None:
        t = table("VERSION", "TYPE", "SCOPE", "DELETED", "CREATED", "BY")
        for r in rows:
            t.add_row(str(r["version"]), r["type"], r["scope"], "yes" if r["deleted"] else "", short_time(r["updated_at"]), r["updated_by"])
        out.print(t)

    ctx.emit({"name": name, "versions": rows}, human)


@secrets.command("rollback")
@click.option("--name", required=True)
@click.option("--to-version", type=int, required=True)
@environment_option()
@command
def secrets_rollback(ctx: Ctx, name: str, to_version: int, environment: str) -> None:
    """Restore an earlier version's value as a new version."""
    s = ctx.sdk().rollback_secret(ctx.project, name, to_version, environment=environment).raw
    ctx.emit({"secret": secret_json(s)}, lambda: out.print(f"Restored {s.name} to the value of version {to_version} as version {s.version}"))


@secrets.command("rotate-key")
@command
def secrets_rotate_key(ctx: Ctx) -> None:
    """Re-wrap every data key under a new master key (admin key; no downtime)."""
    admin = local.admin_key()
    if not admin:
        raise errors.Unauthenticated("rotating the master key needs the platform's admin key", hint="run it where 'berth up' runs, or set BERTH_ADMIN_KEY")
    resp = ctx.sdk(api_key=admin).rotate_master_key()
    ctx.emit({"data_keys_rewrapped": resp.data_keys_rewrapped, "key_fingerprint": resp.key_fingerprint},
             lambda: out.print(f"Rotated the master key ({resp.key_fingerprint}); re-wrapped {resp.data_keys_rewrapped} data keys"))


# ---------------------------------------------------------------- init and completion


@main.command()
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--project", "project_name", default="", help="Project name (default: the directory's name).")
@click.option("--dockerfile", default="Dockerfile", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--health-path", default="/", show_default=True)
@click.option("--memory", default="", help="Memory limit, e.g. 256m.")
@click.option("--cpus", type=float, default=0.0)
@click.option("--var", "variables", multiple=True, help="Plain variable KEY=VALUE (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite an existing berth.toml.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
def init(directory: pathlib.Path, project_name: str, dockerfile: str, port: int, health_path: str, memory: str,
         cpus: float, variables: tuple[str, ...], force: bool, output: str) -> None:
    """Write berth.toml: what to build and how to run it."""
    ctx = Ctx(output, None)
    try:
        path = local.write_project_file(
            directory, project=project_name or directory.resolve().name, dockerfile=dockerfile, port=port,
            health_path=health_path, memory=memory, cpus=cpus, variables=variables, force=force,
        )
    except errors.BerthError as error:
        fail(ctx, error)
        return
    ctx.emit({"path": str(path), "config": local.load_project_file(path.parent).__dict__ | {"path": str(path)}},
             lambda: out.print(f"Wrote {path}; next: berth deploy {directory}"))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(berth completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "berth", "_BERTH_COMPLETE").source())


# ---------------------------------------------------------------- experiments and gates


def run_json(r: registry_pb2.ExperimentRun) -> dict[str, Any]:
    from berth.experiments import run_json as shape

    return shape(r)


def gate_json(g: registry_pb2.EnvironmentGate) -> dict[str, Any]:
    from berth.experiments import gate_json as shape

    return shape(g)


@main.group()
def experiments() -> None:
    """Run a dataset of cases against a deployment and record the result (gates promotions)."""


@experiments.command("run")
@click.option("--deployment", "deployment_id", required=True, help="The deployment under test (dep_...).")
@click.option("--dataset", required=True, type=click.Path(path_type=pathlib.Path),
              help="JSON Lines file: one case per line (request and expectations).")
@click.option("--name", default="", help="The experiment's name (default: the dataset file's stem).")
@click.option("--concurrency", default=4, show_default=True, type=int, help="Cases in flight at once.")
@click.option("--threshold", default=1.0, show_default=True, type=float,
              help="Exit non-zero when the pass rate is below this.")
@click.option("--timeout", "case_timeout", default=30.0, show_default=True, type=float, help="Seconds per case.")
@environment_option(help="The environment whose binding the cases go through (default: one the deployment serves, "
                    "else any it is bound to).")
@command
def experiments_run(ctx: Ctx, deployment_id: str, dataset: pathlib.Path, name: str, concurrency: int,
                    threshold: float, case_timeout: float, environment: str) -> None:
    """Send every case of DATASET to one deployment and record the run.

    The whole file is checked first (an error names the file, the line and
    the field; nothing is sent or recorded). Each case goes through the
    router pinned to the deployment (X-Berth-Deployment); one scaled to zero
    is woken.
    """
    import re

    from berth import experiments as ex

    if not 0.0 < threshold <= 1.0:
        raise errors.InvalidArgument(f"--threshold {threshold} must be above 0 and at most 1", field="threshold")
    data = ex.load_dataset(dataset)
    name = name or re.sub(r"[^a-z0-9-]+", "-", dataset.stem.lower()).strip("-") or "experiment"
    c = ctx.client()
    project = c.call(c.registry.GetProject, registry_pb2.GetProjectRequest(project=ctx.project))
    dep = c.call(c.registry.GetDeployment,
                 registry_pb2.GetDeploymentRequest(project=project.id, deployment_id=deployment_id))
    bindings = c.list_all(c.registry.ListBindings,
                          registry_pb2.ListBindingsRequest(project=project.id, deployment_id=dep.id), "bindings")
    if not bindings:
        raise errors.FailedPrecondition(f"deployment {dep.id} is bound to no environment: the router cannot reach it",
                                        hint=f"berth promote {dep.id} --to preview")
    if environment:
        binding = next((b for b in bindings if environment in (b.environment_name, b.environment_id)), None)
        if binding is None:
            raise errors.FailedPrecondition(
                f"deployment {dep.id} is not bound to environment {environment!r}",
                hint="bound to: " + ", ".join(b.environment_name for b in bindings))
    else:
        binding = next((b for b in bindings if b.serving), bindings[0])
    show = sys.stderr.isatty() and not ctx.json

    def progress(p: ex.Progress, outcome: ex.Outcome) -> None:
        if show:
            err.print(f"\r{p.done}/{p.total} done, {p.failed} failed", end="", markup=False)

    outcomes = ex.run_dataset(data, router=local.router_url(), project=project.name,
                              environment=binding.environment_name, deployment_id=dep.id,
                              concurrency=concurrency, timeout=case_timeout, on_progress=progress)
    if show:
        err.print("")
    run = c.call(c.registry.RecordExperimentRun, registry_pb2.RecordExperimentRunRequest(
        project=project.id, name=name, deployment_id=dep.id, dataset_digest=data.digest,
        cases=[registry_pb2.ExperimentCaseResult(name=o.name, passed=o.passed, status=o.status,
                                                 latency_ms=o.latency_ms, reason=o.reason) for o in outcomes],
    ))

    def human() -> None:
        for case in run.cases:
            if not case.passed:
                out.print(f"  [red]FAIL[/] {escape(case.name)}: {escape(case.reason)}")
        out.print(f"Run [bold]{run.id}[/] of {run.name} on {run.deployment_id}: {run.passed}/{run.total} passed "
                  f"({run.pass_rate:.1%}), p50 {run.latency_p50_ms:.0f} ms, p99 {run.latency_p99_ms:.0f} ms")

    ctx.emit({"run": run_json(run), "threshold": threshold, "passed": run.pass_rate >= threshold}, human)
    if run.pass_rate < threshold:
        if not ctx.json:
            err.print(f"[bold red]error:[/] pass rate {run.pass_rate:.1%} is below the threshold {threshold:.1%}",
                      markup=True)
        sys.exit(1)


@experiments.command("list")
@click.option("--deployment", "deployment_id", default="", help="Only runs of this deployment.")
@click.option("--name", default="", help="Only runs of this experiment.")
@command
def experiments_list(ctx: Ctx, deployment_id: str, name: str) -> None:
    """The project's experiment runs, newest first."""
    c = ctx.client()
    runs = c.list_all(c.registry.ListExperimentRuns, registry_pb2.ListExperimentRunsRequest(
        project=ctx.project, deployment_id=deployment_id, name=name), "runs")

    def human() -> None:
        t = table("RUN", "EXPERIMENT", "DEPLOYMENT", "PASSED", "RATE", "P50", "P99", "DATASET", "BY", "WHEN")
        for r in runs:
            t.add_row(r.id, r.name, r.deployment_id, f"{r.passed}/{r.total}", f"{r.pass_rate:.1%}",
                      f"{r.latency_p50_ms:.0f} ms", f"{r.latency_p99_ms:.0f} ms", r.dataset_digest[7:19], r.actor,
                      short_time(timestamp(r, "created_at")))
        out.print(t)

    ctx.emit({"runs": [run_json(r) for r in runs]}, human)


@experiments.command("show")
@click.argument("run_id")
@command
def experiments_show(ctx: Ctx, run_id: str) -> None:
    """One run with its per-case results."""
    c = ctx.client()
    r = c.call(c.registry.GetExperimentRun, registry_pb2.GetExperimentRunRequest(project=ctx.project, run_id=run_id))

    def human() -> None:
        out.print(f"Run [bold]{r.id}[/] of {r.name} on {r.deployment_id} by {r.actor} at "
                  f"{short_time(timestamp(r, 'created_at'))}")
        out.print(f"  {r.passed}/{r.total} passed ({r.pass_rate:.1%}), p50 {r.latency_p50_ms:.0f} ms, "
                  f"p99 {r.latency_p99_ms:.0f} ms, dataset {r.dataset_digest}")
        t = table("CASE", "RESULT", "STATUS", "LATENCY", "REASON")
        for case in r.cases:
            t.add_row(case.name, "pass" if case.passed else "FAIL", str(case.status or "-"),
                      f"{case.latency_ms:.0f} ms", case.reason)
        out.print(t)

    ctx.emit({"run": run_json(r)}, human)


@env_group.command("gate")
@click.argument("environment", required=False, default="")
@click.option("--experiment", default="", help="The experiment whose run must pass.")
@click.option("--threshold", type=float, default=None, help="The lowest passing rate (0 < R <= 1).")
@click.option("--dataset", type=click.Path(path_type=pathlib.Path), default=None,
              help="The dataset the run must have used (default: that of the project's newest run of it).")
@click.option("--clear", is_flag=True, help="Remove the environment's gate.")
@command
def env_gate(ctx: Ctx, environment: str, experiment: str, threshold: float | None, dataset: pathlib.Path | None,
             clear: bool) -> None:
    """Make promotions into ENVIRONMENT need a passing experiment run (--clear removes the gate).

    Rollback is not gated; a deploy straight into a gated environment is refused.
    Without ENVIRONMENT, applies every [gates.ENV] table of berth.toml
    (experiment, threshold, dataset), all checked before any is set.
    """
    berth = ctx.sdk()
    if not environment:
        if experiment or threshold is not None or dataset is not None or clear:
            raise errors.InvalidArgument("name the ENVIRONMENT to gate (without one, berth.toml's [gates] apply)",
                                         field="environment")
        apply_project_gates(ctx)
        return
    if clear:
        if experiment or threshold is not None or dataset is not None:
            raise errors.InvalidArgument("--clear takes no --experiment, --threshold or --dataset")
        cleared = berth.clear_gate(ctx.project, environment)
        ctx.emit({"environment": environment, "cleared": cleared},
                 lambda: out.print(f"Gate of {environment} removed" if cleared else f"{environment} had no gate"))
        return
    if not experiment or threshold is None:
        raise errors.InvalidArgument("give --experiment NAME and --threshold R (or --clear)", field="experiment")
    digest = ""
    if dataset is not None:
        from berth import experiments as ex

        digest = ex.load_dataset(dataset).digest
    g = berth.set_gate(ctx.project, environment, experiment, threshold, dataset_digest=digest).raw
    ctx.emit({"gate": gate_json(g)}, lambda: out.print(
        f"Promotions into [bold]{g.environment_name}[/] now need a run of {g.experiment} passing "
        f">= {g.threshold:.1%} on dataset {g.dataset_digest[:19]}…"))


def apply_project_gates(ctx: Ctx) -> None:
    """``berth env gate`` without ENVIRONMENT: the [gates.ENV] tables of the
    berth.toml found here, every dataset read and every environment checked
    before the first gate is set."""
    from berth import experiments as ex

    path = local.find_project_file(pathlib.Path.cwd())
    if path is None:
        raise errors.InvalidArgument("no berth.toml here or in a parent directory: name the ENVIRONMENT to gate",
                                     field="environment")
    specs = ex.load_gates(path)
    project_file = local.load_project_file(path.parent)
    explicit, origin = ctx.project_and_origin()
    if origin not in ("--project", "BERTH_PROJECT") and project_file.project:
        ctx.use_project(project_file.project, str(path))
    for spec in specs:
        find_environment(ctx, spec.environment)  # all known before any is set
    berth = ctx.sdk()
    gates = [berth.set_gate(ctx.project, spec.environment, spec.experiment, spec.threshold,
                            dataset_digest=spec.dataset.digest).raw for spec in specs]

    def human() -> None:
        for g in gates:
            out.print(f"Promotions into [bold]{g.environment_name}[/] need a run of {g.experiment} passing "
                      f">= {g.threshold:.1%} on dataset {g.dataset_digest[:19]}…")

    ctx.emit({"gates": [gate_json(g) for g in gates], "file": str(path)}, human)


# ---------------------------------------------------------------- berth dev


@main.command()
@click.argument("path", required=False, type=click.Path(file_okay=False, path_type=pathlib.Path), default=".")
@environment_option(default="dev", help="The dev environment (created on first use; not a managed one).")
@click.option("--poll", default=0.5, show_default=True, type=float, help="Seconds between looks at the files.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for each build's replica.")
@command
def dev(ctx: Ctx, path: pathlib.Path, environment: str, poll: float, timeout: float) -> None:
    """Run PATH as a live replica with the platform's wiring; rebuild on change, remove on exit.

    The build runs as a deployment of its own dev environment (secrets of the
    project and of that environment are injected by the scheduler, as for any
    replica), its output streams here, and Ctrl-C terminates it (its container
    is removed). A session that crashed is swept on the next start.
    """
    from berth import dev as devmod

    devmod.run(ctx, path, environment, poll=poll, timeout=timeout)


if __name__ == "__main__":
    main()
