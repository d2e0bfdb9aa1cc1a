"""One atomic write and one JSON-lines reader (m3ae.io), and their users."""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from m3ae.cli.eval_common import write_results, write_settings
from m3ae.config import build_config
from m3ae.evaluation import Features
from m3ae.io import atomic_write, read_jsonl, save_safetensors, write_json_atomic
from m3ae.training.trainer import _write_run_files


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


class _TornFile:
    """A file whose first write stops half-way with a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def torn_writes(monkeypatch, tmp_path):
    """From here on, every file written under tmp_path is cut off half-way by an OSError:
    files opened from Python (open, Path.write_text, np.save) and safetensors' own writer."""
    real_open = builtins.open

    def torn_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        written = any(c in mode for c in "wax+") and str(file).startswith(str(tmp_path))
        return _TornFile(f) if written else f

    monkeypatch.setattr(builtins, "open", torn_open)
    monkeypatch.setattr(io, "open", torn_open)  # pathlib opens through io.open
    for module in (safetensors.torch, safetensors.numpy):
        def torn_save(tensors, filename, metadata=None, _real=module.save_file):
            _real(tensors, filename, metadata=metadata)
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(module, "save_file", torn_save)


def _config(version):
    return build_config("tiny", None, [f"train.steps={version}"])


def _features(version):
    return Features(np.full((3, 2), version, np.float32), np.arange(3) + version, ["a", "b", "c"])


# Each writer of a result or run file: (folder, version) -> writes version's content in folder.
WRITERS = {
    "Config.save yaml": lambda d, v: _config(v).save(d / "config.yaml"),
    "Config.save json": lambda d, v: _config(v).save(d / "config.json"),
    "trainer run files": lambda d, v: _write_run_files(_config(v), d, v),  # config.yaml, version.json
    "eval write_settings": lambda d, v: write_settings(d / "settings.json", argparse.Namespace(seed=v)),
    "eval write_results": lambda d, v: write_results(d, "results.json", {"accuracy": v}, argparse.Namespace(seed=v)),
    "Features.save npy": lambda d, v: _features(v).save(d / "f.npy"),
    "Features.save safetensors": lambda d, v: _features(v).save(d / "f.safetensors"),
    "write_json_atomic": lambda d, v: write_json_atomic(d / "a.json", {"v": v}),
    "save_safetensors torch": lambda d, v: save_safetensors({"w": torch.full((4,), float(v))}, d / "w.safetensors"),
}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-version", "first-write"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_cut_off_half_way_leaves_the_old_file_or_none(tmp_path, request, writer, existing):
    folder = tmp_path / "out"
    folder.mkdir()
    if existing:
        WRITERS[writer](folder, 1)
    before = _snapshot(folder)
    assert before or not existing
    request.getfixturevalue("torn_writes")
    with pytest.raises(OSError, match="No space left"):
        WRITERS[writer](folder, 2)
    assert _snapshot(folder) == before  # the old bytes, no partial file, no temporary left
