"""Small files for the data tests: images of every awkward kind, tars, tables."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(kind: str = "rgb", size=(40, 30), fmt: str = "JPEG", seed: int = 0) -> bytes:
    """Encoded image bytes of a given kind (rgb, grey, cmyk, palette, rgba, 16bit, exif6)."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if kind == "rgb":
        img = Image.fromarray(rgb)
    elif kind == "grey":
        img = Image.fromarray(rgb[..., 0], "L")
    elif kind == "cmyk":
        img = Image.fromarray(rgb).convert("CMYK")
    elif kind == "palette":
        img = Image.fromarray(rgb).convert("P")
        fmt = "PNG"
    elif kind == "rgba":
        img = Image.fromarray(np.dstack([rgb, np.zeros((h, w), np.uint8)]), "RGBA")  # fully transparent
        fmt = "PNG"
    elif kind == "16bit":
        arr = np.full((h, w), 65535 // 2, dtype=np.uint16)
        img = Image.fromarray(arr)
        fmt = "PNG"
    elif kind == "exif6":  # stored landscape, shown rotated 90 degrees (portrait)
        img = Image.fromarray(rgb)
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, "JPEG", exif=exif.tobytes())
        return buf.getvalue()
    else:
        raise ValueError(kind)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pair_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "train") -> str:
    """Shards of valid jpg+txt+cls samples with keys s{shard}_{i}; returns a brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i:03d}"
            members += [(f"{key}.jpg", image_bytes(seed=s * 100 + i, size=(16, 16))),
                        (f"{key}.txt", f"caption {s} {i}".encode()), (f"{key}.cls", str(i % 3).encode())]
        write_tar(folder / f"{prefix}-{s:06d}.tar", members)
    return str(folder / f"{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar")
