"""Registry: promote latency, pointer moves per second and watch propagation,
on SQLite and on PostgreSQL (issue 3, "Prove it").

A real registry gRPC server (``services.registry.app.start`` on port 0) runs
in a child process, so the load-generating client threads do not share its
interpreter lock; clients reach it over a real socket with ordinary blocking
stubs. The PostgreSQL store is a throwaway cluster (``initdb``/``pg_ctl`` in a
temp dir, ``fsync=off`` like the tests' cluster) started and removed here.

For each store:
- promote latency: sequential Promote calls alternating two deployments in
  one environment (``staging``), p50/p99 of the client-observed time;
- pointer moves per second: concurrent client threads, each moving the
  pointer of its own environment back and forth, for a fixed duration;
- watch propagation: a ``Registry.Watch`` subscriber (service token) in its
  own thread; for each move, the time from the Promote call's return to the
  arrival of the environment event carrying that move's sequence number.
  Moves are made one at a time (the next after the event arrived).

With ``--baseline-tree DIR`` (a checkout of an earlier commit, e.g. the one
before a change to the promote path: ``git worktree add DIR COMMIT`` or
``git archive COMMIT | tar -x -C DIR``), a second registry runs that tree's
code on its own database next to this one, and the promote latency is
measured on both, one call on each in turn (so both see the same machine load):
p50/p99 before and after, and the ratio (issue 19). ``--latency-only``
skips the throughput and propagation phases.

Prints figures and the target (propagation p99 under 50 ms); asserts nothing.

    python bench/registry_bench.py [--promotes 300] [--threads 8] [--duration 5] [--moves 200]
                                   [--backends sqlite,postgresql] [--baseline-tree DIR] [--latency-only]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The registry child of --baseline-tree imports that tree's code.
CODE_ROOT = Path(os.environ.get("BERTH_BENCH_CODE_ROOT") or ROOT)
sys.path.insert(0, str(CODE_ROOT))

import grpc  # noqa: E402

from berth.internal.v1 import registry_internal_pb2, registry_internal_pb2_grpc  # noqa: E402
from berth.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402

ADMIN_KEY = "berth_admin_bench-admin-key"
SERVICE_TOKEN = "berth_svc_bench-service-token"
TARGET_PROPAGATION_P99_MS = 50.0


# ----------------------------------------------------------------- server


def serve(database_url: str) -> None:
    """Child process: the registry on a free port; prints the port, runs
    until SIGTERM."""
    from services.common import logs
    from services.registry import app

    logs.configure("registry", "WARNING")

    async def main() -> None:
        running, service = await app.start(
            host="127.0.0.1", port=0, database_url=database_url, admin_key=ADMIN_KEY, service_token=SERVICE_TOKEN
        )
        print(f"PORT {running.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await running.stop(0.5)
        service._sessions.kw["bind"].dispose()

    asyncio.run(main())


class RegistryProcess:
    def __init__(self, database_url: str, code_root: Path | None = None) -> None:
        env = {**os.environ, "BERTH_BENCH_CODE_ROOT": str(code_root or ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", database_url],
            cwd=code_root or ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env,
        )
        port = self._read_port(timeout=60)
        self.address = f"127.0.0.1:{port}"

    def _read_port(self, timeout: float) -> int:
        found: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: found.put(self.proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            line = found.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"the registry did not start within {timeout:g} s") from None
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the registry did not start (exit {self.proc.poll()}): {line!r}")
        return int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ----------------------------------------------------------------- client


class Client:
    def __init__(self, address: str, key: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        self.key = key

    def call(self, name: str, request, key: str | None = None):  # type: ignore[no-untyped-def]
        return getattr(self.stub, name)(request, metadata=(("x-api-key", key or self.key),), timeout=30)

    def close(self) -> None:
        self.channel.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def setup(address: str) -> tuple[Client, str, str]:
    admin = Client(address, ADMIN_KEY)
    created = admin.call("CreateProject", registry_pb2.CreateProjectRequest(name="bench"))
    admin.close()
    client = Client(address, created.api_key)
    a = client.call("Deploy", registry_pb2.DeployRequest(image="bench/app:1")).deployment.id
    b = client.call("Deploy", registry_pb2.DeployRequest(image="bench/app:2")).deployment.id
    return client, a, b


def promote(client: Client, deployment_id: str, environment: str):  # type: ignore[no-untyped-def]
    return client.call(
        "Promote", registry_pb2.PromoteRequest(deployment_id=deployment_id, target_environment=environment)
    )


def bench_latency(client: Client, a: str, b: str, count: int) -> list[float]:
    promote(client, a, "staging")  # first move into the environment, not timed
    latencies = []
    for i in range(count):
        start = time.perf_counter()
        promote(client, b if i % 2 == 0 else a, "staging")
        latencies.append(time.perf_counter() - start)
    return latencies


def bench_throughput(address: str, key: str, a: str, b: str, threads: int, duration: float) -> tuple[int, float, Counter[str]]:
    setup_client = Client(address, key)
    names = [f"bench-{i}" for i in range(threads)]
    for name in names:
        setup_client.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name=name))
        promote(setup_client, a, name)
    setup_client.close()
    counts = [0] * threads
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        client = Client(address, key)  # one connection per client
        try:
            barrier.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                try:
                    promote(client, b if n % 2 == 0 else a, names[i])
                    n += 1
                except grpc.RpcError as exc:
                    with lock:
                        failures[exc.code().name] += 1
            counts[i] = n
        finally:
            client.close()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start = time.perf_counter()
    stop_at[0] = start + duration
    barrier.wait()
    for t in pool:
        t.join(duration + 60)
    elapsed = time.perf_counter() - start
    return sum(counts), elapsed, failures


class Subscriber:
    """Reads Registry.Watch in a thread; records when each environment
    event (name, sequence) arrives."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, SERVICE_TOKEN)
        self.arrived: dict[tuple[str, int], float] = {}
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stream = registry_internal_pb2_grpc.RegistryInternalStub(self.client.channel).Watch(
            registry_internal_pb2.WatchRequest(since_revision=0), metadata=(("x-api-key", SERVICE_TOKEN),)
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                now = time.perf_counter()
                if event.snapshot_complete:
                    self.ready.set()
                if event.WhichOneof("change") == "environment":
                    with self.cond:
                        self.arrived[(event.environment.name, event.environment.sequence)] = now
                        self.cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.error = exc
        finally:
            self.ready.set()
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, key: tuple[str, int], timeout: float) -> float | None:
        deadline = time.perf_counter() + timeout
        with self.cond:
            while key not in self.arrived:
                left = deadline - time.perf_counter()
                if left <= 0 or self.error is not None or not self.thread.is_alive():
                    return None
                self.cond.wait(left)
            return self.arrived[key]

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)
        self.client.close()


