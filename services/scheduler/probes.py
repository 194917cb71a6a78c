"""HTTP readiness: a replica is ready when GET http://ip:port/path answers
with any status below 500 within a short timeout."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

PROBE_TIMEOUT = 1.0


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str  # e.g. "HTTP 200" or "connection refused"


async def probe_http(ip: str, port: int, path: str = "/", *, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    if not ip:
        return ProbeResult(False, "container has no address on the network")
    path = path if path.startswith("/") else "/" + path
    try:
        async with asyncio.timeout(timeout):  # (not wait_for: it can swallow a cancellation on 3.11)
            return await _get(ip, port, path)
    except TimeoutError:
        return ProbeResult(False, f"GET {path} on {ip}:{port} timed out after {timeout:g} s")
    except OSError as exc:
        return ProbeResult(False, f"GET {path} on {ip}:{port}: {exc.strerror or exc}")


async def _get(ip: str, port: int, path: str) -> ProbeResult:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: berth-probe\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    parts = line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"GET {path} on {ip}:{port}: not an HTTP answer")
    status = int(parts[1])
    return ProbeResult(status < 500, f"HTTP {status}")
