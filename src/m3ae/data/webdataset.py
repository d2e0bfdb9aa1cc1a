"""WebDataset tar shards (``KEY.jpg|png|webp`` + ``KEY.txt`` and/or ``KEY.json``/``KEY.cls``),
the layout img2dataset writes.

Shards can be local paths, brace patterns (``train-{000000..000099}.tar``), globs, several
of these joined by ``::``, ``pipe:COMMAND`` URLs, the schemes ``webdataset.gopen`` knows
(http(s) through curl, gs through gsutil, hf) and, when ``fsspec`` is installed, any fsspec
URL (s3://, gcs://, ...).

A :class:`ShardSource` turns an epoch and a reader slot (rank x worker) into a stream of raw,
undecoded samples: the epoch's shard order is drawn from ``(seed, epoch)``, slot ``s`` of ``n``
reads shards ``s, s+n, ...`` and passes them through a shuffle buffer seeded by
``(seed, epoch, slot)``. The stream is therefore a function of those numbers alone, which is
what lets a resumed run skip exactly the samples it has already used (without decoding them).
With ``resampled=True`` every slot instead draws shards with replacement forever, for when
there are fewer shards than readers. A tar that ends mid-member or a shard that cannot be
opened is counted once as a damaged shard (``corrupt_shard``, naming it); it is not a sample,
so it adds nothing to the samples read or skipped; the samples before the damage are kept.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from .decode import BadSample, DataError, DataNotFound, SkipCounter, clean_caption, decode_image
from .device_decode import pending_image
from .loader import StreamDataset, dist_info

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str) -> list[str]:
    """'a-{000..009}.tar::b/*.tar.gz' -> list of shard paths/URLs (brace patterns and globs)."""
    out: list[str] = []
    for part in urls.split("::"):
        part = part.strip()
        if not part:
            continue
        for u in braceexpand.braceexpand(part):
            if _is_remote(u):
                out.append(u)
            elif any(ch in u for ch in "*?["):
                out.extend(sorted(glob.glob(os.path.expanduser(u))))
            else:
                out.append(os.path.expanduser(u))
    return out


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def check_local_shards(urls: list[str], pattern: str = "") -> None:
    if not urls:
        raise DataNotFound(f"no WebDataset shards: data.urls={pattern!r} is empty or matched no file; expected "
                        "tar shards such as 'data/train-{000000..000099}.tar'")
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise DataNotFound(f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]!r} "
                        f"(from data.urls={pattern!r})")


def open_shard(url: str):
    """A readable binary stream for a local path or a URL."""
    if not _is_remote(url):
        return open(url, "rb")
    scheme = "pipe" if url.startswith("pipe:") else url.split("://", 1)[0]
    if scheme in gopen_schemes:
        return gopen(url)
    try:
        import fsspec
    except ImportError:
        raise DataError(f"cannot open {url}: scheme {scheme!r} needs fsspec (pip install fsspec s3fs/gcsfs), "
                        f"or use a pipe: URL such as 'pipe:aws s3 cp {url} -'") from None
    return fsspec.open(url, "rb").open()


def decode_shard_sample(raw: dict, min_side: int = 0, max_chars: int = 1000, fast_jpeg: bool = False,
                        defer_jpeg: bool = False) -> dict:
    """Raw tar members -> {key, image (PIL RGB, uint8 tensor with ``fast_jpeg``, a
    :class:`~m3ae.data.device_decode.PendingImage` with ``defer_jpeg``, or None), caption,
    label, _events}."""
    key = raw["__key__"]
    where = f"{os.path.basename(raw.get('__url__', ''))}:{key}"
    events: list = []
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        image = None
    elif defer_jpeg:
        image = pending_image(raw[ext], where)
    else:
        image = decode_image(raw[ext], where, min_side, fast_jpeg)
    caption = raw.get("txt")
    if caption is None and "json" in raw:  # img2dataset puts the caption in the json too
        try:
            caption = json.loads(raw["json"]).get("caption")
        except (ValueError, AttributeError):
            events.append(("fix", "bad_json", where))
    caption = clean_caption(caption, where, max_chars, events)
    label = -1
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii", errors="replace").strip())
        except ValueError:
            events.append(("fix", "bad_label", where))
    if image is None and caption is None:
        raise BadSample("no_image_or_text", where)
    # The key alone names the sample (it decides paired_fraction); messages also name the shard.
    return dict(key=key, image=image, caption=caption, label=label, _events=events)


def buffer_shuffle(items: Iterator, size: int, initial: int, rng: random.Random) -> Iterator:
    """``items`` shuffled through a buffer of ``size``: once it holds ``initial`` items, each step
    takes in the next item (two while the buffer fills) and gives out a random buffered one; the
    rest come out in random order at the end. The order is a function of the items and ``rng``
    alone, so a resumed run can replay it. It makes the same draws as webdataset 1.0's shuffle,
    which earlier versions called, so a seed gives the order it gave then."""
    items, buf = iter(items), []
    initial = min(initial, size)

    def pick():
        k = rng.randint(0, len(buf) - 1)
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    for item in items:
        buf.append(item)
        if len(buf) < size:  # fill two per step until the buffer is full
            buf.extend(itertools.islice(items, 1))
        if len(buf) >= initial:
            yield pick()
    while buf:
        yield pick()


def _shard_marker(url: str, error: Exception) -> dict:
    """The one item that stands for a damaged shard (webdataset may report a cut tar more
    than once; it is one damaged shard all the same)."""
    return {"__skip__": "corrupt_shard", "__key__": url, "__detail__": str(error)}


class ShardSource:
    """Raw samples of WebDataset shards for one reader slot; see the module docstring."""

    name = "webdataset"

    def __init__(self, urls: str | list[str], *, shuffle_buffer: int = 0, shuffle_shards: bool = True,
                 resampled: bool = False, min_side: int = 0, max_chars: int = 1000, fast_jpeg: bool = False,
                 defer_jpeg: bool = False):
        self.pattern = urls if isinstance(urls, str) else "::".join(urls)
        self.shards = expand_urls(urls) if isinstance(urls, str) else list(urls)
        check_local_shards(self.shards, self.pattern)
        self.name = f"webdataset {self.pattern!r}"
        self.shuffle_buffer, self.shuffle_shards, self.resampled = shuffle_buffer, shuffle_shards, resampled
        self.min_side, self.max_chars, self.fast_jpeg = min_side, max_chars, fast_jpeg
        self.defer_jpeg = defer_jpeg  # data.decode_device: the batch is decoded on the device

    def check_readers(self, readers: int) -> None:
        """Fail early when some of ``readers`` slots would get no shard at all."""
        if not self.resampled and len(self.shards) < readers:
            raise DataError(f"{len(self.shards)} shard(s) for {readers} readers (ranks x data-loader workers): "
                            "some would read nothing. Use data.resample=true, fewer workers, or more shards")

    def _shard_order(self, epoch: int, slot: int, nslots: int, seed: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(f"{seed}/{epoch}/{slot}/resample")
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{seed}/{epoch}/shards").shuffle(order)
        yield from order[slot::nslots]

    def _raw(self, shards: Iterator[str]) -> Iterator[dict]:
        errors: list = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True

        for url in shards:
            try:
                stream = open_shard(url)
            except (OSError, DataError) as e:
                yield _shard_marker(url, e)
                continue
            damaged = False
            with stream:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
                for sample in group_by_keys(files, handler=handler):
                    yield sample
                    if errors and not damaged:
                        damaged = True
                        yield _shard_marker(url, errors[0])
                    errors.clear()
            if errors and not damaged:
                yield _shard_marker(url, errors[0])
            errors.clear()

    def items(self, epoch: int, slot: int, nslots: int, seed: int) -> Iterator[dict]:
        """Raw samples (undecoded tar members) of this slot's share of epoch ``epoch``."""
        raw = self._raw(self._shard_order(epoch, slot, nslots, seed))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{seed}/{epoch}/{slot}/buffer")
            raw = buffer_shuffle(raw, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)
        return raw

    def decode(self, raw: dict) -> dict:
        if "__skip__" in raw:
            raise BadSample(raw["__skip__"], raw["__key__"], raw.get("__detail__", ""), sample=False)
        return decode_shard_sample(raw, self.min_side, self.max_chars, self.fast_jpeg, self.defer_jpeg)

    def has_captions(self, scan: int = 200) -> bool:
        """Whether any of the first ``scan`` samples has a caption (``.txt`` or ``.json``);
        nothing is decoded."""
        return any("txt" in r or "json" in r for r in itertools.islice(self._raw(iter(self.shards)), scan))

    def captions(self, limit: int | None = None) -> Iterator[str]:
        """Captions only, in shard order (to train a tokenizer); images are not decoded."""
        n = 0
        for raw in self._raw(iter(self.shards)):
            if "__skip__" in raw:
                continue
            cap = raw.get("txt")
            cap = clean_caption(cap, "", self.max_chars, []) if cap is not None else None
            if cap:
                yield cap
                n += 1
                if limit is not None and n >= limit:
                    return


