"""Do ``berth deployment status``'s request figures agree with a load
generator's own count (issue 16)? On ``berth up`` (its router with two
worker processes), a busybox worker; a generator sends requests for
``--seconds`` (default 30) at concurrency ``--concurrency``, counting every
answer and timing each one itself; then the status' last-minute window is
read once every router worker has reported it.

Prints the generator's count, rate and p50/p99 beside the status' (the
status' p50/p99 come from the routers' merged histogram, interpolated in
buckets 0.5 ms ... 60 s wide, and time the router's side of the request; the
generator's include its own client overhead), and the ratios. Asserts
nothing.

    python bench/request_metrics_agreement.py [--seconds 30] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from berth import local  # noqa: E402
from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled  # noqa: E402
from tests.support.platform import RunningPlatform, eventually  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def generate(platform: RunningPlatform, seconds: float, concurrency: int) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        session = requests.Session()
        session.headers.update({"X-Berth-Project": "bench", "X-Berth-Environment": "preview"})
        mine: list[float] = []
        counts: dict[int, int] = {}
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            status = session.get(f"{platform.router}/cgi-bin/index.cgi", timeout=30).status_code
            mine.append(time.perf_counter() - started)
            counts[status] = counts.get(status, 0) + 1
        with lock:
            latencies.extend(mine)
            for status, n in counts.items():
                statuses[status] = statuses.get(status, 0) + n

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if args.seconds > 50:
        parser.error("--seconds must leave the run inside the status' one-minute window (at most 50)")
    with tempfile.TemporaryDirectory(prefix="berth-metrics-bench-") as tmp:
        platform = RunningPlatform(pathlib.Path(tmp) / "data")
        platform.data_dir.mkdir()
        platform.env["BERTH_ROUTER_WORKERS"] = "2"
        try:
            platform.start()
            key = platform.cli_json("projects", "create", "bench")["api_key"]
            tag, _ = build_worker_image(engine(), version="m1")
            deployment = platform.cli_json("deploy", "--image", tag, "--project", "bench", api_key=key)["deployment"]["id"]

            def binding() -> dict:
                data = platform.cli_json("deployment", "status", deployment, "--project", "bench", api_key=key)
                (found,) = data["bindings"]
                return found

            eventually(lambda: binding()["status"] == "running", timeout=90, what="the binding running")
            latencies, statuses, took = generate(platform, args.seconds, args.concurrency)
            count = len(latencies)

            def reported() -> dict | None:
                requests_ = binding()["requests"]
                return requests_ if requests_ and requests_["last_minute"]["requests"] >= count else None

            figures = eventually(reported, timeout=20, what="every request reported")["last_minute"]
        finally:
            platform.stop()
            local.stop_processes(local.recorded_processes(platform.data_dir / local.RUN_DIR), timeout=5)
            platform.remove_containers()
            remove_labelled(engine(), TEST_LABEL)
    rate = count / took
    status_rate = figures["requests"] / took  # the window holds the whole run: per second of the run
    print(f"run: {took:.1f} s at concurrency {args.concurrency}, answers {statuses}")
    print(f"{'':22} {'generator':>12} {'status':>12} {'ratio':>8}")
    print(f"{'requests':22} {count:>12} {figures['requests']:>12} {figures['requests'] / count:>8.3f}")
    print(f"{'requests/s (run)':22} {rate:>12.1f} {status_rate:>12.1f} {status_rate / rate:>8.3f}")
    print(f"{'requests/s (1 min)':22} {count / 60:>12.2f} {figures['requests_per_second']:>12.2f} "
          f"{figures['requests_per_second'] / (count / 60):>8.3f}")
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        mine = pct(latencies, q)
        theirs = figures[f"{name}_seconds"]
        print(f"{name + ' (ms)':22} {mine * 1000:>12.2f} {theirs * 1000:>12.2f} {theirs / mine:>8.3f}")
    print(f"{'error rate':22} {sum(n for s, n in statuses.items() if s >= 500) / count:>12.3f} "
          f"{figures['error_rate']:>12.3f}")


if __name__ == "__main__":
    main()
