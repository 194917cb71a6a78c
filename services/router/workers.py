"""Several router processes serving one port.

One Python process proxies on one core. With ``--workers N`` the router
starts N worker processes, each a whole router (watches, proxy, REST API),
each accepting on its own listening socket bound to the same port with
SO_REUSEPORT, so the kernel spreads connections over them; like nginx's
worker processes. The supervisor binds the sockets (so port 0 works and a
restarted worker gets its socket back with the connections queued on it),
forwards SIGTERM/SIGINT, and restarts a worker that dies.

What the workers share, through files in a private directory:

- ``revisions``: the registry revision each worker's routing table
  reflects, and whether it has loaded the table at all (8-byte slots, in a
  memory map). After a promote or rollback through the REST API, the
  answering worker waits until every worker routes by the move, so
  read-your-own-write holds whichever worker the next connection lands on;
  ``/healthz`` on any worker is 200 only once every worker has its table.
- ``metrics-<index>.json``: each worker's counters, written every second,
  so ``/metrics`` on any worker reports the whole router.

Load reports go to the scheduler from each worker under its own reporter
name; the scheduler adds them up.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("berth.router.workers")

SLOT = struct.Struct("<q")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
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


def listening_sockets(host: str, port: int, count: int, backlog: int = 1024) -> list[socket.socket]:
    """``count`` listening sockets on one address (SO_REUSEPORT); with port
    0, the port the first one got."""
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
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class SharedState:
    """A worker's view of the files all workers share (see the module doc)."""

    def __init__(self, directory: Path, index: int, count: int) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        with open(directory / "revisions", "r+b") as f:
            self._revisions = mmap.mmap(f.fileno(), SLOT.size * count * 2)  # revisions, then loaded flags

    @staticmethod
    def create(count: int) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="berth-router-"))
        (directory / "revisions").write_bytes(bytes(SLOT.size * count * 2))
        return directory

    # -- revisions ------------------------------------------------------------
    def publish_revision(self, revision: int, *, loaded: bool = True) -> None:
        SLOT.pack_into(self._revisions, SLOT.size * self.index, revision)
        SLOT.pack_into(self._revisions, SLOT.size * (self.count + self.index), int(loaded))

    def revisions(self) -> list[int]:
        return [SLOT.unpack_from(self._revisions, SLOT.size * i)[0] for i in range(self.count)]

    def not_loaded(self) -> list[int]:
        """Workers that have not loaded their routing table (starting)."""
        return [i for i in range(self.count) if not SLOT.unpack_from(self._revisions, SLOT.size * (self.count + i))[0]]

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


def die_with_parent(supervisor_pid: int) -> None:
    """A worker gets SIGTERM when its supervisor dies (even SIGKILLed), so no
    orphan keeps serving on the port next to a new supervisor's workers."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _remove_shared(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink(missing_ok=True)
    directory.rmdir()


class Supervisor:
    """Starts the workers, restarts one that dies, stops them on a signal."""

    def __init__(self, argv: Sequence[str], host: str, port: int, count: int, shutdown_grace: float) -> None:
        self.argv = list(argv)
        self.count = count
        self.shutdown_grace = shutdown_grace
        self.sockets = listening_sockets(host, port, count)
        self.port = self.sockets[0].getsockname()[1]
        self.shared = SharedState.create(count)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.started_at = [0.0] * count
        self.backoff = [0.0] * count
        self.stopping = False

    def _spawn(self, index: int) -> None:
        sock = self.sockets[index]
        command = [
            sys.executable, "-m", "services.router", *self.argv,
            "--worker-index", str(index), "--worker-count", str(self.count),
            "--listen-fd", str(sock.fileno()), "--shared-dir", str(self.shared), "--supervisor-pid", str(os.getpid()),
        ]
        self.procs[index] = subprocess.Popen(command, pass_fds=(sock.fileno(),))
        self.started_at[index] = time.monotonic()
        log.info("worker_started", extra={"worker": index, "pid": self.procs[index].pid})  # type: ignore[union-attr]

    def _stop(self, *_: object) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("serving", extra={"port": self.port, "workers": self.count})
        for index in range(self.count):
            self._spawn(index)
        restart_at: dict[int, float] = {}
        try:
            while not self.stopping:
                time.sleep(0.2)
                now = time.monotonic()
                for index, proc in enumerate(self.procs):
                    if self.stopping or proc is None:
                        continue
                    code = proc.poll()
                    if code is not None and index not in restart_at:
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
            deadline = time.monotonic() + self.shutdown_grace + 5
            for proc in self.procs:
                if proc is None:
                    continue
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("worker_killed", extra={"pid": proc.pid})
                    proc.kill()
                    proc.wait()
        finally:
            for sock in self.sockets:
                sock.close()
            _remove_shared(self.shared)
        log.info("stopped")
        return 0
