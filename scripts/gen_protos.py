"""Regenerate the Python stubs for protos/ (checked in): the public API
``berth.v1`` into berth/v1/ and the service-to-service API
``berth.internal.v1`` into berth/internal/v1/, with the ``__init__.py`` files
that make them packages and, in each, ``descriptors.binpb``: the package's
descriptors with the protos' comments, for server reflection.

Usage: python scripts/gen_protos.py [--out DIR]
The stale-stub test runs this into a temporary directory and compares.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# The hand-written package the generated ones live in (the Python SDK): its
# own __init__.py is not generated.
TOP_PACKAGE = "berth"
# Written next to each package's stubs: its FileDescriptorSet with comments.
DESCRIPTORS = "descriptors.binpb"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def package_dirs() -> list[pathlib.PurePosixPath]:
    """Every directory that gets an ``__init__.py``: each proto package's
    directory and the ones between it and ``berth/`` (berth/internal)."""
    dirs: set[pathlib.PurePosixPath] = set()
    for proto in proto_files():
        directory = pathlib.PurePosixPath(proto).parent
        while directory.parts and directory != pathlib.PurePosixPath(TOP_PACKAGE):
            dirs.add(directory)
            directory = directory.parent
    return sorted(dirs)


def generate(out_dir: pathlib.Path) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in package_dirs():
        init = out_dir / directory / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text("")
    # Each package's descriptors with their comments (source info), which
    # server reflection serves (services/common/reflection.py).
    for directory in sorted({pathlib.PurePosixPath(p).parent for p in proto_files()}):
        files = [p for p in proto_files() if pathlib.PurePosixPath(p).parent == directory]
        target = out_dir / directory / DESCRIPTORS
        if protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", "--include_source_info",
                        f"--descriptor_set_out={target}", *files]) != 0:
            raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    generate(out)
    for directory in package_dirs():
        print(f"generated {out / directory}", file=sys.stderr)
    if out.resolve() == ROOT:
        # docs/grpc.md's reference follows the protos' comments: refresh it too
        # (tests/test_grpc_docs.py fails when it is stale).
        sys.path.insert(0, str(ROOT / "scripts"))
        import gen_grpc_docs

        target = gen_grpc_docs.TARGET
        target.write_text(gen_grpc_docs.updated(target.read_text(), gen_grpc_docs.render()))
        print(f"regenerated the reference in {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
