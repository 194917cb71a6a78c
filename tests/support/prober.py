"""A prober for fault tests: ``concurrency`` threads sending GET requests to
the router, bounded in count and time, recording every answer and failure
with its time, so a test can say how many requests failed around a fault.

Half the threads keep one keep-alive connection (reconnecting after a
``Connection: close`` or an error, as any HTTP client does), half open a
new connection per request so the kernel spreads them over the router's
worker sockets (SO_REUSEPORT hashes each new connection). No request is
retried: a failure is counted as the client saw it."""
from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Outcome:
    at: float  # time.monotonic() when it ended
    status: int  # 0: no response (refused, reset, timeout, cut short)
    detail: str  # error code of a JSON error body, or the exception
    reused: bool  # sent on a keep-alive connection that had served before


@dataclass
class Prober:
    host: str
    port: int
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    concurrency: int = 8
    max_requests: int = 200_000
    max_seconds: float = 120.0
    timeout: float = 10.0
    fresh_pause: float = 0.002  # between requests of a connection-per-request thread (bounds TIME_WAIT sockets)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._count = 0

    def start(self) -> Prober:
        self._started = time.monotonic()
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._run, args=(i % 2 == 0,), name=f"prober-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def __enter__(self) -> Prober:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _more(self) -> bool:
        if self._stop.is_set() or time.monotonic() - self._started > self.max_seconds:
            return False
        with self._lock:
            self._count += 1
            return self._count <= self.max_requests

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self, keep_alive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        served = 0  # responses on the current connection
        try:
            while self._more():
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    served = 0
                reused = served > 0
                try:
                    conn.request("GET", self.path, headers=self.headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    served += 1
                    detail = ""
                    if resp.status >= 400:
                        try:
                            detail = json.loads(body)["error"]["code"]
                        except (ValueError, KeyError, TypeError):
                            detail = body[:80].decode(errors="replace")
                    self._record(Outcome(time.monotonic(), resp.status, detail, reused))
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as exc:
                    self._record(Outcome(time.monotonic(), 0, f"{type(exc).__name__}: {exc}", reused))
                    conn.close()
                    conn = None
                if not keep_alive and conn is not None:
                    conn.close()
                    conn = None
                    time.sleep(self.fresh_pause)
        finally:
            if conn is not None:
                conn.close()

    # -- figures ----------------------------------------------------------------
    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.at < end]

    def summary(self, start: float = 0.0, end: float = float("inf"), ok: tuple[int, ...] = (200,)) -> dict[str, object]:
        chosen = self.between(start, end)
        failed = [o for o in chosen if o.status not in ok]
        return {
            "requests": len(chosen),
            "failed": len(failed),
            "statuses": dict(Counter(str(o.status) for o in chosen)),
            "failures": dict(Counter(f"{o.status} {o.detail}"[:100] for o in failed)),
            "failed_on_reused_connection": sum(1 for o in failed if o.reused),
        }