def bench_propagation(
    address: str, client: Client, a: str, b: str, moves: int, *, environment: str, background: int = 0
) -> tuple[list[float], list[float], int]:
    """Returns (return->event, call start->event) in seconds, and lost events.
    With ``background`` > 0, that many other clients keep moving their own
    environments' pointers meanwhile (the subscriber sees all their events)."""
    client.call("CreateEnvironment", registry_pb2.CreateEnvironmentRequest(name=environment))
    sub = Subscriber(address)
    done = threading.Event()
    movers: list[threading.Thread] = []

    def mover(i: int) -> None:
        other = Client(address, client.key)
        try:
            n = 0
            while not done.is_set():
                try:
                    promote(other, b if n % 2 == 0 else a, f"bench-{i}")
                except grpc.RpcError:
                    pass
                n += 1
        finally:
            other.close()

    try:
        for i in range(background):
            movers.append(threading.Thread(target=mover, args=(i,), daemon=True))
            movers[-1].start()
        if not sub.ready.wait(30):
            raise RuntimeError("no snapshot from Registry.Watch within 30 s")
        after_return, after_start, lost = [], [], 0
        for i in range(moves):
            start = time.perf_counter()
            env = promote(client, b if i % 2 == 0 else a, environment).environment
            returned = time.perf_counter()
            arrived = sub.wait_for((env.name, env.sequence), timeout=10)
            if arrived is None:
                lost += 1
                if sub.error is not None:
                    raise RuntimeError(f"watch stream failed: {sub.error}")
                continue
            after_return.append(arrived - returned)
            after_start.append(arrived - start)
        return after_return, after_start, lost
    finally:
        done.set()
        for t in movers:
            t.join(30)
        sub.close()


