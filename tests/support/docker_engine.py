"""A Docker engine for the tests, and images of tiny workers built locally
(no registry is reachable: ``FROM scratch`` plus a copy of busybox)."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
import uuid

import docker

# Every image a test run builds carries berth.test=<this run's id>, so a run
# cleans up only what it made, never another run's images on the same engine.
RUN_ID = uuid.uuid4().hex[:12]
TEST_LABEL = f"berth.test={RUN_ID}"


def engine() -> docker.DockerClient:
    """The local engine, started (dockerd) when it is not running."""
    client = docker.from_env(timeout=60)
    try:
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - any failure means "not running yet"
        pass
    if shutil.which("dockerd") is None:
        raise RuntimeError("no Docker engine: install docker.io (see .ci/run)")
    subprocess.Popen(
        ["dockerd"], stdout=open("/tmp/berth-dockerd.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client = docker.from_env(timeout=60)
            client.ping()
            return client
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    raise RuntimeError("dockerd did not start within 60 s; see /tmp/berth-dockerd.log")


BUSYBOX = "/bin/busybox"

# A CGI answering the worker's version, which deployment it is, and the
# value of the secret named by $SHOW_SECRET (tests only ever use canaries).
CGI_SCRIPT = """#!/bin/sh
echo "Content-Type: text/plain"
echo ""
echo "version=$WORKER_VERSION"
echo "deployment=$BERTH_DEPLOYMENT_ID"
echo "environment=$BERTH_ENVIRONMENT"
if [ -n "$SHOW_SECRET" ]; then eval "echo secret=\\$$SHOW_SECRET"; fi
"""

# busybox httpd does not pass the container's environment to CGIs, so the
# entrypoint writes it into the script's directory first.
# The image ships the applets it needs as symlinks (see APPLETS), so a replica
# starts without installing busybox's applets first.
APPLETS = ("sh", "mkdir", "cat", "chmod", "httpd", "env", "sleep", "dd", "true", "false")
ENTRYPOINT = """#!/bin/sh
mkdir -p /www/cgi-bin
export -p > /www/env.sh
{ echo '#!/bin/sh'; echo '. /www/env.sh'; cat /app/cgi.sh; } > /www/cgi-bin/index.cgi
chmod +x /www/cgi-bin/index.cgi
exec httpd -f -p "${PORT:-8080}" -h /www
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_applets(tar: tarfile.TarFile) -> None:
    for applet in APPLETS:
        link = tarfile.TarInfo(f"applets/{applet}")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)


def build_worker_image(
    client: docker.DockerClient, *, version: str, tag: str | None = None, labels: dict[str, str] | None = None
) -> tuple[str, str]:
    """Builds a busybox httpd worker answering ``version=<version>`` on
    ``/cgi-bin/index.cgi``. Returns (tag, image id)."""
    tag = tag or f"berth-test-worker:{version}-{uuid.uuid4().hex[:8]}"
    dockerfile = f"""FROM scratch
COPY busybox /bin/busybox
COPY applets/ /bin/
COPY entrypoint.sh /app/entrypoint.sh
COPY cgi.sh /app/cgi.sh
ENV WORKER_VERSION={version} PATH=/bin
ENTRYPOINT ["/bin/busybox", "sh", "/app/entrypoint.sh"]
"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "Dockerfile", dockerfile.encode(), 0o644)
        with open(BUSYBOX, "rb") as f:
            _add(tar, "busybox", f.read())
        _add(tar, "entrypoint.sh", ENTRYPOINT.encode())
        _add(tar, "cgi.sh", CGI_SCRIPT.encode())
        _add_applets(tar)
    buf.seek(0)
    image, _ = client.images.build(
        fileobj=buf, custom_context=True, tag=tag, labels={"berth.test": RUN_ID, **(labels or {})}, rm=True
    )
    return tag, image.id


def write_worker_context(directory: str, *, version: str) -> None:
    """Writes the same worker as a build directory (Dockerfile + files), for
    ``berth deploy PATH``."""
    import os

    os.makedirs(os.path.join(directory, "applets"), exist_ok=True)
    shutil.copy(BUSYBOX, os.path.join(directory, "busybox"))
    for applet in APPLETS:
        link = os.path.join(directory, "applets", applet)
        if not os.path.islink(link):
            os.symlink("busybox", link)
    with open(os.path.join(directory, "entrypoint.sh"), "w") as f:
        f.write(ENTRYPOINT)
    with open(os.path.join(directory, "cgi.sh"), "w") as f:
        f.write(CGI_SCRIPT)
    with open(os.path.join(directory, "Dockerfile"), "w") as f:
        f.write(
            f"""FROM scratch
COPY busybox /bin/busybox
COPY applets/ /bin/
COPY entrypoint.sh /app/entrypoint.sh
COPY cgi.sh /app/cgi.sh
ENV WORKER_VERSION={version} PATH=/bin
LABEL berth.test={RUN_ID}
ENTRYPOINT ["/bin/busybox", "sh", "/app/entrypoint.sh"]
"""
        )


def remove_labelled(client: docker.DockerClient, label: str) -> None:
    """Removes every container, then image, carrying ``label`` (k or k=v)."""
    for container in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
    for image in client.images.list(filters={"label": label}):
        try:
            client.images.remove(image.id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            pass  # still used by a container being removed elsewhere
