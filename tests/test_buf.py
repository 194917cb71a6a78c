"""``buf lint`` and ``buf breaking`` over protos/ (protos/buf.yaml), with the
buf pinned in tools/buf/package-lock.json installed by ``npm ci`` into a
directory of this session's own, as the Node client test installs its
dependencies (Node and npm from Debian's packages when missing).

The breaking-change baseline is protos/buf-image.binpb, the descriptors of
the last release (docs/grpc.md says how to refresh it). A second test proves
the check bites: a field number changed, or a field renamed, fails it."""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from tests.clients.test_node_client import _ensure_node, _run

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUF_DIR = ROOT / "tools" / "buf"
BASELINE = PROTOS / "buf-image.binpb"


Buf = tuple[list[str], dict[str, str]]


@pytest.fixture(scope="session")
def buf(tmp_path_factory: pytest.TempPathFactory) -> Buf:
    """The command that runs the pinned buf (node and its launcher script)
    and its environment (buf's cache in the session's temp dir, not $HOME)."""
    node, npm = _ensure_node()
    workdir = tmp_path_factory.mktemp("buf")
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(BUF_DIR / name, workdir / name)
    with open(tmp_path_factory.getbasetemp().parent / "berth-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
             what="installing buf (npm ci in tools/buf)", timeout=600, cwd=workdir)
    pinned = json.loads((workdir / "package-lock.json").read_text())["packages"]["node_modules/@bufbuild/buf"]["version"]
    command = [node, str(workdir / "node_modules" / "@bufbuild" / "buf" / "bin" / "buf")]
    env = {**os.environ, "BUF_CACHE_DIR": str(workdir / "cache")}
    version = _run([*command, "--version"], what="buf --version", timeout=60, env=env).stdout.strip()
    assert version == pinned, (version, pinned)
    return command, env


def _buf(buf: Buf, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    command, env = buf
    try:
        return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"buf {' '.join(args)} did not finish within 300 s")


def test_buf_lint_is_clean(buf: Buf) -> None:
    result = _buf(buf, "lint", cwd=PROTOS)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_breaking_change_against_the_released_descriptors(buf: Buf) -> None:
    assert BASELINE.is_file(), "protos/buf-image.binpb (the last release's descriptors) is missing"
    result = _buf(buf, "breaking", "--against", str(BASELINE), cwd=PROTOS)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


FIELD = re.compile(r"^(\s+string\s+)(\w+)(\s*=\s*)(\d+)(;)", re.MULTILINE)


@pytest.mark.parametrize("change", ["field-number", "field-name"])
def test_the_breaking_check_fails_on_a_changed_field(buf: Buf, tmp_path: pathlib.Path, change: str) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    target = copy / "berth" / "v1" / "common.proto"
    text = target.read_text()
    match = FIELD.search(text)
    assert match, "no string field in berth/v1/common.proto to change"
    if change == "field-number":
        replacement = f"{match[1]}{match[2]}{match[3]}{int(match[4]) + 1000}{match[5]}"
    else:
        replacement = f"{match[1]}{match[2]}_renamed{match[3]}{match[4]}{match[5]}"
    target.write_text(text[:match.start()] + replacement + text[match.end():])

    result = _buf(buf, "breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0, f"buf breaking accepted a {change} change of {match[2]}:\n{result.stdout}"
    assert match[2] in result.stdout or match[4] in result.stdout, result.stdout
