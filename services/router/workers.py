"""Several router processes serving one port, and how they hand over.

One Python process proxies on one core. With ``--workers N`` (or
``--supervise``, as ``berth up`` runs it) the router starts N worker
processes, each a whole router (watches, proxy, REST API), each accepting on
its own socket bound to the same port with SO_REUSEPORT, so the kernel
spreads connections over them; like nginx's worker processes. The
supervisor binds the sockets (so port 0 works and a restarted worker gets its
socket back with the connections queued on it), forwards SIGTERM/SIGINT, and
restarts a worker that dies.

A worker takes connections only once its routing table is loaded:

- The supervisor binds each socket but does not listen on it; the worker
  listens (and accepts) once its table is loaded. A bound TCP socket that
  does not listen is not part of the port's SO_REUSEPORT group: the kernel
  gives its connections to the listening siblings meanwhile. Only when no
  other process serves the port with a table (the platform's first start)
  does a worker listen before its table is loaded, answering 503
  ``router_starting`` rather than refusing.
- A socket that already listens (its worker died and is being replaced)
  keeps the connections queued on it for the replacement, since the
  supervisor holds it open; meanwhile every serving sibling also accepts on
  it ("covers" it: each worker holds all the sockets), so they wait
  milliseconds, not the replacement's start. The replacement accepts once
  its table is loaded; the siblings then stop covering it. Closing a
  sibling's copy of a socket never resets what is queued on it.

When the supervisor dies (SIGKILL, OOM), its workers keep serving as
orphans, as nginx workers outlive a master restart: their parent-death
signal (PR_SET_PDEATHSIG) is SIGUSR1, "orphaned", not SIGTERM. An orphan
offers its listening socket on an abstract unix socket
(``@berth-router-handover:<uid>:<host>:<port>:<pid>``, peers of another uid
refused). A new supervisor on the same host and port (``berth up`` restarts
the router at once) takes those sockets over before binding anything (the
very same sockets, so nothing queued on them is lost), gives them to its own
workers, and once all of them have loaded their tables and accept, tells the
orphans to drain: an orphan stops taking new requests on its connections
(``Connection: close`` on each next response), finishes what is in flight,
and exits. Orphans never serve for long without a supervisor:

- an orphan exits (draining the same way) ``--orphan-timeout`` seconds
  (default 10) after it was orphaned if no successor took it over;
- one whose ``berth up`` (``BERTH_OWNER``: its pid and start time) is gone
  exits at once: when ``berth up`` dies the platform goes with it (its
  children get SIGTERM through their own parent-death signal and stop their
  workers; ``berth down`` and the next ``berth up`` stop any process left,
  through the pid files in ``<data dir>/run``, where workers record
  themselves).

A supervisor that finds the port taken by any listener other than the
orphans it took over refuses to start (SO_REUSEPORT would otherwise join a
stranger's socket of the same user), naming what holds it.

What the workers share, through files in a private directory:

- ``revisions``: 8-byte slots in a memory map, per worker: the registry
  revision its routing table reflects, whether it has loaded the table at
  all, whether it accepts, whether an orphan still serves its socket, its
  pid; and whether any orphan still serves the port. After a promote or
  rollback through the REST API, the answering worker waits until every
  worker routes by the move, so read-your-own-write holds whichever worker
  the next connection lands on; ``/healthz`` on any worker is 200 only once
  every worker has its table.
- ``metrics-<index>.json``: each worker's counters, written every second,
  so ``/metrics`` on any worker reports the whole router.

Load reports go to the scheduler from each worker under its own reporter
name; the scheduler adds them up.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth import local

log = logging.getLogger("berth.router.workers")

SLOT = struct.Struct("<q")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_SIGNAL = signal.SIGUSR1  # a worker's parent-death signal: "your supervisor died"
ORPHAN_TIMEOUT = 10.0
HANDOVER_PREFIX = "berth-router-handover"
TAKEOVER_WAIT = 3.0  # how long a new supervisor waits for orphans to offer their sockets
BACKLOG = 1024
SUPERVISE_INTERVAL = 0.05
METRICS_PUBLISH_INTERVAL = 1.0
RESTART_BACKOFF_MAX = 30.0
AUTO_MAX = 8  # "auto" on a big host: enough cores for the proxy, not a process per core of a 64-core box
STABLE_AFTER = 10.0  # a worker that lived this long restarts without delay


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or "auto" (one per CPU, at most
    ``AUTO_MAX``)."""
    if value == "auto":
        return max(1, min(AUTO_MAX, os.cpu_count() or 1))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', not {value!r}") from None
    if count < 1:
        raise ValueError(f"--workers must be at least 1, not {count}")
    return count


