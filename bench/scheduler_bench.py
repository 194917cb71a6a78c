"""Scheduler: time from a scale call to N ready replicas, cold start from
zero to the first answered request, and the cost of one reconcile pass with
many bindings (issue 4, "Prove it").

The real ``Reconciler`` on the real Docker engine through the real
``DockerAdapter`` (4 engine threads, as in the service), driven by an
in-memory ``DesiredTable`` (what the registry's Watch stream fills in the
service; the registry bench measures that hop) and a secrets resolver that
answers "no secrets". Replicas are the busybox httpd worker of
tests/support/docker_engine.py, on the ``bridge`` network, reached at their
container address.

- scale: a binding at 0 replicas gets ``min = max = N`` in the desired table
  (what ``ScaleBinding`` becomes once it reaches the scheduler); the time is
  until the reconciler publishes N ready endpoints (each replica answered its
  readiness probe). Then back to 0 and, once every container is gone, the
  next size.
- cold start: a ``min_replicas = 0`` binding with no replica; ``Activate`` (what
  the router calls when a request arrives for it); the time until the
  replica's endpoint is published and until a plain HTTP GET to it answers
  200 (the router forwards the request it held at that point, so this is the
  replica side of a first routed response, without the proxy hop).
- reconcile pass: a fresh reconciler over ``--idle`` bindings wanting 0
  replicas plus ``--running`` bindings wanting 1 (converged first), then
  ``--passes`` timed ``reconcile_once()`` calls that change nothing: wall
  time, this process's CPU time, and where the wall time goes (engine calls
  through the adapter, the rest: probes of the running replicas, planning).
- reference: plain Docker SDK create+start of the same image, one alone and
  ten in a thread pool (the issue's reference, measured again now).
- wake (issue 19, the paused tier): a real platform (``berth up`` on free
  ports, its router, registry and scheduler as shipped), a min-0 deployment
  with ``--idle-pause 1s --idle-stop 5s``; each round waits until its replica
  is paused (``docker pause``) and times one GET through the router until
  its HTTP 200 (the router activates, the scheduler thaws the replica and
  checks it answers, the router forwards), then waits until the replica is
  stopped (removed) and times the same GET from stopped (a container created
  and started). p50/p99 of each and their ratio; target: from paused p50
  under 30 ms.

Prints figures with the target (10 ready replicas in under 2 s); asserts
nothing. Everything it creates carries a unique ``berth.instance`` (images:
``berth.test=<run id>``) and is removed at the end, even on Ctrl-C/SIGTERM.

    python bench/scheduler_bench.py [--sizes 1,5,10] [--repeat 3] [--cold 3]
                                    [--idle 100] [--running 10] [--passes 20]
                                    [--wake 10] [--skip reference,scale,cold,pass,wake]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402

from berth.v1 import common_pb2  # noqa: E402
from services.scheduler.desired import DesiredTable, binding_key  # noqa: E402
from services.scheduler.docker_adapter import DockerAdapter  # noqa: E402
from services.scheduler.events import EventStore  # noqa: E402
from services.scheduler.reconciler import Reconciler, SchedulerConfig  # noqa: E402
from services.scheduler.spec import SecretValue  # noqa: E402
from tests.support.docker_engine import RUN_ID, build_worker_image, engine  # noqa: E402

TARGET_10_READY_S = 2.0
TARGET_WAKE_FROM_PAUSED_P50_S = 0.030
REFERENCE = "one create+start ~0.2 s; ten in a thread pool ~1.2 s (issue 4)"


class NoSecrets:
    async def resolve(self, project_id: str, environment_id: str) -> Sequence[SecretValue]:
        return []


class TimedAdapter:
    """Delegates to the real adapter, recording the time of each engine call
    (``times``: durations; ``spans``: (start, end) perf_counter pairs)."""

    def __init__(self, inner: DockerAdapter) -> None:
        self._inner = inner
        self.times: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.times[name].append(end - start)
                self.spans[name].append((start, end))

        return timed


def binding(image_id: str, *, deployment_id: str, environment_id: str, min_replicas: int, max_replicas: int) -> common_pb2.Binding:
    return common_pb2.Binding(
        project_id="prj-bench",
        project_name="bench",
        environment_id=environment_id,
        environment_name="staging",
        deployment=common_pb2.Deployment(
            id=deployment_id,
            project_id="prj-bench",
            image="",
            image_id=image_id,
            config=common_pb2.WorkerConfig(port=8080),
            state="active",
            created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        ),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        state="active",
        serving=True,
    )


def config(instance: str) -> SchedulerConfig:
    # The service's defaults, except a short stop grace and no drain delay:
    # they only slow down the scale-downs between measurements.
    return SchedulerConfig(instance=instance, stop_grace=1.0, drain_delay=0.0)


class ReadyMarks(logging.Handler):
    """When the reconciler logs a replica ready (its startup probe answered)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "ready":
            self.times.append(time.perf_counter())


