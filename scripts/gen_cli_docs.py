"""Writes docs/cli.md from the CLI's own help (a test fails when stale).

Usage: python scripts/gen_cli_docs.py [--check]
"""
from __future__ import annotations

import pathlib
import sys

import click

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from berth.cli import main  # noqa: E402

TARGET = ROOT / "docs" / "cli.md"


def walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            found += walk(command.commands[name], [*path, name])
    return found


def render() -> str:
    lines = [
        "# berth CLI reference",
        "",
        "Generated from the CLI's help by `python scripts/gen_cli_docs.py`; do not edit by hand.",
        "Project: `--project`, `BERTH_PROJECT` or `berth.toml`. API key: `BERTH_API_KEY`.",
        "Every command takes `--output json`.",
        "",
    ]
    for path, command in walk(main, ["berth"]):
        if isinstance(command, click.Group) and len(path) > 1:
            continue
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=100, max_content_width=100)
        lines += [f"## `{' '.join(path)}`", "", "```text", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.exists() and TARGET.read_text() == text else 1)
    TARGET.write_text(text)
    print(f"wrote {TARGET}", file=sys.stderr)