# ----------------------------------------------------------------- main


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def bench_latency_against(
    server: RegistryProcess, client: Client, a: str, b: str, baseline_url: str, baseline_tree: Path, count: int,
) -> tuple[list[float], list[float]]:
    """Promote latency of this tree's registry and of the baseline tree's
    (its own registry process and database), one call on each in turn."""
    base_server = RegistryProcess(baseline_url, code_root=baseline_tree)
    try:
        base_client, base_a, base_b = setup(base_server.address)
        try:
            promote(client, a, "staging")  # first moves into the environment, not timed
            promote(base_client, base_a, "staging")
            mine: list[float] = []
            theirs: list[float] = []
            for i in range(count):  # one call on each in turn: both see the same machine load
                pair = [(base_client, base_a, base_b, theirs), (client, a, b, mine)]
                # Which goes first alternates too: the one that follows runs
                # while the other's registry still works on its commit (the
                # change feed's tailer), which shows in its tail.
                for c, x, y, out in pair if (i // 2) % 2 == 0 else pair[::-1]:
                    started = time.perf_counter()
                    promote(c, y if i % 2 == 0 else x, "staging")
                    out.append(time.perf_counter() - started)
            return mine, theirs
        finally:
            base_client.close()
    finally:
        base_server.stop()


def run_backend(
    name: str, database_url: str, args: argparse.Namespace, baseline_url: str = ""
) -> dict[str, object]:
    print(f"\n== {name}: starting the registry ({database_url.split('@')[-1]})", flush=True)
    server = RegistryProcess(database_url)
    try:
        client, a, b = setup(server.address)
        try:
            baseline: list[float] = []
            if args.baseline_tree:
                latencies, baseline = bench_latency_against(
                    server, client, a, b, baseline_url, Path(args.baseline_tree), args.promotes)
            else:
                latencies = bench_latency(client, a, b, args.promotes)
            print(f"   promote latency: {len(latencies)} sequential calls done", flush=True)
            if args.latency_only:
                return {"name": name, "latencies": latencies, "baseline": baseline}
            moved, elapsed, failures = bench_throughput(server.address, client.key, a, b, args.threads, args.duration)
            print(f"   throughput: {moved} moves in {elapsed:.2f} s by {args.threads} clients", flush=True)
            after_return, after_start, lost = bench_propagation(
                server.address, client, a, b, args.moves, environment="watched")
            print(f"   propagation: {len(after_return)} moves observed, {lost} lost", flush=True)
            background = max(0, args.threads - 1)
            loaded_return, loaded_start, loaded_lost = bench_propagation(
                server.address, client, a, b, args.moves, environment="watched-loaded", background=background)
            print(f"   propagation with {background} other clients moving: {len(loaded_return)} moves observed, "
                  f"{loaded_lost} lost", flush=True)
        finally:
            client.close()
    finally:
        server.stop()
    return {
        "name": name,
        "latencies": latencies,
        "baseline": baseline,
        "moves_per_s": moved / elapsed if elapsed else 0.0,
        "failures": failures,
        "after_return": after_return,
        "after_start": after_start,
        "lost": lost,
        "early": sum(1 for x in after_return if x < 0),
        "loaded_return": loaded_return,
        "loaded_start": loaded_start,
        "loaded_lost": loaded_lost,
        "loaded_early": sum(1 for x in loaded_return if x < 0),
    }


def report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    print("\n" + "=" * 78)
    print(f"Registry bench  ({os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end)")
    print("=" * 78)
    print(f"{'figure':44} " + " ".join(f"{r['name']:>14}" for r in results))

    def row(label: str, fn: Callable[[dict[str, object]], str]) -> None:
        print(f"{label:44} " + " ".join(f"{fn(r):>14}" for r in results))

    row(f"promote latency p50 (ms, n={args.promotes})", lambda r: ms(pct(r["latencies"], 50)))  # type: ignore[arg-type]
    row("promote latency p99 (ms)", lambda r: ms(pct(r["latencies"], 99)))  # type: ignore[arg-type]
    row("promote latency max (ms)", lambda r: ms(max(r["latencies"])))  # type: ignore[arg-type]
    if args.baseline_tree:
        row("baseline tree: promote p50 (ms)", lambda r: ms(pct(r["baseline"], 50)))  # type: ignore[arg-type]
        row("baseline tree: promote p99 (ms)", lambda r: ms(pct(r["baseline"], 99)))  # type: ignore[arg-type]
        row("  p50 after / before", lambda r: f"{pct(r['latencies'], 50) / pct(r['baseline'], 50):.2f}x")  # type: ignore[arg-type]
        row("  p99 after / before", lambda r: f"{pct(r['latencies'], 99) / pct(r['baseline'], 99):.2f}x")  # type: ignore[arg-type]
    if args.latency_only:
        print("-" * 78)
        if args.baseline_tree:
            print(f"baseline tree: {args.baseline_tree} (same client, one call on each in turn)")
        return
    row(f"pointer moves/s ({args.threads} clients, {args.duration:g} s)", lambda r: f"{r['moves_per_s']:.1f}")
    row("  failed calls during that", lambda r: ", ".join(f"{k}:{v}" for k, v in r["failures"].items()) or "0")  # type: ignore[attr-defined]
    row(f"propagation p50 (ms, return->event, n={args.moves})", lambda r: ms(pct(r["after_return"], 50)))  # type: ignore[arg-type]
    row("propagation p99 (ms, return->event)", lambda r: ms(pct(r["after_return"], 99)))  # type: ignore[arg-type]
    row("propagation max (ms, return->event)", lambda r: ms(max(r["after_return"] or [float("nan")])))  # type: ignore[type-var]
    row("  events that arrived before the return", lambda r: str(r["early"]))
    row("call start->event p50 (ms)", lambda r: ms(pct(r["after_start"], 50)))  # type: ignore[arg-type]
    row("call start->event p99 (ms)", lambda r: ms(pct(r["after_start"], 99)))  # type: ignore[arg-type]
    row("  moves whose event never came (10 s)", lambda r: str(r["lost"]))
    bg = max(0, args.threads - 1)
    row(f"with {bg} other clients moving pointers:", lambda r: "")
    row("  propagation p50 (ms, return->event)", lambda r: ms(pct(r["loaded_return"], 50)))  # type: ignore[arg-type]
    row("  propagation p99 (ms, return->event)", lambda r: ms(pct(r["loaded_return"], 99)))  # type: ignore[arg-type]
    row("  events that arrived before the return", lambda r: str(r["loaded_early"]))
    row("  call start->event p50 (ms)", lambda r: ms(pct(r["loaded_start"], 50)))  # type: ignore[arg-type]
    row("  call start->event p99 (ms)", lambda r: ms(pct(r["loaded_start"], 99)))  # type: ignore[arg-type]
    row("  moves whose event never came (10 s)", lambda r: str(r["loaded_lost"]))
    print("-" * 78)
    print("A negative return->event time means the subscriber had the event before the")
    print("promoting client had its answer (the registry publishes on commit, before")
    print("replying); such a move counts as 0 ms against the target below.")
    for r in results:
        for label, key in (("idle", "after_return"), ("loaded", "loaded_return")):
            p99 = max(0.0, pct(r[key], 99)) * 1000  # type: ignore[arg-type]
            verdict = "meets" if p99 < TARGET_PROPAGATION_P99_MS else "MISSES"
            print(f"target: watch propagation p99 < {TARGET_PROPAGATION_P99_MS:g} ms -- {r['name']} ({label}): "
                  f"{p99:.2f} ms, {verdict} the target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--promotes", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--moves", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--baseline-tree", default="",
                        help="a checkout of an earlier commit: its registry's promote latency is measured alongside")
    parser.add_argument("--latency-only", action="store_true", help="only the promote latency (no throughput, "
                        "no propagation)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    results = []
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend == "sqlite":
            tmp = tempfile.mkdtemp(prefix="berth-bench-registry-")
            try:
                results.append(run_backend("sqlite", f"sqlite:///{tmp}/registry.db", args,
                                           baseline_url=f"sqlite:///{tmp}/baseline.db"))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif backend == "postgresql":
            from tests.support.postgres import running_cluster

            with running_cluster() as cluster:
                baseline_url = cluster.create_database("baseline") if args.baseline_tree else ""
                results.append(run_backend("postgresql", cluster.create_database("bench"), args,
                                           baseline_url=baseline_url))
        else:
            parser.error(f"unknown backend {backend!r}: use sqlite and/or postgresql")
    report(results, args)


if __name__ == "__main__":
    main()
