"""Replica logs under a flood (issue 16): a busybox replica prints MB
megabytes in WIDTH-byte lines as fast as it can, run by the real reconciler
on this Docker engine; the scheduler's log reader (services/scheduler/logs.py,
in this process) follows it. Prints the lines printed, received and dropped
(counted by the markers), the bytes received, the follow's wall time, this
process's peak RSS growth during the follow (the scheduler's memory bound),
and the time of a plain read of the last 10000 lines afterwards. Asserts
nothing. Everything it creates carries its own berth.instance and the test
label, and is removed at the end (also on Ctrl-C).

    python bench/logs_flood.py [--mb 50] [--width 999]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pathlib
import sys
import tarfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from services.scheduler.desired import DesiredTable  # noqa: E402
from services.scheduler.docker_adapter import DockerAdapter  # noqa: E402
from services.scheduler.events import EventStore  # noqa: E402
from services.scheduler.logs import CrashTails, DeploymentLogs, LogQuery  # noqa: E402
from services.scheduler.reconciler import Reconciler, SchedulerConfig  # noqa: E402
from tests.scheduler.conftest import FakeSecrets, make_binding  # noqa: E402
from tests.support.docker_engine import BUSYBOX, RUN_ID, engine  # noqa: E402

BB = "/bin/busybox"


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss()


def busybox_image(client, label: str) -> str:  # type: ignore[no-untyped-def]
    dockerfile = b"FROM scratch\nCOPY busybox /bin/busybox\nENV PATH=/bin\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar, open(BUSYBOX, "rb") as f:
        for name, data, mode in (("Dockerfile", dockerfile, 0o644), ("busybox", f.read(), 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, labels={"berth.test": RUN_ID, "bench": label},
                                   rm=True)
    return image.id


async def run(mb: int, width: int) -> None:
    client = engine()
    instance = f"bench{uuid.uuid4().hex[:8]}"
    image = busybox_image(client, instance)
    count = mb * 1_000_000 // (width + 1)
    script = (
        f"s=x; while [ ${{#s}} -lt {width} ]; do s=$s$s; done; s=${{s:0:{width}}}; "
        f"{BB} yes \"$s\" | {BB} head -n {count}; {BB} sleep 1; echo flood-done; exec {BB} httpd -f -p 8080 -h /"
    )
    binding = make_binding(image="", image_id=image, min_replicas=1, max_replicas=1, command=[BB, "sh", "-c", script])
    adapter = DockerAdapter(client)
    table = DesiredTable()
    table.replace([], [binding])
    reconciler = Reconciler(adapter, table, FakeSecrets(), EventStore(), SchedulerConfig(instance=instance,
                                                                                          reconcile_interval=0.5))
    logs = DeploymentLogs(adapter, instance, CrashTails(adapter, table, None))
    query = LogQuery(deployment_id=binding.deployment.id, environment_ids=frozenset({binding.environment_id}),
                     follow=True)
    loop_task = asyncio.create_task(reconciler.run())
    try:
        received = dropped = nbytes = 0
        base = reset_peak_rss()
        started = time.monotonic()
        async with asyncio.timeout(600):
            async with contextlib.aclosing(logs.read(query)) as lines:
                async for e in lines:
                    dropped += e.dropped
                    if not e.dropped:
                        received += 1
                        nbytes += len(e.text) + 1
                    if e.text == "flood-done":
                        break
        elapsed = time.monotonic() - started
        growth = peak_rss() - base
        started = time.monotonic()
        plain = [e async for e in logs.read(LogQuery(query.deployment_id, query.environment_ids, tail=10000))]
        plain_s = time.monotonic() - started
        print(f"LOGS_FLOOD printed_lines={count} printed_mb={count * (width + 1) / 1e6:.1f} received_lines={received} "
              f"dropped_lines={dropped} accounted={received - 1 + dropped == count} received_mb={nbytes / 1e6:.2f} "
              f"follow_s={elapsed:.1f} peak_rss_growth_mib={growth / 2**20:.1f} "
              f"tail10000_read_s={plain_s:.2f} tail10000_lines={len(plain)} load={os.getloadavg()[0]:.2f}")
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await reconciler.close()
        for c in client.containers.list(all=True, filters={"label": f"berth.instance={instance}"}, ignore_removed=True):
            with contextlib.suppress(Exception):
                c.remove(force=True)
        with contextlib.suppress(Exception):
            client.images.remove(image, force=True)
        adapter.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="megabytes the replica prints")
    parser.add_argument("--width", type=int, default=999, help="bytes per line (without the newline)")
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.width))


if __name__ == "__main__":
    main()