def bound_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one address (SO_REUSEPORT) that do not
    listen yet: a worker listens on its own once it may take connections.
    With port 0, the port the first one got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listening_sockets(host: str, port: int, count: int, backlog: int = 1024) -> list[socket.socket]:
    """``count`` listening sockets on one address (SO_REUSEPORT)."""
    sockets = bound_sockets(host, port, count)
    for sock in sockets:
        sock.listen(backlog)
    return sockets


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


# slots per worker, in this order, then one for the whole port
_REVISION, _LOADED, _ACCEPTING, _COVERED, _PID = range(5)
_FIELDS = 5


class SharedState:
    """A process's view of the files all workers of one supervisor share
    (see the module doc); ``index`` None for the supervisor's."""

    def __init__(self, directory: Path, index: int | None, count: int) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        with open(directory / "revisions", "r+b") as f:
            self._revisions = mmap.mmap(f.fileno(), SLOT.size * (count * _FIELDS + 1))

    @staticmethod
    def create(count: int) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="berth-router-"))
        (directory / "revisions").write_bytes(bytes(SLOT.size * (count * _FIELDS + 1)))
        return directory

    def _get(self, field: int, i: int) -> int:
        return int(SLOT.unpack_from(self._revisions, SLOT.size * (field * self.count + i))[0])

    def _set(self, field: int, i: int, value: int) -> None:
        SLOT.pack_into(self._revisions, SLOT.size * (field * self.count + i), value)

    @property
    def _me(self) -> int:
        assert self.index is not None, "the supervisor's view publishes nothing of its own"
        return self.index

    # -- revisions ------------------------------------------------------------
    def publish_revision(self, revision: int, *, loaded: bool = True) -> None:
        self._set(_REVISION, self._me, revision)
        self._set(_LOADED, self._me, int(loaded))

    def revisions(self) -> list[int]:
        return [self._get(_REVISION, i) for i in range(self.count)]

    def not_loaded(self) -> list[int]:
        """Workers that have not loaded their routing table (starting)."""
        return [i for i in range(self.count) if not self._get(_LOADED, i)]

    # -- who takes connections ------------------------------------------------
    def set_accepting(self, accepting: bool) -> None:
        self._set(_ACCEPTING, self._me, int(accepting))

    def accepting(self, i: int) -> bool:
        return bool(self._get(_ACCEPTING, i))

    def serving(self, i: int) -> bool:
        """Worker ``i`` accepts with its routing table loaded."""
        return bool(self._get(_ACCEPTING, i) and self._get(_LOADED, i))

    def covered(self, i: int) -> bool:
        """An orphan of the previous supervisor still serves socket ``i``."""
        return bool(self._get(_COVERED, i))

    def orphans_serving(self) -> bool:
        return bool(SLOT.unpack_from(self._revisions, SLOT.size * self.count * _FIELDS)[0])

    def someone_else_serves(self) -> bool:
        """Whether connections to the port find a worker with a table
        without this one: a serving sibling, or an orphan."""
        me = self._me
        return self.covered(me) or self.orphans_serving() or \
            any(self.serving(i) for i in range(self.count) if i != me)

    # -- the supervisor's part ------------------------------------------------
    def worker_started(self, i: int, pid: int) -> None:
        self._set(_PID, i, pid)
        self._set(_ACCEPTING, i, 0)
        self._set(_LOADED, i, 0)

    def worker_gone(self, i: int) -> None:
        self._set(_ACCEPTING, i, 0)
        self._set(_LOADED, i, 0)
        self._set(_PID, i, 0)

    def pids(self) -> list[int]:
        return [self._get(_PID, i) for i in range(self.count)]

    def set_covered(self, i: int, covered: bool) -> None:
        self._set(_COVERED, i, int(covered))

    def set_orphans_serving(self, serving: bool) -> None:
        SLOT.pack_into(self._revisions, SLOT.size * self.count * _FIELDS, int(serving))

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Waits (bounded) until every worker's table reflects ``revision``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while min(self.revisions()) < revision:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.001)  # the watches deliver within a millisecond or so
        return True

    # -- metrics --------------------------------------------------------------
    def publish_metrics(self, snapshot: dict[str, Any]) -> None:
        path = self.directory / f"metrics-{self.index}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(snapshot))
        os.replace(partial, path)  # readers see a whole file, old or new

    def peer_metrics(self) -> list[dict[str, Any]]:
        """The latest snapshots of the other workers."""
        snapshots = []
        for i in range(self.count):
            if i == self.index:
                continue
            try:
                snapshots.append(json.loads((self.directory / f"metrics-{i}.json").read_text()))
            except (OSError, ValueError):
                continue  # not written yet (starting)
        return snapshots

    def close(self) -> None:
        self._revisions.close()


