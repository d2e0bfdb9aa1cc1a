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


WORDS = ["red", "green", "blue", "small", "large", "circle", "square", "triangle", "left", "right", "top",
         "bottom", "of", "a", "the", "picture", "photo", "near", "corner", "bright", "dark"]


def varied_caption(n: int) -> str:
    """The n-th of many different captions of 5 to 8 words (enough words and ties between
    merges for a tokenizer trained on them to show any dependence on the process)."""
    return " ".join(WORDS[(n * k + k * k) % len(WORDS)] for k in range(1, 6 + n % 4))


def pair_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "train", varied: bool = False) -> str:
    """Shards of valid jpg+txt+cls samples with keys s{shard}_{i}, captioned "caption {shard}
    {i}" (``varied``: :func:`varied_caption`); returns a brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i:03d}"
            text = varied_caption(s * per_shard + i) if varied else f"caption {s} {i}"
            members += [(f"{key}.jpg", image_bytes(seed=s * 100 + i, size=(16, 16))),
                        (f"{key}.txt", text.encode()), (f"{key}.cls", str(i % 3).encode())]
        write_tar(folder / f"{prefix}-{s:06d}.tar", members)
    return str(folder / f"{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar")


def hostile_table(folder: Path, n: int = 24) -> Path:
    """A CSV of ``n`` rows: two bad images, one empty file, one missing file, one truncated
    JPEG, and odd captions (whitespace only, 100 kB, tabs and newlines)."""
    import csv

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        data = image_bytes(seed=i, size=(24, 20))
        data = {2: b"not an image", 5: b"GIF89a junk", 7: b"", 9: data[: len(data) // 3]}.get(i, data)
        if i != 11:  # row 11 names a file that does not exist
            (folder / "img" / f"{i:03d}.jpg").write_bytes(data)
        caption = {3: "   ", 4: "word " * 20_000, 6: "tab\tand\nnewline"}.get(i, f"a red circle {i}")
        rows.append((f"img/{i:03d}.jpg", caption))
    path = folder / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def hostile_shards(folder: Path) -> str:
    """Two shards: ``bad-000000.tar`` (12 samples: two bad images, an empty image, a non-UTF-8
    caption, one sample with neither image nor text) and ``cut-000000.tar``, a 12-sample shard
    cut in the middle of a member. Returns ``data.urls`` for both."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i in range(12):
        key = f"a{i:03d}"
        if i == 7:
            members.append((f"{key}.json", b"{}"))  # neither image nor caption
            continue
        img = {3: b"garbage", 4: b"junk!", 5: b""}.get(i, image_bytes(seed=100 + i, size=(16, 16)))
        txt = b"caf\xe9 \xff" if i == 6 else f"caption {i}".encode()
        members += [(f"{key}.jpg", img), (f"{key}.txt", txt)]
    write_tar(folder / "bad-000000.tar", members)
    full = write_tar(folder / "full.tar", [m for i in range(12) for m in (
        (f"b{i:03d}.jpg", image_bytes(seed=200 + i, size=(16, 16))), (f"b{i:03d}.txt", f"cut {i}".encode()))])
    with tarfile.open(full) as tar:
        cut_at = tar.getmembers()[12].offset_data + 50  # inside b006.jpg: b000..b005 survive
    raw = full.read_bytes()
    full.unlink()
    (folder / "cut-000000.tar").write_bytes(raw[:cut_at])
    return f"{folder}/bad-000000.tar::{folder}/cut-000000.tar"
