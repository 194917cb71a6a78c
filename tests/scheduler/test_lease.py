"""The scheduler lease (services/scheduler/lease.py) without Docker: the
compare-and-swap on SQLite and on a real PostgreSQL, expiry, the epoch only
ever growing, the holder deposing itself on its own clock before anyone can
acquire, a standby taking over from a dead leader, and the fence refusing
engine writes and passes once the lease is lost."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from services.scheduler import docker_adapter as da
from services.scheduler.events import EventStore
from services.scheduler.lease import (
    EPOCH_LABEL,
    LeaderElector,
    LeaseLost,
    LeaseStore,
    epoch_of,
    lease_store,
    this_process,
)
from services.scheduler.reconciler import _check_epochs
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'scheduler-events.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def events(store_url: str) -> Iterator[EventStore]:
    store = EventStore(url=store_url)
    yield store
    store.close()


def acquire(store: LeaseStore, holder: str, duration: float = 5.0, process: str = "") -> int | None:
    return store.try_acquire(store.read(), holder=holder, address=f"{holder}:1", process=process or holder,
                             duration=duration)


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the row and its compare-and-swap ----------------------------------------
def test_first_acquisition_wins_and_others_wait_until_expiry(events: EventStore) -> None:
    store = lease_store(events.engine, "platform-a")
    fresh = store.read()
    assert (fresh.holder, fresh.epoch, fresh.expired) == ("", 0, True)
    assert acquire(store, "a", duration=0.6) == 1
    held = store.read()
    assert (held.holder, held.epoch, held.address, held.expired) == ("a", 1, "a:1", False)
    assert 0.0 < held.remaining <= 0.6
    assert acquire(store, "b", duration=0.6) is None  # held and not expired
    assert store.read().holder == "a"
    wait_until(lambda: store.read().expired, 5, "the lease to expire")
    assert acquire(store, "b", duration=5) == 2  # a new term: the next epoch
    assert (store.read().holder, store.read().epoch) == ("b", 2)
    # The old holder can neither renew its term nor release the new one.
    assert store.renew(holder="a", epoch=1, duration=5) is False
    assert store.release(holder="a", epoch=1) is False
    assert store.renew(holder="b", epoch=2, duration=5) is True


def test_an_expired_lease_cannot_be_renewed_only_acquired_again(events: EventStore) -> None:
    store = lease_store(events.engine, "p")
    assert acquire(store, "a", duration=0.3) == 1
    wait_until(lambda: store.read().expired, 5, "expiry")
    assert store.renew(holder="a", epoch=1, duration=5) is False
    assert acquire(store, "a") == 2  # even the same holder: a new epoch


def test_release_lets_the_next_contender_lead_at_once(events: EventStore) -> None:
    store = lease_store(events.engine, "p")
    assert acquire(store, "a", duration=60) == 1
    assert store.release(holder="a", epoch=1) is True
    released = store.read()
    assert released.expired and released.holder == ""
    assert acquire(store, "b", duration=60) == 2


def test_leases_of_two_platform_instances_are_independent(events: EventStore) -> None:
    one, two = lease_store(events.engine, "one"), lease_store(events.engine, "two")
    assert acquire(one, "a") == 1
    assert acquire(two, "b") == 1
    assert (one.read().holder, two.read().holder) == ("a", "b")


def test_racing_contenders_exactly_one_wins_each_term_and_epochs_only_grow(events: EventStore) -> None:
    """Eight threads race for the lease, term after term (each released at
    once): every term has exactly one winner and the epochs won are 1..N
    without a gap or a repeat."""
    store = lease_store(events.engine, "race")
    won: list[tuple[int, str]] = []
    lock = threading.Lock()
    terms = 12

    for term in range(terms):
        seen = store.read()
        barrier = threading.Barrier(8)

        def contend(name: str) -> None:
            barrier.wait()
            epoch = store.try_acquire(seen, holder=name, address="", process=name, duration=60)  # noqa: B023
            if epoch is not None:
                with lock:
                    won.append((epoch, name))

        threads = [threading.Thread(target=contend, args=(f"c{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(won) == term + 1, f"term {term}: winners {won}"
        epoch, name = won[-1]
        assert store.read().holder == name
        assert store.release(holder=name, epoch=epoch)
    assert [e for e, _ in won] == list(range(1, terms + 1))


# -- the elector: the holder's own clock ---------------------------------------
@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_holder_deposes_itself_on_its_own_clock_before_the_store_expiry(events: EventStore) -> None:
    """The local deadline is the start of the last successful renewal plus
    the duration minus the margin: earlier than the store's expiry, so a
    paused holder has stopped before anyone else can acquire."""
    store = lease_store(events.engine, "p")
    clock = FakeClock()
    elector = LeaderElector(store, identity="a", duration=2.0, clock=clock)
    changes: list[bool] = []
    elector.on_change = changes.append

    async def scenario() -> None:
        await elector._step(clock())
        assert elector.leading and elector.epoch == 1 and changes == [True]
        elector.ensure_leading()
        clock.now += 2.0 - 2 * elector.margin - 0.01
        elector.ensure_leading()  # writes still allowed
        clock.now += 0.02
        assert elector.leading  # still its term, but no new write may start this close to the deadline
        with pytest.raises(LeaseLost, match="not renewed in time"):
            elector.ensure_leading()
        clock.now += elector.margin
        assert not elector.leading
        with pytest.raises(LeaseLost, match="not renewed in time"):
            elector.ensure_leading()

    asyncio.run(scenario())
    # Deposed locally although the store still shows it holding the lease.
    row = store.read()
    assert row.holder == "a" and not row.expired
    assert elector.margin > 0 and elector.renew_every == pytest.approx(2.0 / 3)


def test_a_renewal_moves_the_deadline_and_a_failed_one_deposes(events: EventStore) -> None:
    store = lease_store(events.engine, "p")
    clock = FakeClock()
    elector = LeaderElector(store, identity="a", duration=2.0, clock=clock)
    changes: list[bool] = []
    elector.on_change = changes.append

    async def scenario() -> None:
        await elector._step(clock())
        clock.now += 1.0
        await elector._step(clock())  # renewal
        clock.now += 2.0 - 2 * elector.margin - 0.01  # past the first term's write window, inside the renewed one
        elector.ensure_leading()
        # Someone else's epoch in the row (e.g. the store's clock said expired): the renewal fails.
        store.release(holder="a", epoch=1)
        assert acquire(store, "b", duration=60) == 2
        await elector._step(clock())
        assert not elector.leading and changes == [True, False]
        with pytest.raises(LeaseLost) as lost:
            elector.ensure_leading()
        assert "the leader is b at b:1 (epoch 2)" in lost.value.message
        assert elector.epoch == 1  # its last term, for the labels of what it made

    asyncio.run(scenario())


def test_standby_takes_over_from_a_dead_leader_within_the_lease_duration(store_url: str) -> None:
    """Two schedulers' electors on one store (each with its own engine, as
    two processes would be): the leader's loop is killed (no release), the
    standby leads with the next epoch within the duration."""
    duration = 1.0
    stores = [EventStore(url=store_url), EventStore(url=store_url)]
    try:
        first = LeaderElector(LeaseStore(stores[0].engine, "p"), identity="first", duration=duration)
        second = LeaderElector(LeaseStore(stores[1].engine, "p"), identity="second", duration=duration)

        async def scenario() -> float:
            one = asyncio.create_task(first.run())
            await _until(lambda: first.leading, 5)
            two = asyncio.create_task(second.run())
            await asyncio.sleep(duration)  # the standby sees a held lease for a while
            assert first.leading and not second.leading
            assert second.leader is not None and second.leader.holder == "first"
            one.cancel()  # the leader dies: no renewal, no release
            died = time.monotonic()
            await _until(lambda: second.leading, duration * 5)
            took = time.monotonic() - died
            two.cancel()
            await asyncio.gather(one, two, return_exceptions=True)
            return took

        took = asyncio.run(scenario())
        print(f"\ntakeover after the leader's death: {took:.2f} s (lease {duration} s)")
        assert second.epoch == first.epoch + 1
        with pytest.raises(LeaseLost):
            first.ensure_leading()  # by its own clock, long past its deadline
    finally:
        for s in stores:
            s.close()


async def _until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def test_graceful_stop_releases_so_the_successor_leads_at_once(events: EventStore) -> None:
    store = lease_store(events.engine, "p")
    first = LeaderElector(store, identity="first", duration=60)
    second = LeaderElector(store, identity="second", duration=60)

    async def scenario() -> None:
        await first._step(first._clock())
        await first.release()
        assert not first.leading
        await second._step(second._clock())
        assert second.leading and second.epoch == 2

    asyncio.run(scenario())


# -- one machine (SQLite): the holder's process is known -----------------------
def test_sqlite_lease_of_a_dead_process_is_taken_over_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    events = EventStore(str(tmp_path))
    try:
        store = lease_store(events.engine, "p")
        assert store.local
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True, check=True)
        dead = this_process().rsplit("/", 1)[0] + "/" + child.stdout.strip()
        assert acquire(store, "dead", duration=60, process=dead) == 1
        assert acquire(store, "me", duration=60) == 2  # its process is gone: no need to wait an hour
        # A live process (this one) keeps its lease until it expires.
        store.release(holder="me", epoch=2)
        assert acquire(store, "alive", duration=60, process=this_process()) == 3
        assert acquire(store, "other", duration=60) is None
    finally:
        events.close()


def test_postgresql_never_takes_over_a_live_lease_by_process(postgres_url: str) -> None:  # noqa: F811
    """Several hosts: a process id means nothing elsewhere; only expiry counts."""
    events = EventStore(url=postgres_url)
    try:
        store = lease_store(events.engine, "p")
        assert not store.local
        gone = this_process().rsplit("/", 1)[0] + "/999999999"
        assert acquire(store, "a", duration=60, process=gone) == 1
        assert acquire(store, "b", duration=60) is None
    finally:
        events.close()


# -- the fence ----------------------------------------------------------------
@dataclass
class StubFence:
    epoch: int
    leading: bool = True
    deposed: list[str] = field(default_factory=list)

    def ensure_leading(self) -> None:
        if not self.leading:
            raise LeaseLost("not leading")

    def depose(self, reason: str, *, seen_epoch: int = 0) -> None:
        self.deposed.append(reason)
        self.leading = False


def _container(epoch: int | None) -> da.ContainerInfo:
    labels = {"berth.replica": "0"}
    if epoch is not None:
        labels[EPOCH_LABEL] = str(epoch)
    return da.ContainerInfo(id="c", name="c", labels=labels, status="running", exit_code=0, oom_killed=False,
                            error="", started_at=None, finished_at=None, ip="")


def test_a_container_of_a_higher_epoch_deposes_the_reconciler() -> None:
    fence = StubFence(epoch=3)
    _check_epochs([_container(None), _container(2), _container(3)], fence)  # its own and older: fine
    assert fence.deposed == []
    with pytest.raises(LeaseLost, match="epoch 4"):
        _check_epochs([_container(3), _container(4)], fence)
    assert fence.deposed and not fence.leading
    assert epoch_of({EPOCH_LABEL: "junk"}) == 0 and epoch_of({}) == 0


def test_a_reset_lease_row_does_not_lock_the_scheduler_out_of_its_own_containers(events: EventStore) -> None:
    """Containers stamped with epoch 5 by a lease table that is gone (a new
    database, a wiped data directory): the fresh row issues epoch 1, the
    reconciler sees 5 and stands down, and the next acquisition jumps to 6,
    after which the containers no longer depose it."""
    store = lease_store(events.engine, "p")
    elector = LeaderElector(store, identity="a", duration=0.3)
    old = [_container(5), _container(5)]

    async def scenario() -> None:
        await elector._step(elector._clock())
        assert elector.epoch == 1
        with pytest.raises(LeaseLost, match="epoch 5"):
            _check_epochs(old, elector)
        assert not elector.leading
        await asyncio.sleep(0.35)  # its own row expires
        await elector._step(elector._clock())
        assert elector.leading and elector.epoch == 6
        _check_epochs(old, elector)  # now older than its epoch: no deposition

    asyncio.run(scenario())
    assert store.read().epoch == 6


class NoEngine:
    """A Docker client any use of which fails the test."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the engine was touched ({name}) without the lease")


