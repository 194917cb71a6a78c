"""Leader election of schedulers sharing one engine, and the fence every
engine write passes through.

In the spirit of Kubernetes' ``Lease``: one row per platform instance
(``scheduler_leases``, in the scheduler's database: PostgreSQL shared by
several hosts, or the SQLite file of one machine) holds the current holder,
its ``epoch`` (a fencing token, incremented on every acquisition and never
reused), when it was last renewed and when it expires. Every change is a
compare-and-swap: an acquisition updates the row only if it still carries
the epoch read and has expired (or was released); a renewal only if the row
still names this holder and epoch and has not expired. On PostgreSQL every
comparison uses the database's clock, so hosts' clocks need not agree.

The holder renews every third of the lease duration. It counts itself
deposed on its own clock: from the start of its last successful renewal
plus the duration minus a margin (``LeaderElector.margin``). That instant
comes before the database's expiry (which is measured from a moment after
the renewal started), so by the time anyone else can acquire the lease the
old holder has stopped acting, even if it was paused (SIGSTOP) or cut off
from the database: ``ensure_leading`` checks that deadline on a clock that
keeps counting while the process is stopped or the machine sleeps
(``CLOCK_BOOTTIME``), so a resumed holder refuses every write at once.
Writes stop a further margin before the deadline, so one sent at the last
allowed moment has two margins (2/5 of the duration) to reach the engine
before a successor can exist. What remains is the engine's own latency: a
write the engine takes longer than that to carry out, or a process stopped
between the check and the request leaving it (a few microseconds), can land
after a successor acquired the lease. The epoch stamped on what the leader
creates (``berth.epoch``) bounds the damage: a reconciler seeing a container
of a higher epoch stands down, so the old holder never touches the new
holder's work.

A standby reads the row, sleeps until the moment it expires (at most a third
of the duration between reads, which keeps its view of the leader fresh) and
tries to acquire it: it takes over within one lease duration of the last
renewal of a dead leader. A leader stopping gracefully releases the lease so
its successor (a restart of ``berth up``) leads at once. On SQLite, the
lease of a holder that ran on this machine, in this PID namespace and boot,
whose process no longer exists is taken over at once too (a SIGKILLed
single scheduler restarted by ``berth up`` does not wait for the expiry);
a live but stopped process keeps its lease until it expires.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import BigInteger, Column, Double, Engine, MetaData, String, Table, create_engine, text
from sqlalchemy.pool import StaticPool

log = logging.getLogger("berth.scheduler.lease")

EPOCH_LABEL = "berth.epoch"
T = TypeVar("T")

# The table as the migration (e0003) creates it; Core only, no ORM.
_metadata = MetaData()
leases = Table(
    "scheduler_leases",
    _metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("address", String(255), nullable=False),
    Column("process", String(255), nullable=False),
    Column("renewed_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)


class LeaseLost(Exception):
    """This scheduler does not hold the lease (any more): it must not touch
    the engine. ``leader`` names the holder last seen, when known."""

    def __init__(self, message: str, leader: LeaseRecord | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.leader = leader


class Fence(Protocol):
    """What an engine adapter asks before every write."""

    @property
    def epoch(self) -> int:
        """The epoch of the lease held (stamped as ``berth.epoch``)."""
        ...

    def ensure_leading(self) -> None:
        """Returns if the lease is held now; raises ``LeaseLost`` otherwise."""
        ...


class Leadership(Fence, Protocol):
    """The fence, as the reconciler also uses it: told to stand down when it
    sees the work of a higher epoch."""

    def depose(self, reason: str, *, seen_epoch: int = 0) -> None: ...


def epoch_of(labels: Mapping[str, str]) -> int:
    """The ``berth.epoch`` a container was created in (0: before fencing)."""
    try:
        return int(labels.get(EPOCH_LABEL, "0"))
    except ValueError:
        return 0


def boottime() -> float:
    """Seconds on a clock that keeps counting while this process is stopped
    and while the machine sleeps (``CLOCK_BOOTTIME``; monotonic elsewhere)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is not None:
        return time.clock_gettime(clock)
    return time.monotonic()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def this_process() -> str:
    """``boot id/pid namespace/pid``: enough to tell, on this machine,
    whether the process holding a lease still exists."""
    return f"{_boot_id()}/{_pid_namespace()}/{os.getpid()}"