def ready_count(reconciler: Reconciler, deployment_id: str) -> int:
    return sum(len(s.addresses) for s in reconciler.endpoints.current if s.deployment_id == deployment_id)


def first_address(reconciler: Reconciler, deployment_id: str) -> str | None:
    for s in reconciler.endpoints.current:
        if s.deployment_id == deployment_id and s.addresses:
            return s.addresses[0]
    return None


async def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, step: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)


def http_ok(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/cgi-bin/index.cgi", timeout=2) as response:
            response.read()
            return response.status == 200
    except OSError:
        return False


async def containers_of(adapter: DockerAdapter, instance: str, deployment_id: str) -> int:
    return len(await adapter.list_managed(instance, {"berth.deployment": deployment_id}))


# ----------------------------------------------------------------- phases


def reference(client: docker.DockerClient, image_id: str, instance: str) -> tuple[float, float, float]:
    """Plain SDK create+start (+inspect, as the adapter does): one alone,
    then ten with 4 threads (the adapter's pool) and ten with 10 threads."""
    labels = {"berth.instance": instance, "berth.test": RUN_ID}

    def one() -> None:
        c = client.containers.create(image_id, detach=True, init=True, network="bridge", labels=labels)
        c.start()
        client.api.inspect_container(c.id)

    def remove_all() -> None:
        for c in client.containers.list(all=True, filters={"label": f"berth.instance={instance}"}, ignore_removed=True):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass

    start = time.perf_counter()
    one()
    single = time.perf_counter() - start
    remove_all()
    results = []
    for threads in (4, 10):
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(lambda _: one(), range(10)))
            results.append(time.perf_counter() - start)
        remove_all()
    return single, results[0], results[1]


async def bench_scale(
    adapter: DockerAdapter, image_id: str, instance: str, sizes: list[int], repeat: int
) -> tuple[dict[int, list[float]], dict[int, list[tuple[float, float, float, float]]]]:
    """Per size: the times, and a breakdown of each run (seconds after the
    scale call): first create started, last create returned, last replica
    ready (probe answered), first endpoint published."""
    table = DesiredTable()
    env, dep = f"env-scale-{uuid.uuid4().hex[:6]}", f"dep-scale-{uuid.uuid4().hex[:6]}"
    table.replace([], [binding(image_id, deployment_id=dep, environment_id=env, min_replicas=0, max_replicas=0)])
    timed = TimedAdapter(adapter)
    reconciler = Reconciler(timed, table, NoSecrets(), EventStore(), config(instance))  # type: ignore[arg-type]
    marks = ReadyMarks()
    reconciler_log = logging.getLogger("berth.scheduler.reconciler")
    reconciler_log.addHandler(marks)
    reconciler_log.setLevel(logging.INFO)
    reconciler_log.propagate = False
    task = asyncio.create_task(reconciler.run())
    results: dict[int, list[float]] = defaultdict(list)
    breakdown: dict[int, list[tuple[float, float, float, float]]] = defaultdict(list)
    try:
        for _ in range(repeat):
            for n in sizes:
                timed.spans.clear()
                marks.times.clear()
                first_published = 0.0
                start = time.perf_counter()
                table.upsert_binding(binding(image_id, deployment_id=dep, environment_id=env, min_replicas=n, max_replicas=n))

                def progress() -> bool:
                    nonlocal first_published
                    ready = ready_count(reconciler, dep)
                    if ready and not first_published:
                        first_published = time.perf_counter() - start
                    return ready >= n

                await wait_until(progress, timeout=120, what=f"{n} ready replicas")
                results[n].append(time.perf_counter() - start)
                runs = timed.spans.get("run", [])
                breakdown[n].append((
                    min((a for a, _ in runs), default=start) - start,
                    max((b for _, b in runs), default=start) - start,
                    max(marks.times, default=start) - start,
                    first_published,
                ))
                print(f"   scale 0 -> {n:2d}: {results[n][-1]:.3f} s", flush=True)
                table.upsert_binding(binding(image_id, deployment_id=dep, environment_id=env, min_replicas=0, max_replicas=0))
                await wait_until(lambda: ready_count(reconciler, dep) == 0, timeout=60, what="0 endpoints")
                await wait_until(
                    lambda: _none_left(adapter, instance, dep), timeout=120, what="every container removed", step=0.1
                )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reconciler.close()
        reconciler_log.removeHandler(marks)
        reconciler_log.propagate = True
    return results, breakdown