def test_the_adapter_refuses_every_engine_write_without_the_lease() -> None:
    fence = StubFence(epoch=7, leading=False)
    adapter = da.DockerAdapter(NoEngine(), fence=fence, workers=1)  # type: ignore[arg-type]
    spec = da.RunSpec(name="x", image_id="sha256:x", environment={}, labels={})

    async def scenario() -> None:
        for write in (adapter.run(spec), adapter.stop("c"), adapter.remove("c"), adapter.pull("busybox", timeout=5)):
            with pytest.raises(LeaseLost):
                await write

    try:
        asyncio.run(scenario())
    finally:
        adapter.close()


# -- what a standby answers, and the leader's duties ---------------------------
def test_a_standby_refuses_leader_work_naming_the_leader(events: EventStore) -> None:
    from berth import errors
    from services.scheduler.servicer import require_leader

    store = lease_store(events.engine, "p")
    leader = LeaderElector(store, identity="sched-a", address="10.0.0.1:50053", duration=60)
    standby = LeaderElector(store, identity="sched-b", duration=60)

    async def scenario() -> None:
        await leader._step(leader._clock())
        await standby._step(standby._clock())

    asyncio.run(scenario())
    require_leader(leader)  # the leader passes
    require_leader(None)  # a scheduler without a lease (tests, in-process) passes
    with pytest.raises(errors.Unavailable) as refused:
        require_leader(standby)
    assert refused.value.reason == "NOT_LEADER"
    assert "sched-b" in refused.value.message and "the leader is sched-a at 10.0.0.1:50053 (epoch 1)" in \
        refused.value.message
    assert refused.value.metadata == {"instance": "sched-b", "leader": "sched-a", "leader_address": "10.0.0.1:50053",
                                      "leader_epoch": "1"}


