"""Run an asyncio gRPC service in a background thread for tests that drive
it with ordinary (blocking) stubs."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def start_in_background(factory: Callable[[], Awaitable[Any]]) -> tuple[BackgroundLoop, Any]:
    bg = BackgroundLoop()
    return bg, bg.run(factory())