def die_with_parent(supervisor_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Asks for ``sig`` when the supervisor dies (even SIGKILLed): a worker
    asks for ``ORPHAN_SIGNAL``. False if the supervisor is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)
    return os.getppid() == supervisor_pid


def _remove_shared(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink(missing_ok=True)
    directory.rmdir()


def remove_shared_if_last(shared: SharedState) -> None:
    """An orphan's exit: its metrics file goes, and the whole directory once
    no worker of its (dead) supervisor is left."""
    assert shared.index is not None
    (shared.directory / f"metrics-{shared.index}.json").unlink(missing_ok=True)
    try:
        lock = os.open(shared.directory / "revisions", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # orphans leaving together: the last one out removes it
        shared.worker_gone(shared.index)
        others = [pid for pid in shared.pids() if pid]
        if not any(local.process_start_time(pid) is not None for pid in others):
            with contextlib.suppress(OSError):
                _remove_shared(shared.directory)
    finally:
        os.close(lock)


# -- handover ------------------------------------------------------------------
def handover_address(host: str, port: int, pid: int) -> str:
    return f"\0{HANDOVER_PREFIX}:{os.geteuid()}:{host}:{port}:{pid}"


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def orphan_addresses(host: str, port: int) -> list[str]:
    """Handover sockets of orphaned workers of this user, host and port."""
    prefix = f"@{HANDOVER_PREFIX}:{os.geteuid()}:{host}:{port}:"
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    return ["\0" + fields[-1][1:] for fields in (line.split() for line in lines)
            if len(fields) >= 8 and fields[-1].startswith(prefix)]


async def offer_socket(listen_sock: socket.socket, host: str, port: int, info: dict[str, Any]) -> None:
    """An orphan's side of the handover: offers ``listen_sock`` to whichever
    new supervisor of this user connects, and returns once one has told it
    to drain. A supervisor that dies before that is simply followed by the
    next one."""
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(handover_address(host, port, os.getpid()))
        server.listen(8)
        server.setblocking(False)
        log.warning("orphaned_offering_socket", extra={"port": port, **info})
        while True:
            conn, _ = await loop.sock_accept(server)
            with conn:
                if _peer_uid(conn) != os.geteuid():
                    continue
                try:
                    conn.setblocking(True)
                    conn.settimeout(2)
                    socket.send_fds(conn, [json.dumps(info).encode() + b"\n"], [listen_sock.fileno()])
                    conn.setblocking(False)
                    said = await loop.sock_recv(conn, 64)
                except OSError:
                    continue
                if said.startswith(b"drain"):
                    log.warning("handed_over", extra={"port": port})
                    return
                log.warning("successor_gone", extra={"port": port})  # keep serving; wait for the next one
    finally:
        server.close()


@dataclass
class Orphan:
    """A worker of a dead supervisor whose socket this supervisor took over."""

    conn: socket.socket  # the handover connection: "drain" goes here; EOF means it exited
    sock: socket.socket  # its listening socket, now also ours
    pid: int
    index: int = -1  # our worker that got its socket


def take_over_orphans(host: str, port: int) -> list[Orphan]:
    orphans: list[Orphan] = []
    seen: set[int] = set()
    for address in orphan_addresses(host, port):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(2)
        try:
            conn.connect(address)
            if _peer_uid(conn) != os.geteuid():
                raise OSError("the orphan's handover socket belongs to another user")
            message, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        except OSError as exc:
            log.warning("takeover_failed", extra={"address": address[1:], "error": str(exc)})
            conn.close()
            continue
        socks = [socket.socket(fileno=fd) for fd in fds]
        sock = socks[0] if socks else None
        for extra in socks[1:]:
            extra.close()
        if sock is None or not is_listening(sock) or sock.getsockname()[1] != port or socket_inode(sock) in seen:
            if sock is not None:
                sock.close()
            conn.close()
            continue
        seen.add(socket_inode(sock))
        sock.set_inheritable(True)
        try:
            pid = int(json.loads(message)["pid"])
        except (ValueError, KeyError, TypeError):
            pid = 0
        orphans.append(Orphan(conn, sock, pid))
    return orphans


class PortTaken(RuntimeError):
    pass


class Supervisor:
    """Takes over orphans of a dead predecessor, starts the workers,
    restarts one that dies, stops them on a signal."""

    def __init__(self, argv: Sequence[str], host: str, port: int, count: int, shutdown_grace: float) -> None:
        self.argv = list(argv)
        self.shutdown_grace = shutdown_grace
        self.orphans = self._take_over(host, port) if port else []
        count = max(count, len(self.orphans))  # every socket taken over gets a worker
        self.count = count
        try:
            self.sockets = [o.sock for o in self.orphans]
            self.sockets += bound_sockets(host, port or 0, count - len(self.sockets))
        except OSError:
            self._release_orphans()
            raise
        for i, orphan in enumerate(self.orphans):
            orphan.index = i
        self.port = self.sockets[0].getsockname()[1]
        self.shared = SharedState.create(count)
        self.view = SharedState(self.shared, None, count)
        for orphan in self.orphans:
            self.view.set_covered(orphan.index, True)
        self.view.set_orphans_serving(bool(self.orphans))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.started_at = [0.0] * count
        self.backoff = [0.0] * count
        self.stopping = False
        self.run_dir = Path(os.environ["BERTH_RUN_DIR"]) if os.environ.get("BERTH_RUN_DIR") else None

    @staticmethod
    def _take_over(host: str, port: int) -> list[Orphan]:
        """The sockets of orphaned workers on this port; refuses (PortTaken)
        if anything else listens there."""
        orphans: list[Orphan] = []
        deadline = time.monotonic() + TAKEOVER_WAIT
        while True:
            known = {socket_inode(o.sock) for o in orphans}
            for orphan in take_over_orphans(host, port):
                if socket_inode(orphan.sock) in known:
                    orphan.sock.close()
                    orphan.conn.close()
                else:
                    orphans.append(orphan)
            holder = local.describe_port_holder(host, port, ignore_inodes={socket_inode(o.sock) for o in orphans})
            if holder is None:
                break
            if time.monotonic() >= deadline:  # not an orphan that has yet to offer its socket
                for orphan in orphans:
                    orphan.conn.close()
                    orphan.sock.close()
                raise PortTaken(f"port {port} on {host} is in use: {holder}")
            time.sleep(0.1)
        if orphans:
            log.warning("took_over_orphans", extra={"port": port, "orphans": [o.pid for o in orphans]})
        return orphans

    def _spawn(self, index: int) -> None:
        sock = self.sockets[index]
        siblings = ",".join(f"{i}:{s.fileno()}" for i, s in enumerate(self.sockets) if i != index)
        command = [
            sys.executable, "-m", "services.router", *self.argv,
            "--worker-index", str(index), "--worker-count", str(self.count),
            "--listen-fd", str(sock.fileno()), "--shared-dir", str(self.shared), "--supervisor-pid", str(os.getpid()),
        ]
        if siblings:
            command += ["--sibling-fds", siblings]
        proc = subprocess.Popen(command, pass_fds=tuple(s.fileno() for s in self.sockets))
        self.procs[index] = proc
        self.view.worker_started(index, proc.pid)
        self.started_at[index] = time.monotonic()
        log.info("worker_started", extra={"worker": index, "pid": proc.pid})

    def _stop(self, *_: object) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _worker_exited(self, index: int, pid: int) -> None:
        self.view.worker_gone(index)
        if self.run_dir is not None:
            (self.run_dir / f"router-worker-{pid}.pid").unlink(missing_ok=True)

    def _watch_orphans(self) -> None:
        """Tells the orphans to drain once every worker serves with its
        table; notices those that exited."""
        if not self.orphans:
            return
        if all(self.view.serving(i) for i in range(self.count)):
            self._release_orphans()
            log.info("orphans_drained", extra={"port": self.port})
            return
        readable, _, _ = select.select([o.conn for o in self.orphans], [], [], 0)
        for orphan in [o for o in self.orphans if o.conn in readable]:
            with contextlib.suppress(OSError):
                if orphan.conn.recv(64):
                    continue
            orphan.conn.close()  # EOF: the orphan exited (its timeout); the worker may take its socket now
            self.orphans.remove(orphan)
            self.view.set_covered(orphan.index, False)
            log.warning("orphan_gone", extra={"pid": orphan.pid, "worker": orphan.index})
        self.view.set_orphans_serving(bool(self.orphans))

    def _release_orphans(self) -> None:
        for orphan in self.orphans:
            with contextlib.suppress(OSError):
                orphan.conn.sendall(b"drain\n")
            orphan.conn.close()
            if orphan.index >= 0:
                self.view.set_covered(orphan.index, False)
        self.orphans = []
        if hasattr(self, "view"):
            self.view.set_orphans_serving(False)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("serving", extra={"port": self.port, "workers": self.count, "took_over": len(self.orphans)})
        for index in range(self.count):
            self._spawn(index)
        restart_at: dict[int, float] = {}
        try:
            while not self.stopping:
                time.sleep(SUPERVISE_INTERVAL)
                now = time.monotonic()
                for index, proc in enumerate(self.procs):
                    if self.stopping or proc is None:
                        continue
                    code = proc.poll()
                    if code is not None and index not in restart_at:
                        self._worker_exited(index, proc.pid)
                        lived = now - self.started_at[index]
                        self.backoff[index] = 0.0 if lived >= STABLE_AFTER else \
                            min(RESTART_BACKOFF_MAX, max(1.0, self.backoff[index] * 2))
                        restart_at[index] = now + self.backoff[index]
                        log.warning("worker_exited", extra={"worker": index, "code": code, "lived_s": round(lived, 1),
                                                            "restart_in_s": self.backoff[index]})
                for index, when in list(restart_at.items()):
                    if now >= when and not self.stopping:
                        del restart_at[index]
                        self._spawn(index)
                self._watch_orphans()
            self._release_orphans()  # stopping: orphans still around go too
            deadline = time.monotonic() + self.shutdown_grace + 5
            for index, proc in enumerate(self.procs):
                if proc is None:
                    continue
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("worker_killed", extra={"pid": proc.pid})
                    proc.kill()
                    proc.wait()
                self._worker_exited(index, proc.pid)
        finally:
            for sock in self.sockets:
                sock.close()
            self.view.close()
            _remove_shared(self.shared)
        log.info("stopped")
        return 0
