"""Chaos on a real platform with two of each service (issue 15, "Prove it").

``berth up --database-url postgresql://… --instances 2`` on a throwaway
PostgreSQL cluster: two registries, two secrets services, two routers (each
with its workers) and a leading scheduler with a standby. Two deployments
(busybox workers) are bound to staging. Then, all at once:

- a prober at concurrency 16 against staging, 8 threads through each router;
- a mover doing 20 promotes and rollbacks of staging through the REST API,
  alternating the router it asks, each under compare-and-swap (a move whose
  answer a killed router worker lost is settled from the history);
- every 5 s one process SIGKILLed, in turn: a registry, a secrets service,
  the leading scheduler, a router worker, a whole router instance (its
  supervisor and all its workers at once) (the other instance next round),
  each restarted by ``berth up``'s supervisor.

Then: no proxied request failed except on the router that lost a worker,
at its kill, or on the router instance that was killed, until it served
again (counted per router: the other router fails nothing); staging's
history is gap-free and its new entries are exactly the moves that answered
200 (none lost, none doubled); every binding has exactly its replicas, none
duplicated or orphaned (containers by label); a standby led after each
leader's death within a generous correctness bound (``FAILOVER_BOUND``).
The measured failover is printed against its 5 s target — a performance
goal, for ``bench/ha_chaos.py`` and ``bench/scheduler_failover.py``, not a
timed assert. ``pytest -s`` prints the figures (also one JSON line,
``HA_CHAOS``).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from berth import local
from tests.e2e.ha_platform import HaPlatform
from tests.support.docker_engine import TEST_LABEL, engine, remove_labelled, write_worker_context
from tests.support.platform import eventually
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.support.prober import Prober

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

MOVES = 20
KILL_EVERY = 5.0
ROTATION = ("registry", "secrets", "scheduler-leader", "router", "router-instance")
MIN_KILLS = 2 * len(ROTATION)  # two of each: both instances of every service die once
FAILOVER_BOUND = 20.0  # correctness: a standby leads at all (the lease is 3 s here)
FAILOVER_TARGET = 5.0  # the goal, printed against the measured figure (bench/ scripts measure it)
IN_FLIGHT_WINDOW = 1.0  # a request failed "in flight" on a killed router worker ends within this of the kill
ROUTER_BACK_TIMEOUT = 60.0  # a killed router instance restarted by the supervisor and serving again
CHAOS_LIMIT = 300.0  # the whole chaos phase, at most


@dataclass
class Kill:
    kind: str
    name: str
    pid: int
    at: float
    router: int | None = None  # which router instance lost a worker, or was killed whole
    back_at: float | None = None  # a killed router instance: when it served again
    failover_s: float | None = None  # scheduler leader: until the other led
    figures: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def ha(tmp_path: Path, postgres_url: str) -> Iterator[HaPlatform]:  # noqa: F811
    p = HaPlatform(tmp_path / "data", postgres_url, instances=2)
    p.data_dir.mkdir()
    try:
        p.start()
        yield p
    finally:
        p.stop()
        local.stop_processes(local.recorded_processes(p.data_dir / local.RUN_DIR), timeout=5)
        p.remove_containers()
        remove_labelled(engine(), TEST_LABEL)


def router_worker(ha: HaPlatform, index: int) -> local.ProcessRecord:
    """A worker of router instance ``index``'s current supervisor."""
    def find() -> local.ProcessRecord | None:
        now = ha.records()
        supervisor = now[ha.name("router", index)].pid
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        workers = [r for n, r in now.items() if n.startswith("router-worker-") and str(r.pid) in children]
        return workers[0] if workers else None

    found: local.ProcessRecord = eventually(find, timeout=10, what=f"a worker of router {index}")
    return found


