"""The checked-in protobuf stubs must match protos/: regenerate and compare."""
from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path):
    """Both packages, berth/v1 (public) and berth/internal/v1 (service to
    service), with their __init__.py files."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "the generator produced nothing"
    packages = {name.parent for name in fresh}
    assert {pathlib.Path("berth/v1"), pathlib.Path("berth/internal/v1"), pathlib.Path("berth/internal")} <= packages
    checked_in = {
        p.relative_to(ROOT): p.read_bytes()
        for package in packages
        for p in (ROOT / package).iterdir()
        if p.is_file()
    }
    assert sorted(map(str, fresh)) == sorted(map(str, checked_in)), "stub files added or removed: run scripts/gen_protos.py"
    stale = [str(name) for name, data in fresh.items() if checked_in[name] != data]
    assert not stale, f"stale stubs {stale}: run python scripts/gen_protos.py and commit"
    leftover = {p.parent.relative_to(ROOT) for p in (ROOT / "berth").rglob("*_pb2.py")} - packages
    assert not leftover, f"stubs of a proto package that no longer exists: {sorted(map(str, leftover))}"


def test_cli_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"])
    assert result.returncode == 0, "docs/cli.md is stale: run python scripts/gen_cli_docs.py and commit"


def test_rest_reference_is_current():
    """docs/api.md's endpoint reference is rendered from the OpenAPI document
    the router serves; every operation appears in it."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"])
    assert result.returncode == 0, "docs/api.md is stale: run python scripts/gen_api_docs.py and commit"
    sys.path.insert(0, str(ROOT))
    from services.router import openapi

    text = (ROOT / "docs" / "api.md").read_text()
    for path, methods in openapi.document()["paths"].items():
        for method in methods:
            assert f"### `{method.upper()} {path}`" in text
    assert "uptime\n" not in text and "state, uptime" not in text
