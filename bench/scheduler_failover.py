"""Scheduler failover (issue 15): seconds from the leader's death to the
standby leading, over several kills; and what the lease costs a single
scheduler at startup.

Failover: a throwaway PostgreSQL cluster, a registry and a secrets service
on it, two schedulers on the same database and the local engine, a busybox
worker with 2 replicas. Then ``--kills`` times: SIGKILL the leader at a
random moment of its renewal cycle, time until the standby reports SERVING
for ``berth.v1.Scheduler`` (what health-checked clients go by), check it
adopted the replicas (same containers, none added or removed), start a new
standby, wait a random fraction of the lease. A graceful stop (SIGTERM,
the lease released) is timed the same way. Printed: each takeover, then
min / median / max against the lease duration.

Startup: one scheduler on SQLite under a data directory, as ``berth up``
runs it: seconds from spawn to SERVING (desired state loaded and lease
held), a cold start, a restart after SIGTERM (lease released), and a restart
after SIGKILL (the dead holder's lease is taken over at once on one
machine).

    python bench/scheduler_failover.py [--kills 5] [--lease 4] [--baseline-tree DIR]

Figures only: nothing is asserted. Everything created carries its own
``berth.instance`` and is removed at the end."""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from berth.platform import PDEATHSIG_WRAPPER  # noqa: E402
from tests.e2e.test_scheduler_failover import ControlPlane, Proc, lease_row, sweep_stale  # noqa: E402
from tests.support.docker_engine import build_worker_image, engine  # noqa: E402
from tests.support.platform import eventually, free_port  # noqa: E402
from tests.support.postgres import running_cluster  # noqa: E402


def wait_leading(plane: ControlPlane, proc: Proc, timeout: float = 60) -> float:
    started = time.monotonic()
    eventually(lambda: plane.leads(proc), timeout=timeout, interval=0.01, what=f"{proc.name} leading")
    return time.monotonic() - started


def failover(args: argparse.Namespace, root: pathlib.Path) -> None:
    tag, image_id = build_worker_image(engine(), version="bench-failover")
    with running_cluster() as cluster:
        plane = ControlPlane(root / "failover", cluster.create_database(), lease=args.lease)
        try:
            plane.start_services()
            plane.create_project()
            procs = [plane.start_scheduler("sched-0"), plane.start_scheduler("sched-1")]
            for p in procs:
                plane.wait_health(p, "", timeout=60)
            leader = plane.one_leader()
            created = plane.cli("deploy", "--image", tag, "--env", "preview", "--min-replicas", "2",
                                "--max-replicas", "2", "--no-wait")
            deployment_id = created["deployment"]["id"]
            eventually(lambda: plane.ready(leader, deployment_id, 2), timeout=90, what="2 ready replicas")
            before = [(i, cid) for i, cid, _, _ in plane.replicas()]
            rng = random.Random(args.seed)
            takeovers: list[float] = []
            print(f"lease {args.lease:g} s (renewed every {args.lease / 3:.2f} s); {args.kills} SIGKILLs of the leader")
            for n in range(args.kills + 1):
                graceful = n == args.kills
                standby = next(p for p in plane.schedulers() if p is not leader)
                plane.wait_health(standby, "", timeout=60)
                time.sleep(rng.uniform(0, args.lease))  # a random moment of the renewal cycle
                _, epoch = lease_row(plane.database_url, plane.instance)
                leader.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
                took = wait_leading(plane, standby)
                leader.process.wait(30)
                status = eventually(lambda: plane.ready(standby, deployment_id, 2), timeout=60,  # noqa: B023
                                    what="status from the new leader")
                adopted = [(i, cid) for i, cid, _, _ in plane.replicas()] == before
                kind = "SIGTERM (released)" if graceful else "SIGKILL"
                print(f"  {kind:18} {leader.name} -> {standby.name}: leading after {took:.2f} s, epoch {epoch} -> "
                      f"{status.scheduler_leader.epoch}, replicas adopted unchanged: {adopted}")
                if not graceful:
                    takeovers.append(took)
                leader = standby
                plane.start_scheduler(f"sched-{n + 2}")
            print(f"takeover after SIGKILL: min {min(takeovers):.2f} s, median {statistics.median(takeovers):.2f} s, "
                  f"max {max(takeovers):.2f} s (lease {args.lease:g} s; max/lease {max(takeovers) / args.lease:.2f})")
        finally:
            plane.stop()
            plane.remove_containers()
            engine().images.remove(image_id, force=True)


