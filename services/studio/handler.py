"""Serves Studio's static files. The page holds the API key in the tab's
session storage and sends it only as the X-API-KEY header of API calls."""
from __future__ import annotations

import pathlib

from services.router.platform import PlatformRequest, PlatformResponse, error_response

ASSETS = pathlib.Path(__file__).parent / "assets"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# No inline script, no third-party origin, no framing; the key never leaves
# for anywhere but this origin's API.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


def _load() -> dict[str, tuple[str, bytes]]:
    files = {}
    for path in ASSETS.iterdir():
        if path.is_file() and path.suffix in CONTENT_TYPES:
            files[path.name] = (CONTENT_TYPES[path.suffix], path.read_bytes())
    return files


class Studio:
    def __init__(self) -> None:
        self._files = _load()  # read once at start: no disk I/O per request

    async def __call__(self, request: PlatformRequest) -> PlatformResponse:
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "method_not_allowed", "Studio pages are read with GET", [("Allow", "GET, HEAD")])
        name = request.path.removeprefix("/studio").lstrip("/") or "index.html"
        if name not in self._files:
            return error_response(404, "not_found", f"no Studio page {request.path!r}")
        content_type, body = self._files[name]
        return PlatformResponse(200, [("Content-Type", content_type), *SECURITY_HEADERS], body)
