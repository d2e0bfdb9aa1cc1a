"""One atomic write and one JSON-lines reader (m3ae.io), and their users."""
from __future__ import annotations

import json
import os

import pytest

from m3ae.io import atomic_write, read_jsonl


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_text_bytes_and_folders(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "one").read_text() == "one"
    atomic_write(tmp_path / "a.txt", b"two")
    assert (tmp_path / "a.txt").read_bytes() == b"two"

    def folder(content):
        def write(d):
            d.mkdir()
            (d / "x").write_text(content)
        return write

    atomic_write(tmp_path / "step_1", folder("old"))
    atomic_write(tmp_path / "step_1", folder("new"))  # an existing folder is replaced
    assert (tmp_path / "step_1" / "x").read_text() == "new"
    assert _entries(tmp_path) == ["a.txt", "step_1"]  # no temporary or stepped-aside folder left


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failing_writer_leaves_the_old_version_and_no_temporary(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "x").write_text("old")

    def broken(tmp):
        if kind == "folder":
            tmp.mkdir()
            tmp = tmp / "x"
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert (target if kind == "file" else target / "x").read_text() == "old"
    assert _entries(tmp_path) == ["out"]


def test_atomic_write_follows_the_umask(tmp_path):
    def private(tmp):  # as safetensors does: a new file readable by its owner only
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    old = os.umask(0o027)
    try:
        a = atomic_write(tmp_path / "a", private)
        b = atomic_write(tmp_path / "b", "text")
    finally:
        os.umask(old)
    assert oct(a.stat().st_mode & 0o777) == oct(b.stat().st_mode & 0o777) == oct(0o640)


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n\n" + '{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_loss_curve_of_a_metrics_file_with_a_torn_last_line(tmp_path):
    from m3ae.visualize import plot_loss_curve

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1 / s, "text_loss": 0.0} for s in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss": 0.')
    png = plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