@dataclass
class FlippingElector:
    leading: bool = False
    renew_every: float = 0.05


def test_leader_duties_run_the_work_only_while_leading_and_say_so_on_health() -> None:
    from services.scheduler.lease import LeaderDuties

    elector = FlippingElector()
    serving: list[bool] = []
    runs: list[str] = []
    stood_down: list[int] = []

    async def work() -> None:
        runs.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            runs.append("cancelled")

    async def stand_down() -> None:
        stood_down.append(1)

    async def set_serving(value: bool) -> None:
        if not serving or serving[-1] != value:
            serving.append(value)

    async def scenario() -> None:
        duties = LeaderDuties(elector, work=work, stand_down=stand_down, set_serving=set_serving)  # type: ignore[arg-type]
        task = asyncio.create_task(duties.run())
        await asyncio.sleep(0.1)
        assert runs == [] and serving == [False]  # a standby: no work, NOT_SERVING
        elector.leading = True
        duties.changed(True)
        await asyncio.sleep(0.1)
        assert runs == ["started"] and serving == [False]  # leading, but not loaded yet: still NOT_SERVING
        duties.ready = True
        duties.changed()
        await asyncio.sleep(0.1)
        assert serving == [False, True]
        elector.leading = False  # e.g. its own clock says the lease may have expired: no call needed
        await asyncio.sleep(0.2)
        assert runs == ["started", "cancelled"] and stood_down == [1] and serving[-1] is False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


# -- the event store shared by a leader and its standbys ------------------------
def test_events_recorded_by_one_scheduler_are_read_by_another_and_folded_without_loss(store_url: str) -> None:
    """Two schedulers' stores on one database (a leader and the standby that
    takes over): what one records the other lists, and the same failure
    recorded concurrently by both is folded into one row whose count loses
    no occurrence."""
    from services.scheduler.events import EventKind

    stores = [EventStore(url=store_url), EventStore(url=store_url)]
    try:
        def record(store: EventStore, n: int) -> None:
            for _ in range(n):
                store.record(EventKind.CRASH_LOOP, message="replica 0 exited 3 times", project_id="p",
                             deployment_id="dep_0123456789ab", environment_id="env", environment="staging",
                             replica="0")

        threads = [threading.Thread(target=record, args=(store, 25)) for store in stores for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for store in stores:
            [event] = store.list("dep_0123456789ab")
            assert event.count == 100 and event.kind == "crash_loop"
            assert store.project_of("dep_0123456789ab") == "p"
    finally:
        for store in stores:
            store.close()
