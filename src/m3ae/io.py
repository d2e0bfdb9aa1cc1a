"""Files that are whole or absent: one atomic write (and the JSON and safetensors writers built
on it), and one reader of JSON-lines logs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush one file, or one folder's list of entries, to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform; the rename still happens
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsynced on every file system
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` so that a reader (or a run killed half-way) sees the old version or the
    new one, never part of either.

    ``content`` is text, bytes, or a function that writes a file *or a folder* at the path it is
    given. That temporary path is a hidden name beside ``path`` (``.NAME.tmp``: a rename is
    atomic only within one file system, and a hidden name matches no glob of finished files).
    It is flushed to disk before the rename, and a file gets an ordinary new file's permissions
    (some writers, e.g. safetensors, create 0600). If writing fails the temporary path is
    removed and ``path`` is left as it was. A folder replaces an existing one by stepping it
    aside (``.NAME.old``) first, which is deleted once the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # left by a killed writer
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
            _fsync(p)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        if tmp.is_dir() and path.exists():  # os.replace cannot replace a non-empty folder
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(path.parent)  # the rename itself
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON at ``path``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, json.dumps(obj, indent=2))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write torch or numpy tensors to a .safetensors file atomically (see :func:`atomic_write`),
    with the permissions of an ordinary new file: safetensors itself creates 0600."""
    import torch  # here, not at the top: the rest of this module needs neither torch nor safetensors

    if any(isinstance(v, torch.Tensor) for v in tensors.values()):
        from safetensors.torch import save_file as save
    else:
        from safetensors.numpy import save_file as save
    return atomic_write(path, lambda tmp: save(tensors, str(tmp), metadata=metadata))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file such as ``metrics.jsonl``; a line that does not parse (the
    torn last line of a killed writer) is dropped, and a missing file has no rows."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
