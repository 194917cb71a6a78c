"""Do ``berth deployment status``'s request figures agree with a load
generator's own count (issue 16)? On ``berth up`` with its defaults (its
router runs one worker process per CPU), a busybox worker; ``wrk`` (a C load
generator: event loop, keep-alive connections, microsecond timer) sends
requests for ``--seconds`` (default 30) over ``--concurrency`` connections;
then the status' last-minute window is read once every router worker has
reported at least wrk's count.

Prints wrk's count, rate and p50/p99 (its own, from its latency
distribution) beside the status' (from the routers' merged histogram,
interpolated within its buckets, timing the router's side of the request),
and the ratios status / wrk. Asserts nothing.

    python bench/request_metrics_agreement.py [--seconds 30] [--concurrency 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
from bisect import bisect_left

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from berth import local  # noqa: E402
from services.router.metrics import BUCKETS  # noqa: E402
from tests.support.docker_engine import TEST_LABEL, build_worker_image, engine, remove_labelled  # noqa: E402
from tests.support.platform import RunningPlatform, eventually  # noqa: E402

# wrk's done() hook: its own count, errors and latency distribution (microseconds)
# as one line of JSON on stdout, so the figures are wrk's, not re-derived.
WRK_REPORT = r"""
wrk.headers["X-Berth-Project"] = "bench"
wrk.headers["X-Berth-Environment"] = "preview"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non_2xx_3xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def generate(platform: RunningPlatform, seconds: float, concurrency: int, threads: int,
             script: pathlib.Path) -> dict:
    """wrk (C, event loop, keep-alive) for ``seconds`` at ``concurrency``
    connections; returns its done() figures."""
    script.write_text(WRK_REPORT)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    out = subprocess.run(
        [wrk, "-t", str(min(threads, concurrency)), "-c", str(concurrency), "-d", f"{seconds:g}s",
         "--timeout", "30s", "-s", str(script), f"{platform.router}/cgi-bin/index.cgi"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    (line,) = [x for x in out.splitlines() if x.startswith("BENCH ")]
    return json.loads(line.removeprefix("BENCH "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=4, help="wrk's open connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk's threads")
    args = parser.parse_args()
    if args.seconds > 50:
        parser.error("--seconds must leave the run inside the status' one-minute window (at most 50)")
    with tempfile.TemporaryDirectory(prefix="berth-metrics-bench-") as tmp:
        platform = RunningPlatform(pathlib.Path(tmp) / "data")
        platform.data_dir.mkdir()
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
            wrk = generate(platform, args.seconds, args.concurrency, args.threads, pathlib.Path(tmp) / "report.lua")
            count = wrk["requests"]

            def reported() -> dict | None:
                requests_ = binding()["requests"]
                return requests_ if requests_ and requests_["last_minute"]["requests"] >= count else None

            figures = eventually(reported, timeout=20, what="every request reported")["last_minute"]
        finally:
            platform.stop()
            local.stop_processes(local.recorded_processes(platform.data_dir / local.RUN_DIR), timeout=5)
            platform.remove_containers()
            remove_labelled(engine(), TEST_LABEL)
    took = wrk["duration_us"] / 1e6
    rate = count / took
    status_rate = figures["requests"] / took  # the window holds the whole run: per second of the run
    errors = {k: wrk[k] for k in ("non_2xx_3xx", "connect", "read", "write", "timeout")}
    print(f"run: {took:.1f} s, wrk -c {args.concurrency} -t {min(args.threads, args.concurrency)}, "
          f"wrk errors {errors}, wrk max {wrk['max_us'] / 1000:.2f} ms")
    print(f"{'':22} {'wrk':>12} {'status':>12} {'status/wrk':>11}")
    print(f"{'requests':22} {count:>12} {figures['requests']:>12} {figures['requests'] / count:>11.3f}")
    print(f"{'requests/s (run)':22} {rate:>12.1f} {status_rate:>12.1f} {status_rate / rate:>11.3f}")
    print(f"{'requests/s (1 min)':22} {count / 60:>12.2f} {figures['requests_per_second']:>12.2f} "
          f"{figures['requests_per_second'] / (count / 60):>11.3f}")
    for name in ("p50", "p99"):
        mine = wrk[f"{name}_us"] / 1e6
        theirs = figures[f"{name}_seconds"]
        print(f"{name + ' (ms)':22} {mine * 1000:>12.2f} {theirs * 1000:>12.2f} {theirs / mine:>11.3f}")
        # the status interpolates within one bucket: the routers' own quantile lies in that bucket whatever
        # the interpolation, so finer buckets could move the ratio at most to these bounds
        i = bisect_left(BUCKETS, theirs)
        lo, hi = (BUCKETS[i - 1] if i else 0.0), BUCKETS[min(i, len(BUCKETS) - 1)]
        print(f"{'':22} {'':>12} {'':>12} {'':>11}  routers' {name} in ({lo * 1000:g}, {hi * 1000:g}] ms: "
              f"exact buckets would put status/wrk in {lo / mine:.3f}..{hi / mine:.3f}")
    print(f"{'error rate (5xx)':22} {'':>12} {figures['error_rate']:>12.3f}")


if __name__ == "__main__":
    main()
