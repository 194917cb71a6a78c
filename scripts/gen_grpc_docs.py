"""Writes the reference part of docs/grpc.md from the protos' comments: every
service and method (what it does, the credential it takes, the errors it
answers — as the comments in protos/ say), every request and response
message with its fields' types and comments, and every enum with its values.
A test fails when the page is stale (like docs/cli.md and docs/api.md).

The descriptors come from protoc (grpcio-tools) with
``--include_source_info``, so the comments are the ones in the .proto files.
Only the text between the markers is generated; the introduction before them
(addresses, credentials, errors, pagination, compatibility, examples) is
written by hand.

Usage: python scripts/gen_grpc_docs.py [--check]
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
from collections.abc import Iterator

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "docs" / "grpc.md"
START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
PACKAGES = (
    ("berth.v1", "Public API (`berth.v1`)"),
    ("berth.internal.v1", "Internal API (`berth.internal.v1`, the service token only)"),
)

# FileDescriptorProto / DescriptorProto / ServiceDescriptorProto field numbers
# (the paths of SourceCodeInfo.Location).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
SERVICE_METHOD = 2
ENUM_VALUE = 2

SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def descriptor_set(files: list[str] | None = None) -> descriptor_pb2.FileDescriptorSet:
    """The protos compiled with their comments (source info), imports included."""
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", "--include_source_info", "--include_imports",
                f"--descriptor_set_out={out}", *(files or proto_files())]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(text: str) -> str:
    """A comment as Markdown: lines joined into paragraphs, blank lines kept."""
    paragraphs = [" ".join(line.strip() for line in block.splitlines() if line.strip())
                  for block in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(p for p in paragraphs if p)


class Comments:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def get(self, *path: int) -> str:
        loc = self._by_path.get(tuple(path))
        if loc is None:
            return ""
        return _comment("\n\n".join(c for c in (loc.leading_comments, loc.trailing_comments) if c.strip()))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n\n", "<br>").replace("\n", " ") or " "


def _anchor(full_name: str) -> str:
    return full_name.lstrip(".").replace(".", "-").lower()


class Renderer:
    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = [f for f in fds.file if f.package.startswith("berth.")]
        self.known: set[str] = set()
        self.map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        for f in self.files:
            for name, message in self._messages(f.message_type, f".{f.package}"):
                self.known.add(name)
                if message.options.map_entry:
                    self.map_entries[name] = message
            for enum in f.enum_type:
                self.known.add(f".{f.package}.{enum.name}")
            for name, message in self._messages(f.message_type, f".{f.package}"):
                for enum in message.enum_type:
                    self.known.add(f"{name}.{enum.name}")

    def _messages(self, messages, prefix: str) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:  # type: ignore[no-untyped-def]
        for message in messages:
            name = f"{prefix}.{message.name}"
            yield name, message
            yield from self._messages(message.nested_type, name)

    def type_of(self, field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
        if field.type_name in self.map_entries:
            entry = self.map_entries[field.type_name]
            return f"map<{self.type_of(entry.field[0], package)}, {self.type_of(entry.field[1], package)}>"
        if field.type in SCALARS:
            name = SCALARS[field.type]
        else:
            name = self.link(field.type_name, package)
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {name}"
        if field.proto3_optional:
            return f"optional {name}"
        return name

    def link(self, type_name: str, package: str) -> str:
        short = type_name.lstrip(".")
        if short.startswith(package + "."):
            short = short[len(package) + 1:]
        if type_name in self.known:
            return f"[`{short}`](#{_anchor(type_name)})"
        return f"`{short}`"

    # -- sections ------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        for package, title in PACKAGES:
            files = [f for f in self.files if f.package == package]
            lines += [f"## {title}", ""]
            for f in files:
                comments = Comments(f)
                for si, service in enumerate(f.service):
                    lines += self.service(f, comments, si, service)
            lines += [f"### Messages and enums of `{package}`", ""]
            for f in files:
                comments = Comments(f)
                for mi, message in enumerate(f.message_type):
                    lines += self.message(f, comments, (FILE_MESSAGE, mi), message, f".{f.package}")
                for ei, enum in enumerate(f.enum_type):
                    lines += self.enum(comments, (FILE_ENUM, ei), enum, f".{f.package}")
        return "\n".join(lines).rstrip() + "\n"

    def service(self, f, comments: Comments, si: int, service) -> list[str]:  # type: ignore[no-untyped-def]
        full = f"{f.package}.{service.name}"
        lines = [f'<a id="{_anchor(full)}"></a>', f"### Service `{full}`", "",
                 f"Defined in `protos/{f.name}`.", ""]
        text = comments.get(FILE_SERVICE, si)
        if text:
            lines += [text, ""]
        for mi, method in enumerate(service.method):
            stream_in = "stream " if method.client_streaming else ""
            stream_out = "stream " if method.server_streaming else ""
            lines += [
                f'<a id="{_anchor(full + "." + method.name)}"></a>',
                f"#### `{service.name}.{method.name}`",
                "",
                f"`rpc {method.name}({stream_in}{method.input_type.rsplit('.', 1)[-1]}) returns "
                f"({stream_out}{method.output_type.rsplit('.', 1)[-1]})`",
                "",
            ]
            text = comments.get(FILE_SERVICE, si, SERVICE_METHOD, mi)
            lines += [text or "(no comment in the proto)", ""]
            lines += [f"Request: {self.link(method.input_type, f.package)}. "
                      f"Response: {'a stream of ' if method.server_streaming else ''}"
                      f"{self.link(method.output_type, f.package)}.", ""]
        return lines

    def message(self, f, comments: Comments, path: tuple[int, ...], message, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
        full = f"{prefix}.{message.name}"
        if message.options.map_entry:
            return []
        short = full[len(f".{f.package}."):]
        lines = [f'<a id="{_anchor(full)}"></a>', f"#### `{short}`", ""]
        text = comments.get(*path)
        if text:
            lines += [text, ""]
        if message.field:
            oneofs = {i: o.name for i, o in enumerate(message.oneof_decl)}
            lines += ["| field | number | type | description |", "| --- | --- | --- | --- |"]
            for fi, field in enumerate(message.field):
                about = comments.get(*path, MESSAGE_FIELD, fi)
                if field.HasField("oneof_index") and not field.proto3_optional:
                    about = f"One of `{oneofs[field.oneof_index]}`. {about}".strip()
                lines.append(f"| `{field.name}` | {field.number} | {self.type_of(field, f.package)} | {_cell(about)} |")
            lines.append("")
        else:
            lines += ["(no fields)", ""]
        for ni, nested in enumerate(message.nested_type):
            lines += self.message(f, comments, (*path, MESSAGE_NESTED, ni), nested, full)
        for ei, enum in enumerate(message.enum_type):
            lines += self.enum(comments, (*path, MESSAGE_ENUM, ei), enum, full, package=f.package)
        return lines

    def enum(self, comments: Comments, path: tuple[int, ...], enum, prefix: str, package: str = "") -> list[str]:  # type: ignore[no-untyped-def]
        full = f"{prefix}.{enum.name}"
        short = full.lstrip(".")
        if package and short.startswith(package + "."):
            short = short[len(package) + 1:]
        lines = [f'<a id="{_anchor(full)}"></a>', f"#### enum `{short}`", ""]
        text = comments.get(*path)
        if text:
            lines += [text, ""]
        lines += ["| value | number | description |", "| --- | --- | --- |"]
        for vi, value in enumerate(enum.value):
            lines.append(f"| `{value.name}` | {value.number} | {_cell(comments.get(*path, ENUM_VALUE, vi))} |")
        return lines + [""]


def render() -> str:
    return Renderer(descriptor_set()).render()


def updated(text: str, reference: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{TARGET} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{reference}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/grpc.md is stale")
    args = parser.parse_args()
    current = TARGET.read_text()
    fresh = updated(current, render())
    if args.check:
        if fresh != current:
            print("docs/grpc.md is stale: run python scripts/gen_grpc_docs.py", file=sys.stderr)
            raise SystemExit(1)
        return
    TARGET.write_text(fresh)
    print(f"wrote {TARGET}", file=sys.stderr)


if __name__ == "__main__":
    main()