def class_names_beside(shards: list[str]) -> list[str] | None:
    """Class names from a ``classes.txt`` (one per line) or ``classes.tsv`` (index, id, name)
    beside the first shard, or None."""
    folder = Path(shards[0]).parent
    if (folder / "classes.txt").is_file():
        return [line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip()]
    if (folder / "classes.tsv").is_file():
        rows = [line.split("\t") for line in (folder / "classes.tsv").read_text().splitlines() if line.strip()]
        return [r[-1].strip() for r in sorted(rows, key=lambda r: int(r[0]))]
    return None


def webdataset_source(urls: str | list[str], *, shuffle_buffer: int = 0, seed: int = 0, resampled: bool = False,
                      transform=None, min_side: int = 0, max_caption_chars: int = 1000):
    """Decoded (and transformed) samples of shards as an IterableDataset, for code that builds
    its own DataLoader (evaluation). Shards are split over ranks and workers; bad samples are
    counted in ``.skips`` of the returned dataset (in the process that reads them) and left out."""
    rank, world_size = dist_info()
    src = ShardSource(urls, shuffle_buffer=shuffle_buffer, shuffle_shards=shuffle_buffer > 0,
                      resampled=resampled, min_side=min_side, max_chars=max_caption_chars)
    return StreamDataset([(src, transform, 1.0)], seed=seed, rank=rank, world_size=world_size,
                         drop_skipped=SkipCounter(src.name))
