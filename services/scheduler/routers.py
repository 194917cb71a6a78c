"""Which router processes are alive and which registry revision each routes
by, as their load reports tell the scheduler (``ReportLoad.router``,
``revision``, ``loaded``). ``SchedulerInternal.ListRouters`` answers from
here, so a pointer move through one router can wait until every live router
routes by it.

Kept in memory: a scheduler that just started (or a standby that just took
over) knows only the routers that reported since; it says how long it has
been listening, and a caller treats a list younger than the live window as
possibly incomplete."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from berth.internal.v1 import scheduler_internal_pb2

LIVE_WINDOW = 3.0  # a router process not heard from for this long counts as gone (reports come every second)


@dataclass
class RouterReport:
    router: str
    reporter: str
    revision: int
    loaded: bool
    at: float


class RouterRevisions:
    def __init__(self, *, live_window: float = LIVE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.live_window = live_window
        self._clock = clock
        self._started = clock()
        self._reports: dict[str, RouterReport] = {}

    def record(self, request: scheduler_internal_pb2.ReportLoadRequest) -> None:
        """Notes a load report's revision; a report naming no router (an
        older router) tells nothing about routing."""
        if not request.router:
            return
        now = self._clock()
        self._reports[request.reporter] = RouterReport(
            request.router, request.reporter, request.revision, request.loaded, now
        )
        if len(self._reports) > 1024:  # forget processes long gone
            self._reports = {k: r for k, r in self._reports.items() if now - r.at < self.live_window}

    def live(self) -> scheduler_internal_pb2.ListRoutersResponse:
        now = self._clock()
        return scheduler_internal_pb2.ListRoutersResponse(
            routers=[
                scheduler_internal_pb2.RouterProcess(
                    router=r.router, reporter=r.reporter, revision=r.revision, loaded=r.loaded,
                    seconds_since_report=now - r.at,
                )
                for r in sorted(self._reports.values(), key=lambda r: (r.router, r.reporter))
                if now - r.at < self.live_window
            ],
            live_window_seconds=self.live_window,
            listening_seconds=now - self._started,
        )