def kill_router_instance(ha: HaPlatform, index: int) -> tuple[local.ProcessRecord, list[int]]:
    """SIGKILLs router instance ``index`` whole: its supervisor and every
    worker it started, at once (workers first found, so none is missed)."""
    supervisor = ha.records()[ha.name("router", index)]
    workers = [int(pid) for pid in
               Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read_text().split()]
    assert workers, f"router {index} has no workers to kill"
    for pid in (supervisor.pid, *workers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return supervisor, workers


def wait_router_back(ha: HaPlatform, index: int, old_pid: int) -> float:
    """Waits until ``berth up`` restarted router ``index`` and it answers
    /healthz; returns when (time.monotonic())."""
    ha.wait_restarted(ha.name("router", index), old_pid, timeout=ROUTER_BACK_TIMEOUT)
    eventually(lambda: ha.healthz(index), timeout=ROUTER_BACK_TIMEOUT, interval=0.05,
               what=f"router {index} serving again")
    return time.monotonic()


class Mover:
    """20 pointer moves of staging through the REST API, alternating routers,
    each under compare-and-swap (expected_sequence), as a careful client
    sends them. A 503 (the registry unavailable: nothing applied) is sent
    again. A move whose answer was lost (the router worker holding the
    connection was killed) is looked up in the history first: found, it
    counts as succeeded with that entry; else it is sent again under the same
    sequence (which cannot apply it twice)."""

    def __init__(self, ha: HaPlatform, key: str, deployments: list[str], sequence: int) -> None:
        self.ha, self.key, self.deployments, self.sequence = ha, key, deployments, sequence
        self.succeeded: list[dict[str, Any]] = []  # the entries the moves were answered (or confirmed) with
        self.failed: list[str] = []
        self.resent = 0
        self.settled_after_lost_answer = 0
        self.routed_false = 0
        self.thread = threading.Thread(target=self.run, name="mover", daemon=True)

    def entry(self, router: str, sequence: int) -> dict[str, Any] | None:
        token = ""
        for _ in range(100):
            answer = requests.get(f"{router}/api/v1/environments/staging/promotions", timeout=30,
                                  params={"page_size": 1000, "page_token": token}, headers={"X-API-KEY": self.key})
            answer.raise_for_status()
            page = answer.json()
            for found in page["entries"]:
                if found["sequence"] == sequence:
                    return dict(found)
            token = page["next_page_token"]
            if not token:
                return None
        return None

    def run(self) -> None:
        started = time.monotonic()
        for i in range(MOVES):
            if time.monotonic() - started > CHAOS_LIMIT:
                self.failed.append("out of time")
                return
            if i % 4 == 3:
                path, want = "rollback", ""
                body: dict[str, Any] = {"environment_id": "staging"}
            else:
                path, want = "promote", self.deployments[i % 2]
                body = {"source_deployment_id": want, "target_environment_id": "staging"}
            body["expected_sequence"] = self.sequence
            answer_lost = False
            outcome = ""
            for attempt in range(6):
                router = self.ha.routers[(i + attempt) % 2]
                if answer_lost:  # applied before the answer was lost? the history says; never sent twice
                    try:
                        found = self.entry(router, self.sequence + 1)
                    except requests.RequestException:  # this router instance is down (killed whole): the other next
                        time.sleep(0.5)
                        continue
                    if found is not None and found["kind"] == path and want in ("", found["deployment_id"]):
                        self.succeeded.append(found)
                        self.sequence = found["sequence"]
                        self.settled_after_lost_answer += 1
                        break
                try:
                    answer = requests.post(f"{router}/api/v1/deployments/{path}", json=body, timeout=30,
                                           headers={"X-API-KEY": self.key})
                except requests.RequestException as exc:  # the router worker holding it was killed
                    answer_lost = True
                    outcome = type(exc).__name__
                else:
                    if answer.status_code == 200:
                        data = answer.json()
                        self.succeeded.append(data["entry"])
                        self.sequence = data["entry"]["sequence"]
                        self.routed_false += not data["routed"]
                        break
                    outcome = f"{answer.status_code} {answer.text[:200]}"
                    if answer.status_code != 503:
                        self.failed.append(outcome)
                        break
                self.resent += 1
                time.sleep(0.5)
            else:
                self.failed.append(outcome)
            time.sleep(0.5)


def test_two_of_each_survive_a_kill_every_five_seconds(ha: HaPlatform, tmp_path: Path) -> None:
    ha.wait_all_healthy()
    key = ha.cli_json("projects", "create", "chaos")["api_key"]
    deployments = []
    for version in ("v1", "v2"):
        write_worker_context(str(tmp_path / version), version=version)
        deployments.append(ha.cli_json("deploy", str(tmp_path / version), "--project", "chaos", "--min-replicas",
                                       "1", "--max-replicas", "1", api_key=key)["deployment"]["id"])
    headers = {"X-Berth-Project": "chaos", "X-Berth-Environment": "staging"}
    for dep in deployments:  # both bound to staging, two replicas each: each move switches between ready sets
        answer = requests.post(f"{ha.routers[0]}/api/v1/deployments/promote", headers={"X-API-KEY": key}, timeout=30,
                               json={"source_deployment_id": dep, "target_environment_id": "staging",
                                     "min_replicas": 2, "max_replicas": 2})
        assert answer.status_code == 200, answer.text
        for router in ha.routers:
            eventually(lambda router=router, dep=dep: requests.get(router + "/", headers=headers, timeout=10).headers
                       .get("X-Berth-Deployment") == dep, timeout=120, what=f"staging answers {dep} through {router}")
    history_before = ha.cli_json("history", "--environment", "staging", "--project", "chaos", api_key=key)["entries"]

    probers = [Prober("127.0.0.1", ha.port("router", i), headers=headers, concurrency=8,
                      max_seconds=CHAOS_LIMIT + 60) for i in range(2)]
    mover = Mover(ha, key, deployments, sequence=max(e["sequence"] for e in history_before))
    kills: list[Kill] = []
    for prober in probers:
        prober.start()
    chaos_started = time.monotonic()
    try:
        time.sleep(2.0)  # a baseline
        mover.thread.start()
        round_ = 0
        while (len(kills) < MIN_KILLS or mover.thread.is_alive()) and time.monotonic() - chaos_started < CHAOS_LIMIT:
            kind = ROTATION[len(kills) % len(ROTATION)]
            instance = round_ % 2
            if kind == "scheduler-leader":
                leader = eventually(lambda: [ha.leader()] if ha.leader() is not None else None, timeout=30,
                                    interval=0.05, what="a leading scheduler")[0]
                name = ha.name("scheduler", leader)
                record = ha.kill(name)
                kill = Kill(kind, name, record.pid, time.monotonic())
                # A standby leads: the other instance, or the killed one restarted by the supervisor if it
                # wins the expired lease first (both wait for it; the dead process answers nothing).
                new = eventually(lambda: [ha.leader()] if ha.leader() is not None else None, timeout=30,
                                 interval=0.05, what="a standby leading")[0]
                kill.failover_s = round(time.monotonic() - kill.at, 2)
                kill.figures["new_leader"] = ha.name("scheduler", new)
            elif kind == "router":
                worker = router_worker(ha, instance)
                os.kill(worker.pid, signal.SIGKILL)
                kill = Kill(kind, worker.name, worker.pid, time.monotonic(), router=instance)
            elif kind == "router-instance":
                supervisor, workers = kill_router_instance(ha, instance)
                kill = Kill(kind, supervisor.name, supervisor.pid, time.monotonic(), router=instance)
                kill.figures["workers_killed"] = len(workers)
                kill.back_at = wait_router_back(ha, instance, supervisor.pid)
                kill.figures["down_s"] = round(kill.back_at - kill.at, 2)
            else:
                name = ha.name(kind, instance)
                record = ha.kill(name)
                kill = Kill(kind, name, record.pid, time.monotonic())
            kills.append(kill)
            if len(kills) % len(ROTATION) == 0:
                round_ += 1
            time.sleep(max(0.0, kill.at + KILL_EVERY - time.monotonic()))
        mover.thread.join(max(1.0, CHAOS_LIMIT - (time.monotonic() - chaos_started)))
        time.sleep(2.0)  # the tail after the last kill
    finally:
        for prober in probers:
            prober.stop()
    chaos_s = round(time.monotonic() - chaos_started, 1)

    # -- requests: failures only on a killed router worker, at its kill ----------
    per_router: list[dict[str, Any]] = [prober.summary() for prober in probers]
    unexplained: list[str] = []
    for i, prober in enumerate(probers):
        for outcome in prober.outcomes:
            if outcome.status == 200:
                continue
            culprit = next((k for k in kills if k.router == i and k.at <= outcome.at
                            <= (k.back_at if k.back_at is not None else k.at) + IN_FLIGHT_WINDOW), None)
            # A router instance killed whole refuses connections until it is back; a
            # restarted one may answer 503 before it loaded its table (/healthz not yet ok).
            down = (culprit is not None and culprit.back_at is not None and outcome.at <= culprit.back_at
                    and outcome.status in (0, 503))
            if culprit is None or (outcome.status != 0 and not down):
                unexplained.append(f"router {i} at +{outcome.at - chaos_started:.2f}s: {outcome.status} {outcome.detail}")
            elif down:
                culprit.figures["failed_while_down"] = culprit.figures.get("failed_while_down", 0) + 1
            else:
                culprit.figures["failed_in_flight"] = culprit.figures.get("failed_in_flight", 0) + 1
    for k in kills:
        window = [o for prober in probers for o in prober.between(k.at, k.at + KILL_EVERY)]
        k.figures["requests_next_5s"] = len(window)

    # -- history: gap-free, exactly the successful moves --------------------------
    history = ha.cli_json("history", "--environment", "staging", "--project", "chaos", api_key=key)["entries"]
    sequences = [e["sequence"] for e in history]
    new = [e for e in history if e["sequence"] > max(e["sequence"] for e in history_before)]
    answered = sorted(e["sequence"] for e in mover.succeeded)

    # -- replicas: exactly what the bindings want, by label ----------------------
    instance = ha.instance

    def replicas_converged() -> dict[str, Any] | None:
        containers = engine().containers.list(filters={"label": f"berth.instance={instance}"}, ignore_removed=True)
        running = [c for c in containers if c.status == "running"]
        by_binding = Counter((c.labels.get("berth.environment"), c.labels.get("berth.deployment")) for c in running)
        replicas = Counter((c.labels.get("berth.environment"), c.labels.get("berth.deployment"),
                            c.labels.get("berth.replica")) for c in running)
        status = {dep: ha.cli_json("deployment", "status", dep, "--project", "chaos", api_key=key) for dep in deployments}
        wanted = {(b["environment_id"], dep): b for dep, s in status.items() for b in s["bindings"]}
        found = {
            "containers": len(running),
            "duplicated": sorted(str(r) for r, n in replicas.items() if n > 1),
            "orphaned": sorted(str(b) for b in by_binding if b not in wanted),
            "counts": {f"{b[0]}/{b[1]}": n for b, n in by_binding.items()},
            "wanted": {f"{e}/{d}": b.get("desired_replicas", b["min_replicas"]) for (e, d), b in wanted.items()},
        }
        ok = not found["duplicated"] and not found["orphaned"] and all(
            by_binding.get(b, 0) == found["wanted"][f"{b[0]}/{b[1]}"] for b in wanted)
        return found if ok else None

    try:
        replicas = eventually(replicas_converged, timeout=90, interval=1.0, what="replicas converged")
    except AssertionError as exc:
        replicas = {"not_converged": str(exc)[-800:]}

    figures = {
        "chaos_s": chaos_s,
        "kills": [{"kind": k.kind, "process": k.name, "at_s": round(k.at - chaos_started, 1),
                   "failover_s": k.failover_s, **k.figures} for k in kills],
        "failover_s": [k.failover_s for k in kills if k.failover_s is not None],
        "requests": per_router,
        "unexplained_failures": len(unexplained),
        "moves": {"succeeded": len(mover.succeeded), "failed": mover.failed, "resent": mover.resent,
                  "settled_after_lost_answer": mover.settled_after_lost_answer, "routed_false": mover.routed_false},
        "history": {"entries": len(history), "new": len(new), "gap_free": sequences == list(range(1, len(history) + 1))},
        "replicas": replicas,
    }
    figures["failover_target_s"] = FAILOVER_TARGET
    figures["failover_within_target"] = sum(1 for s in figures["failover_s"] if s <= FAILOVER_TARGET)
    print("\nHA_CHAOS " + json.dumps(figures))
    for k in figures["kills"]:
        print(f"  +{k['at_s']:>6}s  {k['kind']:16} {k['process']:22} failover {k['failover_s'] or '-':>5}  "
              f"in-flight failures {k.get('failed_in_flight', 0)}  requests next 5 s {k['requests_next_5s']}"
              + (f"  down {k['down_s']} s, {k.get('failed_while_down', 0)} failed meanwhile" if "down_s" in k else ""))
    print(f"  scheduler failover: {figures['failover_s']} s (target {FAILOVER_TARGET:g} s: "
          f"{figures['failover_within_target']} of {len(figures['failover_s'])} within it)")
    for i, summary in enumerate(per_router):
        print(f"  router {i}: {summary['requests']} requests, {summary['failed']} failed {summary['failures'] or ''}")

    assert len(kills) >= MIN_KILLS, figures["kills"]
    assert {k.kind for k in kills} == set(ROTATION)
    assert not unexplained, unexplained[:10]
    for summary in per_router:
        assert summary["requests"] > 200, per_router  # the prober really ran through both routers
    assert not mover.failed, mover.failed
    assert len(mover.succeeded) == MOVES
    assert sequences == list(range(1, len(history) + 1)), sequences  # gap-free
    assert [e["sequence"] for e in new] == answered  # exactly the moves that succeeded: none lost, none doubled
    assert len(answered) == len(set(answered))
    for entry, got in zip(new, sorted(mover.succeeded, key=lambda e: e["sequence"]), strict=True):
        assert (entry["kind"], entry["deployment_id"]) == (got["kind"], got["deployment_id"])
    assert "not_converged" not in replicas, replicas
    failovers = figures["failover_s"]
    assert failovers and all(s <= FAILOVER_BOUND for s in failovers), failovers  # a standby led: correctness only
    # Every router instance was killed whole once and came back.
    assert {k.router for k in kills if k.kind == "router-instance"} == {0, 1}