async def _none_left(adapter: DockerAdapter, instance: str, dep: str) -> bool:
    return await containers_of(adapter, instance, dep) == 0


async def bench_cold_start(adapter: DockerAdapter, image_id: str, instance: str, trials: int) -> list[tuple[float, float]]:
    table = DesiredTable()
    table.replace([], [])
    reconciler = Reconciler(adapter, table, NoSecrets(), EventStore(), config(instance))
    task = asyncio.create_task(reconciler.run())
    results = []
    try:
        for _ in range(trials):
            env, dep = f"env-cold-{uuid.uuid4().hex[:6]}", f"dep-cold-{uuid.uuid4().hex[:6]}"
            b = binding(image_id, deployment_id=dep, environment_id=env, min_replicas=0, max_replicas=3)
            table.upsert_binding(b)
            await reconciler.reconcile_once()  # the binding is known and at zero
            if await containers_of(adapter, instance, dep):
                raise RuntimeError("a min-0 binding without activation got a replica")
            start = time.perf_counter()
            reconciler.activate(binding_key(b))
            address = await wait_until(lambda: first_address(reconciler, dep), timeout=120, what="a ready replica")
            published = time.perf_counter() - start
            await wait_until(lambda: asyncio.to_thread(http_ok, address), timeout=30, what="HTTP 200")
            answered = time.perf_counter() - start
            results.append((published, answered))
            print(f"   cold start: endpoint {published:.3f} s, first HTTP 200 {answered:.3f} s", flush=True)
            table.upsert_binding(binding(image_id, deployment_id=dep, environment_id=env, min_replicas=0, max_replicas=0))
            await wait_until(lambda: _none_left(adapter, instance, dep), timeout=120, what="replica removed", step=0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reconciler.close()
    return results


async def bench_pass(adapter: DockerAdapter, image_id: str, instance: str, idle: int, running: int, passes: int) -> dict[str, Any]:
    table = DesiredTable()
    tag = uuid.uuid4().hex[:6]
    bindings = [
        binding(image_id, deployment_id=f"dep-idle-{tag}-{i}", environment_id=f"env-pass-{tag}", min_replicas=0, max_replicas=3)
        for i in range(idle)
    ] + [
        binding(image_id, deployment_id=f"dep-run-{tag}-{i}", environment_id=f"env-pass-{tag}", min_replicas=1, max_replicas=1)
        for i in range(running)
    ]
    table.replace([], bindings)
    timed = TimedAdapter(adapter)
    reconciler = Reconciler(timed, table, NoSecrets(), EventStore(), config(instance))  # type: ignore[arg-type]
    try:
        start = time.perf_counter()
        deadline = time.monotonic() + 180
        while True:  # converge: every running binding has its ready replica and a pass changes nothing
            result = await reconciler.reconcile_once()
            ready = sum(1 for s in reconciler.endpoints.current if s.addresses)
            if result.empty and ready == running and not reconciler._startup_probes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not converged within 180 s ({ready}/{running} ready)")
            await asyncio.sleep(0.05)
        converge = time.perf_counter() - start
        print(f"   converged {idle} idle + {running} running bindings in {converge:.2f} s", flush=True)
        timed.times.clear()
        walls, cpus, changed = [], [], 0
        for _ in range(passes):
            cpu, wall = time.process_time(), time.perf_counter()
            result = await reconciler.reconcile_once()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            changed += 0 if result.empty else 1
        engine_time = {name: sum(v) / passes for name, v in timed.times.items()}
        engine_calls = {name: len(v) / passes for name, v in timed.times.items()}
        return {"walls": walls, "cpus": cpus, "changed": changed, "engine": engine_time, "calls": engine_calls,
                "converge": converge}
    finally:
        await reconciler.close()


def bench_wake(image_tag: str, rounds: int) -> tuple[list[float], list[float]]:
    """Wake from paused and from stopped through a real platform's router
    (see the module docstring): (paused times, stopped times), seconds."""
    import tempfile

    import requests

    from tests.support.platform import RunningPlatform, eventually

    with tempfile.TemporaryDirectory(prefix="berth-wake-bench-") as tmp:
        platform = RunningPlatform(Path(tmp) / "data")
        platform.data_dir.mkdir()
        platform.env.update({"BERTH_DRAIN_DELAY": "0.2", "BERTH_SCALE_DOWN_WINDOW": "1"})
        try:
            platform.start()
            key = platform.cli_json("projects", "create", "wake")["api_key"]
            dep = platform.cli_json(
                "deploy", "--image", image_tag, "--project", "wake", "--min-replicas", "0", "--max-replicas", "1",
                "--idle-pause", "1s", "--idle-stop", "5s", "--no-wait", api_key=key,
            )["deployment"]["id"]
            session = requests.Session()
            headers = {"X-Berth-Project": "wake", "X-Berth-Environment": "preview"}

            def statuses() -> list[str]:
                return [c.status for c in engine().containers.list(
                    all=True, ignore_removed=True,
                    filters={"label": [f"berth.instance={platform.instance}", f"berth.deployment={dep}"]})]

            def timed_get() -> float:
                start = time.perf_counter()
                answer = session.get(platform.router + "/cgi-bin/index.cgi", headers=headers, timeout=60)
                took = time.perf_counter() - start
                if answer.status_code != 200:
                    raise RuntimeError(f"GET through the router answered {answer.status_code}: {answer.text[:200]}")
                return took

            timed_get()  # the first replica (and the router's connection) exist
            paused, stopped = [], []
            for i in range(rounds):
                eventually(lambda: statuses() == ["paused"], timeout=60, interval=0.05, what="the replica paused")
                paused.append(timed_get())
                eventually(lambda: statuses() == ["paused"], timeout=60, interval=0.05, what="paused again")
                eventually(lambda: statuses() == [], timeout=60, interval=0.05, what="the replica stopped")
                stopped.append(timed_get())
                print(f"   round {i + 1}: from paused {paused[-1] * 1000:.1f} ms, "
                      f"from stopped {stopped[-1] * 1000:.1f} ms", flush=True)
            return paused, stopped
        finally:
            platform.stop()
            platform.remove_containers()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------- main


def cleanup(client: docker.DockerClient, instance: str, image_id: str | None) -> None:
    for c in client.containers.list(all=True, filters={"label": f"berth.instance={instance}"}, ignore_removed=True):
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
    if image_id:
        try:
            client.images.remove(image_id, force=True)
        except docker.errors.NotFound:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,5,10")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--idle", type=int, default=100)
    parser.add_argument("--running", type=int, default=10)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--wake", type=int, default=10, help="rounds of wake from paused / from stopped")
    parser.add_argument("--skip", default="", help="phases to skip: reference,scale,cold,pass,wake")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally block

    client = engine()
    instance = f"bench{uuid.uuid4().hex[:8]}"
    image_id: str | None = None
    adapter = DockerAdapter(client, network="bridge")
    try:
        print(f"instance {instance}; building the worker image", flush=True)
        image_tag, image_id = build_worker_image(client, version="bench", labels={"berth.bench": instance})
        ref = None
        if "reference" not in skip:
            print("== reference: plain Docker SDK create+start", flush=True)
            ref = reference(client, image_id, instance)

        async def phases() -> tuple[Any, Any, Any]:
            scale = cold = cost = None
            if "scale" not in skip:
                print("== scale: desired count 0 -> N, until N ready endpoints", flush=True)
                scale = await bench_scale(adapter, image_id, instance, sizes, args.repeat)  # type: ignore[arg-type]
            if "cold" not in skip:
                print("== cold start: min-0 binding, Activate, until a replica answers", flush=True)
                cold = await bench_cold_start(adapter, image_id, instance, args.cold)  # type: ignore[arg-type]
            if "pass" not in skip:
                print(f"== reconcile pass: {args.idle} bindings at 0 + {args.running} at 1", flush=True)
                cost = await bench_pass(adapter, image_id, instance, args.idle, args.running, args.passes)  # type: ignore[arg-type]
            return scale, cold, cost

        scale, cold, cost = asyncio.run(phases())
        wake = None
        if "wake" not in skip and args.wake > 0:
            print("== wake: GET through a real platform's router, from paused and from stopped", flush=True)
            wake = bench_wake(image_tag, args.wake)
    finally:
        adapter.close()
        cleanup(client, instance, image_id)

    ms = lambda s: f"{s * 1000:8.1f}"  # noqa: E731
    print("\n" + "=" * 78)
    print(f"Scheduler bench  ({os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end)")
    print("=" * 78)
    if ref is not None:
        print("reference, plain Docker SDK (create + start + inspect):")
        print(f"  one container                              {ref[0]:7.3f} s")
        print(f"  ten, 4 threads (the adapter's pool size)   {ref[1]:7.3f} s")
        print(f"  ten, 10 threads                            {ref[2]:7.3f} s")
        print(f"  issue's reference: {REFERENCE}")
    if scale is not None:
        scale, breakdown = scale
        print("scale call -> N ready replicas (seconds; reconciler + engine + readiness probe):")
        print(f"  {'N':>3} {'median':>8} {'min':>8} {'max':>8}   runs")
        for n in sizes:
            v = scale[n]
            print(f"  {n:3d} {statistics.median(v):8.3f} {min(v):8.3f} {max(v):8.3f}   "
                  + " ".join(f"{x:.3f}" for x in v))
        print("  where the time goes (medians, seconds after the scale call):")
        print(f"  {'N':>3} {'1st create':>11} {'last create':>12} {'last ready':>11} {'1st routed':>11} {'all routed':>11}")
        for n in sizes:
            cols = list(zip(*breakdown[n], strict=True))
            print(f"  {n:3d} {statistics.median(cols[0]):11.3f} {statistics.median(cols[1]):12.3f} "
                  f"{statistics.median(cols[2]):11.3f} {statistics.median(cols[3]):11.3f} "
                  f"{statistics.median(scale[n]):11.3f}")
        print("  (1st create: a create+start call began; last create: the last one returned;")
        print("   last ready: the last replica answered its startup probe; 1st/all routed: the")
        print("   first/all N addresses were in the published endpoints)")
        if 10 in scale:
            m = statistics.median(scale[10])
            print(f"  target: 10 ready replicas in under {TARGET_10_READY_S:g} s -- median {m:.3f} s, "
                  f"worst {max(scale[10]):.3f} s: {'meets' if max(scale[10]) < TARGET_10_READY_S else 'misses'} "
                  f"the target{' (median meets it)' if m < TARGET_10_READY_S <= max(scale[10]) else ''}")
    if cold is not None:
        pub = [p for p, _ in cold]
        ans = [a for _, a in cold]
        print("cold start, min-0 binding: Activate -> (seconds)")
        print(f"  endpoint published   median {statistics.median(pub):.3f}  min {min(pub):.3f}  max {max(pub):.3f}")
        print(f"  first HTTP 200       median {statistics.median(ans):.3f}  min {min(ans):.3f}  max {max(ans):.3f}")
    if cost is not None:
        walls, cpus = cost["walls"], cost["cpus"]
        print(f"one reconcile pass, converged ({args.idle} bindings at 0 replicas + {args.running} at 1 = "
              f"{args.running} running containers), {args.passes} passes (ms):")
        print(f"  wall  median {ms(statistics.median(walls))}  min {ms(min(walls))}  max {ms(max(walls))}")
        print(f"  CPU of this process  median {ms(statistics.median(cpus))}")
        print(f"  passes that planned a change: {cost['changed']}")
        print("  engine calls through the adapter per pass (count, wall ms):")
        for name, t in sorted(cost["engine"].items(), key=lambda kv: -kv[1]):
            print(f"    {name:20} {cost['calls'][name]:6.1f}  {t * 1000:8.1f}")
        rest = statistics.mean(walls) - sum(cost["engine"].values())
        print(f"  the rest (probes of the running replicas, planning, status): {rest * 1000:.1f} ms")
    if wake is not None:
        paused, stopped = wake
        p50p, p99p = percentile(paused, 0.5), percentile(paused, 0.99)
        p50s, p99s = percentile(stopped, 0.5), percentile(stopped, 0.99)
        print(f"wake a min-0 binding: GET through the router -> first HTTP 200, {len(paused)} rounds (ms):")
        print(f"  from paused    p50 {ms(p50p)}  p99 {ms(p99p)}  min {ms(min(paused))}  max {ms(max(paused))}")
        print(f"  from stopped   p50 {ms(p50s)}  p99 {ms(p99s)}  min {ms(min(stopped))}  max {ms(max(stopped))}")
        print(f"  stopped / paused: p50 {p50s / p50p:.1f}x, p99 {p99s / p99p:.1f}x")
        print(f"  target: from paused p50 under {TARGET_WAKE_FROM_PAUSED_P50_S * 1000:g} ms -- "
              f"{'meets' if p50p < TARGET_WAKE_FROM_PAUSED_P50_S else 'misses'} it")


if __name__ == "__main__":
    main()
