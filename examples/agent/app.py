"""A small agent worker for Berth: JSON in, JSON out, and a streamed reply
over server-sent events. Standard library only.

  GET  /              -> {"status": "ok", ...}            (the health check)
  POST /v1/reply      {"message": "..."} -> {"reply": "...", "deployment": "..."}
  POST /v1/stream     {"message": "..."} -> text/event-stream, one token per event

The "model" is deliberately trivial (it echoes words back); the point is the
shape of a worker: $PORT, Berth's injected variables, and a secret
(AGENT_API_KEY) read from the environment and never printed.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))
DEPLOYMENT = os.environ.get("BERTH_DEPLOYMENT_ID", "local")
ENVIRONMENT = os.environ.get("BERTH_ENVIRONMENT", "local")
VERSION = os.environ.get("AGENT_VERSION", "1")
TOKEN_DELAY = float(os.environ.get("AGENT_TOKEN_DELAY", "0.02"))
MAX_BODY = 64 * 1024


def api_key_fingerprint() -> str:
    """Proves which secret a replica got without revealing it."""
    key = os.environ.get("AGENT_API_KEY", "")
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def compose_reply(message: str) -> list[str]:
    words = message.split() or ["(silence)"]
    return ["You", "said:", *words, f"(agent v{VERSION})"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "berth-agent"

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(json.dumps({"event": "request", "line": fmt % args}) + "\n")

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _message(self) -> str | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": {"code": "too_large", "message": f"body over {MAX_BODY} bytes"}})
            return None
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
            message = data["message"]
            if not isinstance(message, str):
                raise TypeError
            return message
        except (ValueError, KeyError, TypeError):
            self._json(400, {"error": {"code": "invalid_argument", "message": 'send JSON {"message": "<text>"}'}})
            return None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path in ("/", "/healthz"):
            self._json(200, {
                "status": "ok", "version": VERSION, "deployment": DEPLOYMENT, "environment": ENVIRONMENT,
                "api_key_fingerprint": api_key_fingerprint(),
            })
        else:
            self._json(404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/v1/reply":
            message = self._message()
            if message is not None:
                self._json(200, {"reply": " ".join(compose_reply(message)), "deployment": DEPLOYMENT, "version": VERSION})
        elif self.path == "/v1/stream":
            message = self._message()
            if message is None:
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for token in compose_reply(message):
                self._chunk(f"data: {json.dumps({'token': token})}\n\n")
                time.sleep(TOKEN_DELAY)
            self._chunk(f"event: done\ndata: {json.dumps({'deployment': DEPLOYMENT})}\n\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json(404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    # SIGTERM: stop accepting, let in-flight requests finish, exit.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(json.dumps({"event": "listening", "port": PORT, "deployment": DEPLOYMENT}), flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