def startup(args: argparse.Namespace, root: pathlib.Path) -> None:
    """One scheduler on SQLite (the data directory), as ``berth up`` runs it."""
    with running_cluster() as cluster:
        plane = ControlPlane(root / "startup", cluster.create_database(), lease=args.lease)
        try:
            plane.start_services()

            def spawn(name: str, tree: pathlib.Path = ROOT, lease: bool = True) -> tuple[Proc, float]:
                flags = ["--lease-duration", str(args.lease), "--instance-name", name] if lease else []
                log = root / "startup" / f"{name}.log"
                started = time.monotonic()
                with open(log, "ab") as out:
                    process = subprocess.Popen(
                        [sys.executable, "-S", "-c", PDEATHSIG_WRAPPER, str(os.getpid()),
                         sys.executable, "-m", "services.scheduler", "--port", str(port := free_port()),
                         "--registry", f"127.0.0.1:{plane.registry_port}", "--secrets",
                         f"127.0.0.1:{plane.secrets_port}", "--instance", plane.instance,
                         "--data-dir", str(root / "startup" / f"data-{tree.name}"), *flags],
                        cwd=tree, env=plane.env, stdout=out, stderr=subprocess.STDOUT)
                proc = Proc(name, process, port, log)
                plane.procs[name] = proc
                eventually(lambda: plane.leads(proc), timeout=60, interval=0.01, what=f"{name} leading")
                return proc, time.monotonic() - started

            def stop(proc: Proc, sig: signal.Signals) -> None:
                proc.process.send_signal(sig)
                proc.process.wait(30)

            cold, term, kill, base = [], [], [], []
            for n in range(args.starts):
                if args.baseline_tree:
                    # The scheduler before the lease, from another checkout (no lease flags).
                    proc, took = spawn(f"baseline-{n}", pathlib.Path(args.baseline_tree), lease=False)
                    base.append(took)
                    stop(proc, signal.SIGTERM)
                proc, took = spawn(f"single-{n}a")
                (cold if n == 0 else term).append(took)
                stop(proc, signal.SIGTERM)  # releases the lease
                proc, took = spawn(f"single-{n}b")
                term.append(took)
                stop(proc, signal.SIGKILL)  # leaves its lease behind
                proc, took = spawn(f"single-{n}c")
                kill.append(took)
                stop(proc, signal.SIGTERM)
            print(f"single scheduler on SQLite, spawn to SERVING ({args.starts} rounds, medians): "
                  f"first start {cold[0]:.2f} s; after SIGTERM (lease released) {statistics.median(term):.2f} s; "
                  f"after SIGKILL (dead holder's lease taken at once; waiting would add up to {args.lease:g} s) "
                  f"{statistics.median(kill):.2f} s")
            if base:
                mine = statistics.median(term + kill)
                print(f"  before the lease (--baseline-tree): {statistics.median(base):.2f} s; "
                      f"with it / before: {mine / statistics.median(base):.2f}")
        finally:
            plane.stop()
            plane.remove_containers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--lease", type=float, default=4.0, help="--lease-duration of the schedulers (its default)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--starts", type=int, default=3, help="rounds of single-scheduler starts")
    parser.add_argument("--baseline-tree", default="",
                        help="a checkout of the scheduler before the lease (e.g. `git worktree add /tmp/b 62d3d51`), "
                             "to compare its startup")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    sweep_stale()
    with tempfile.TemporaryDirectory(prefix="berth-failover-bench-") as tmp:
        root = pathlib.Path(tmp)
        startup(args, root)
        failover(args, root)


if __name__ == "__main__":
    main()