def default_instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _process_gone(process: str) -> bool:
    """True only when ``process`` (``this_process`` of the holder) ran on
    this boot, in this PID namespace, and no process has its pid now."""
    parts = process.split("/")
    if len(parts) != 3:
        return False
    boot, pidns, pid = parts
    if not boot or boot != _boot_id() or pidns != _pid_namespace():
        return False
    try:
        number = int(pid)
    except ValueError:
        return False
    if number <= 0 or number == os.getpid():
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, another user's
    return False


@dataclass(frozen=True)
class LeaseRecord:
    name: str
    holder: str  # instance name; "" when released or never held
    epoch: int
    address: str
    process: str
    renewed_at: float  # seconds since the epoch, on the store's clock
    expires_at: float
    now: float  # the store's clock when read

    @property
    def expired(self) -> bool:
        return not self.holder or self.expires_at <= self.now

    @property
    def remaining(self) -> float:
        return max(0.0, self.expires_at - self.now) if self.holder else 0.0


class LeaseStore:
    """The lease row's compare-and-swap operations (blocking; one short
    transaction each)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self._engine = engine
        self.name = name
        self.local = engine.dialect.name == "sqlite"  # one machine: its clock, its processes
        if engine.dialect.name == "postgresql":
            self._now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
        else:
            self._now = ":now"

    def _params(self, **values: object) -> dict[str, object]:
        return {"name": self.name, "now": time.time(), **values}

    def read(self) -> LeaseRecord:
        """The row (created, never held, if missing) with the store's time."""
        with self._engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO scheduler_leases (name, holder, epoch, address, process, renewed_at, expires_at) "
                    "VALUES (:name, '', 0, '', '', 0, 0) ON CONFLICT (name) DO NOTHING"
                ),
                {"name": self.name},
            )
            row = conn.execute(
                text(
                    f"SELECT name, holder, epoch, address, process, renewed_at, expires_at, {self._now} AS now "
                    "FROM scheduler_leases WHERE name = :name"
                ),
                self._params(),
            ).one()
        return LeaseRecord(
            name=row.name, holder=row.holder, epoch=int(row.epoch), address=row.address, process=row.process,
            renewed_at=float(row.renewed_at), expires_at=float(row.expires_at), now=float(row.now),
        )

    def try_acquire(
        self, seen: LeaseRecord, *, holder: str, address: str, process: str, duration: float, above: int = 0
    ) -> int | None:
        """Takes the lease if it still carries ``seen.epoch`` and has expired
        or been released (or, on SQLite, its holder's process is gone), with
        the next epoch — or ``above + 1`` if that is higher (epochs seen on
        the engine that this row never issued: it was reset). Returns the new
        epoch, or None when someone else holds it."""
        steal = self.local and bool(seen.holder) and _process_gone(seen.process)
        new_epoch = max(seen.epoch, above) + 1
        with self._engine.begin() as conn:
            result = conn.execute(
                text(
                    "UPDATE scheduler_leases SET holder = :holder, epoch = :new_epoch, address = :address, "
                    f"process = :process, renewed_at = {self._now}, expires_at = {self._now} + :duration "
                    f"WHERE name = :name AND epoch = :epoch AND (expires_at <= {self._now} OR holder = '' "
                    "OR :steal)"
                ),
                self._params(holder=holder, address=address, process=process, duration=duration,
                             epoch=seen.epoch, new_epoch=new_epoch, steal=steal),
            )
            won = result.rowcount == 1
        if won and steal:
            log.info("lease_taken_from_dead_process", extra={"previous": seen.holder, "epoch": seen.epoch})
        return new_epoch if won else None

    def renew(self, *, holder: str, epoch: int, duration: float) -> bool:
        """Extends the lease if this holder still has it with this epoch and
        it has not expired."""
        with self._engine.begin() as conn:
            result = conn.execute(
                text(
                    f"UPDATE scheduler_leases SET renewed_at = {self._now}, expires_at = {self._now} + :duration "
                    f"WHERE name = :name AND holder = :holder AND epoch = :epoch AND expires_at > {self._now}"
                ),
                self._params(holder=holder, epoch=epoch, duration=duration),
            )
            return result.rowcount == 1

    def release(self, *, holder: str, epoch: int) -> bool:
        """Gives the lease up (a graceful stop): the next contender takes it
        at once, with the next epoch."""
        with self._engine.begin() as conn:
            result = conn.execute(
                text(
                    "UPDATE scheduler_leases SET holder = '', expires_at = 0 "
                    "WHERE name = :name AND holder = :holder AND epoch = :epoch"
                ),
                self._params(holder=holder, epoch=epoch),
            )
            return result.rowcount == 1


