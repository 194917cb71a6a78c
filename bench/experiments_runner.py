"""The experiment runner's concurrency (issue 17): a dataset of N cases
sent by ``berth.experiments.run_dataset`` to a local HTTP server that
answers each request after a fixed delay, at several ``--concurrency``
values. Prints cases/s, the runner's p50/p99 and the speed-up over
concurrency 1. The router is not involved: this measures the runner alone
(validation, pooling, matching, the bounded thread pool).

    .venv/bin/python bench/experiments_runner.py [--cases 400] [--delay-ms 5]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from berth import experiments  # noqa: E402


def serve(delay: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            time.sleep(delay)
            body = json.dumps({"ok": True, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    server = serve(args.delay_ms / 1000)
    router = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "cases.jsonl"
        path.write_text("".join(json.dumps({
            "name": f"c{i}", "request": {"path": f"/c/{i}"},
            "expect": {"status": 200, "json": {"ok": True, "path": f"/c/{i}"}, "contains": "ok", "max_ms": 60000},
        }) + "\n" for i in range(args.cases)))
        started = time.perf_counter()
        dataset = experiments.load_dataset(path)
        load_ms = (time.perf_counter() - started) * 1000
    print(f"EXPERIMENTS_RUNNER cases={args.cases} server delay {args.delay_ms:g} ms; "
          f"dataset validated and digested in {load_ms:.1f} ms")
    base = 0.0
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        started = time.perf_counter()
        outcomes = experiments.run_dataset(dataset, router=router, project="bench", environment="bench",
                                           deployment_id="dep_bench", concurrency=concurrency)
        elapsed = time.perf_counter() - started
        summary = experiments.summary(outcomes)
        rate = len(outcomes) / elapsed
        base = base or rate
        print(f"  concurrency {concurrency:>3}: {rate:7.1f} cases/s, pass rate {summary['pass_rate']:.2f}, "
              f"p50 {summary['latency_p50_ms']:.1f} ms, p99 {summary['latency_p99_ms']:.1f} ms, "
              f"x{rate / base:.2f} over concurrency 1")
    server.shutdown()


if __name__ == "__main__":
    main()
