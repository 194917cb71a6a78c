"""berth dev's change detection on a real directory: what it sees as
changed (content, size, a new or removed file, not an untouched tree), and
the directories it ignores."""
from __future__ import annotations

import os
import pathlib

from berth.dev import changed, snapshot


def test_snapshot_and_changes(tmp_path: pathlib.Path) -> None:
    (tmp_path / "app.py").write_text("print(1)\n")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "page.txt").write_text("v1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    before = snapshot(tmp_path)
    assert set(before) == {"app.py", os.path.join("www", "page.txt")}
    assert changed(before, snapshot(tmp_path)) == []

    (tmp_path / ".git" / "HEAD").write_text("other ref\n")  # ignored directory
    assert changed(before, snapshot(tmp_path)) == []

    page = tmp_path / "www" / "page.txt"
    page.write_text("v2\n")  # same size: seen by its mtime
    stat = page.stat()
    os.utime(page, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    (tmp_path / "new.txt").write_text("x")
    (tmp_path / "app.py").unlink()
    after = snapshot(tmp_path)
    assert changed(before, after) == ["app.py", "new.txt", os.path.join("www", "page.txt")]