def lease_store(engine: Engine, name: str) -> LeaseStore:
    """The lease of platform instance ``name`` in the scheduler's database
    (where migration e0003 created the table). An in-memory event store has
    no one to share a lease with: the lease gets its own in-memory database
    (one connection must not interleave two threads' transactions)."""
    if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
        engine = create_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)
        _metadata.create_all(engine)
    return LeaseStore(engine, name)


@dataclass(frozen=True)
class _Term:
    epoch: int
    deadline: float  # boottime() after which this holder counts itself deposed


class LeaderElector:
    """Acquires, renews and releases the lease; the ``Fence`` of the engine
    adapters. ``on_change(True)`` when this instance starts leading,
    ``on_change(False)`` when it stops (called on the event loop)."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        identity: str,
        address: str = "",
        duration: float = 4.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = boottime,
    ) -> None:
        if duration <= 0:
            raise ValueError("lease duration must be positive")
        self._store = store
        self.identity = identity
        self.address = address
        self.duration = duration
        self.renew_every = duration / 3
        # Room for clock rate differences and the time between the store's
        # "now" and ours; the holder stops acting this long before expiry.
        self.margin = max(0.05, duration / 5)
        self.on_change = on_change
        self._clock = clock
        self._term: _Term | None = None
        self._last_epoch = 0
        self._epoch_floor = 0  # the highest epoch seen on the engine
        self._process = this_process()
        self.leader: LeaseRecord | None = None  # the row as last read or written
        self._stopped = False
        self._wake = asyncio.Event()
        # Its own threads: a store call hung on a cut connection (abandoned at
        # the deadline) never starves anything else, nor the next renewal.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lease")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # -- the fence ----------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch of the current (or, once deposed, the last) term."""
        term = self._term
        return term.epoch if term is not None else self._last_epoch

    @property
    def leading(self) -> bool:
        term = self._term
        return term is not None and self._clock() < term.deadline

    def ensure_leading(self) -> None:
        """Raises ``LeaseLost`` unless the lease is held with at least
        ``margin`` of the term left: a write sent now has that long, plus the
        margin between the deadline and the store's expiry, to land on the
        engine before anyone else can hold the lease."""
        term = self._term
        if term is None:
            raise LeaseLost(f"scheduler {self.identity} is not the leader; {self.describe_leader()}", self.leader)
        if self._clock() >= term.deadline - self.margin:
            raise LeaseLost(
                f"scheduler {self.identity} may have lost the lease (epoch {term.epoch}): not renewed in time",
                self.leader,
            )

    def depose(self, reason: str, *, seen_epoch: int = 0) -> None:
        """Stop leading now: a container of a higher epoch (``seen_epoch``)
        was seen. Normally another scheduler holds the lease with it; if the
        lease row was reset instead (a new database, a wiped data
        directory), the next acquisition takes an epoch above it, so this
        scheduler is not locked out by its own old containers."""
        self._epoch_floor = max(self._epoch_floor, seen_epoch)
        if self._term is not None:
            log.warning("deposed", extra={"epoch": self._term.epoch, "reason": reason})
            self._lose()
        self._wake.set()

    def describe_leader(self) -> str:
        leader = self.leader
        if leader is None or leader.expired or leader.holder == self.identity:
            return "no leader is known right now (a standby takes over within a lease duration)"
        where = f" at {leader.address}" if leader.address else ""
        return f"the leader is {leader.holder}{where} (epoch {leader.epoch})"

    # -- the loop -----------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled: acquire, renew, or wait for the holder's lease to
        expire. A store error is logged and retried; a holder that cannot
        renew before its deadline steps down."""
        while not self._stopped:
            self._wake.clear()
            started = self._clock()
            term = self._term
            # A leader waits for the store no longer than its deadline.
            budget = max(0.0, term.deadline - started) if term is not None else self.duration
            try:
                async with asyncio.timeout(budget):
                    delay = await self._step(started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store (database) is unreachable, slow or failing
                log.warning("lease_store_error", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                delay = min(self.renew_every, 0.5)
            term = self._term
            if term is not None:
                if self._clock() >= term.deadline:
                    log.warning("lease_expired_locally", extra={"epoch": term.epoch})
                    self._lose()
                    continue
                delay = min(delay, max(0.0, term.deadline - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.0)):
                    await self._wake.wait()

    async def _step(self, started: float) -> float:
        term = self._term
        if term is not None:
            renewed = await self._call(
                self._store.renew, holder=self.identity, epoch=term.epoch, duration=self.duration
            )
            if not renewed:
                log.warning("lease_lost", extra={"epoch": term.epoch})
                self._lose()
                self.leader = await self._call(self._store.read)
                return 0.0
            if self._term is term:  # not deposed meanwhile
                self._term = _Term(term.epoch, started + self.duration - self.margin)
            return self.renew_every
        seen = await self._call(self._store.read)
        self.leader = seen
        if not seen.expired and not (self._store.local and _process_gone(seen.process)):
            # Held: read again when it expires (or a third of the duration, to keep the view fresh).
            return min(self.renew_every, seen.remaining + 0.02)
        epoch = await self._call(
            self._store.try_acquire, seen, holder=self.identity, address=self.address,
            process=self._process, duration=self.duration, above=self._epoch_floor,
        )
        if epoch is None:
            return min(self.renew_every, max(seen.remaining, 0.0) + 0.02) if seen.holder else 0.05
        self._term = _Term(epoch, started + self.duration - self.margin)
        self._last_epoch = epoch
        self.leader = LeaseRecord(
            name=seen.name, holder=self.identity, epoch=epoch, address=self.address, process=self._process,
            renewed_at=seen.now, expires_at=seen.now + self.duration, now=seen.now,
        )
        log.info("leading", extra={"epoch": epoch, "instance": self.identity})
        if self.on_change is not None:
            self.on_change(True)
        return self.renew_every

    def _lose(self) -> None:
        term, self._term = self._term, None
        if term is None:
            return
        self._last_epoch = term.epoch
        if self.leader is not None and self.leader.holder == self.identity:
            self.leader = None
        log.warning("standing_down", extra={"epoch": term.epoch, "instance": self.identity})
        if self.on_change is not None:
            self.on_change(False)

    async def release(self) -> None:
        """Stops the loop's leadership and gives the lease up, if held."""
        self._stopped = True
        term = self._term
        self._lose()
        if term is not None:
            try:
                async with asyncio.timeout(self.renew_every):  # a stop is never held up by the store
                    await self._call(self._store.release, holder=self.identity, epoch=term.epoch)
                log.info("lease_released", extra={"epoch": term.epoch})
            except Exception as exc:  # the successor waits for the expiry instead
                log.warning("lease_release_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        self._pool.shutdown(wait=False, cancel_futures=True)


class LeaderDuties:
    """Runs the leader's work only while this scheduler leads: starts
    ``work`` (the runtime's reconcile loop) when the lease is acquired,
    cancels it and calls ``stand_down`` (stop probes, pulls and endpoint
    streams) when it is lost, and tells ``set_serving`` which to report on
    the health service, so health-checked clients send to the leader."""

    def __init__(
        self,
        elector: LeaderElector,
        *,
        work: Callable[[], Coroutine[Any, Any, None]],
        stand_down: Callable[[], Awaitable[None]],
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._elector = elector
        self._work = work
        self._stand_down = stand_down
        self._set_serving = set_serving
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ready = False  # the desired state is loaded: may report SERVING

    def changed(self, _leading: bool | None = None) -> None:
        """The elector's ``on_change`` (and a call once loaded)."""
        self._changed.set()

    async def run(self) -> None:
        try:
            while True:
                self._changed.clear()
                leading = self._elector.leading
                if leading and self._task is None:
                    self._task = asyncio.create_task(self._work(), name="leader-work")
                elif not leading and self._task is not None:
                    await self._stop_work()
                await self._set_serving(leading and self.ready)
                # Re-check at least every renewal: ``leading`` also ends by
                # the clock, before the elector's loop gets to say so.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._elector.renew_every):
                        await self._changed.wait()
        finally:
            if self._task is not None:
                await self._stop_work()

    async def _stop_work(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self._stand_down()
