"""WebDataset tar shards (``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.cls``), as img2dataset writes.

Shards are split across DDP ranks and data-loader workers by ``webdataset``; samples that
cannot be decoded are skipped with a warning rather than stopping the run.
"""
from __future__ import annotations

import glob
import io
import os

import braceexpand
import webdataset as wds
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str) -> list[str]:
    """'a-{000..009}.tar::b/*.tar.gz' -> list of shard paths/URLs (brace patterns and globs)."""
    out: list[str] = []
    for part in urls.split("::"):
        part = part.strip()
        if not part:
            continue
        for u in braceexpand.braceexpand(part):
            if "://" in u or u.startswith("pipe:"):
                out.append(u)
            elif any(ch in u for ch in "*?["):
                out.extend(sorted(glob.glob(u)))
            else:
                out.append(u)
    return out


def check_local_shards(urls: list[str]) -> None:
    if not urls:
        raise FileNotFoundError("no WebDataset shards given (data.urls is empty or matched no file)")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]!r}")


def decode_sample(raw: dict) -> dict:
    """Raw tar members -> {key, image (PIL RGB or None), caption (str or None), label (int)}."""
    image = None
    for ext in IMAGE_EXTS:
        if ext in raw:
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
            image = image.convert("RGB")
            break
    caption = raw.get("txt")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    label = raw.get("cls")
    label = int(label.decode() if isinstance(label, bytes) else label) if label is not None else -1
    return dict(key=raw["__key__"], image=image, caption=caption.strip() if caption else None, label=label)


def webdataset_source(urls: str | list[str], *, shuffle_buffer: int = 0, seed: int = 0,
                      resampled: bool = False, transform=None) -> wds.WebDataset:
    shards = expand_urls(urls) if isinstance(urls, str) else list(urls)
    check_local_shards(shards)
    ds = wds.WebDataset(shards, resampled=resampled, shardshuffle=(100 if shuffle_buffer else False),
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        handler=wds.warn_and_continue, seed=seed, empty_check=False)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer)
    ds = ds.map(decode_sample, handler=wds.warn_and_continue)
    if transform is not None:
        ds = ds.map(transform, handler=wds.warn_and_continue)
    return ds
