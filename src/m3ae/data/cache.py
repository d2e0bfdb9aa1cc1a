"""In-memory datasets for small images (``data.source=cache``): decode once, then train from
one uint8 array with batched augmentation on the training device.

Streaming small images spends much of a run decoding JPEGs and moving single samples through
Python (benchmarks/RESULTS.md). ``m3ae cache build SOURCE... -o DIR --image-size S`` decodes
any source once (shards, table, image folder, HDF5; bad samples are skipped and counted as
streaming does) into DIR:

- ``images.npy`` (N, S, S, 3) uint8: the centre square of each image at S px (evaluation's
  resize of the shorter side + centre crop), memory-mapped when read;
- ``labels.npy`` (N,) int64, -1 where a sample has no label;
- ``text.json`` ``{"keys": [...], "captions": [str or null, ...]}``: raw captions, so that any
  tokenizer can be used later;
- ``manifest.json``: format, image size, counts, sources, class names, what the decode skipped
  per reason, and the size of each file (a truncated file is found before it is read).

:class:`CacheLoader` serves pre-training: each epoch's order is :class:`EpochSampler`'s
permutation of ``(seed, epoch)``, rank ``r`` of ``R`` takes every R-th sample, and a batch is
gathered by index, cropped (MAE's random resized crop: scale ``data.crop_scale``, aspect
3/4-4/3) and flipped in one batched ``grid_sample`` on the training device, uint8 to float last.
Captions are tokenised once at start; a flipped sample takes its caption with left/right
swapped (tokenised once too), as the per-sample transform does. The crops and flips of a
batch are drawn on the CPU from ``(seed, epoch, rank, position)``, so a resumed run draws
what the uninterrupted one would have, on any device.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CacheInterpolation, CachePlacement, check_choice
from .decode import DataError, DataNotFound, SkipCounter
from .loader import EpochSampler, keeps_caption, process
from .sources import ImageFolderSource, open_source
from .transforms import WordSwapper, normalize_uint8, resize_center_crop_uint8
from .webdataset import ShardSource, class_names_beside

FORMAT = "m3ae-image-cache"
VERSION = 1
MANIFEST = "manifest.json"
FILES = ("images.npy", "labels.npy", "text.json")


def is_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a cache's manifest."""
    return bool(path) and (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------- building
def source_config(spec: str, kind: str | None = None, **fields):
    """The :class:`DataConfig` of one ``m3ae cache build`` source: ``kind`` (a data.source
    name), or guessed from ``spec`` (:func:`source_kind`); it must be a source of images."""
    from ..config import DataConfig

    kind = kind or source_kind(spec)
    if kind in ("cache", "mixture", "synthetic", "text"):
        raise DataError(f"a cache is built from image data: {spec!r} is {kind} data")
    return DataConfig(source=kind, urls=spec, **fields)


def source_kind(spec: str) -> str:
    """The data.source that a path given on the command line names: shards (``.tar``/
    ``.tar.gz``/brace patterns/URLs), a table (``.csv``/``.tsv``/``.jsonl``/``.parquet``),
    HDF5 (``.h5``/``.hdf5``), text (``.txt``), a cache folder (``m3ae cache build``'s) or an
    image folder."""
    first = spec.split("::")[0].lower()
    if first.endswith((".tar", ".tar.gz", ".tgz")) or "{" in first or "://" in first or first.startswith("pipe:"):
        return "webdataset"
    if first.endswith((".csv", ".tsv", ".jsonl", ".json", ".parquet")):
        return "table"
    if first.endswith((".h5", ".hdf5")):
        return "hdf5"
    if first.endswith(".txt"):
        return "text"
    if is_cache(spec):
        return "cache"
    if os.path.isdir(spec):
        return "imagefolder"
    raise DataNotFound(f"cannot tell what {spec!r} is: expected WebDataset shards (*.tar, *.tar.gz), "
                       "a table (.csv/.tsv/.jsonl/.parquet), an HDF5 file, a text file (.txt), a cache "
                       "folder or an image folder that exists; or name the kind with --source")


def _raw_samples(src):
    """(read, item) pairs of an opened source in its stored order."""
    if isinstance(src, ShardSource):
        for raw in src.items(0, 0, 1, 0):
            yield src.decode, raw
    else:
        for i in range(len(src)):
            yield src.__getitem__, i


def _class_names(src) -> list[str] | None:
    if isinstance(src, ShardSource):
        return class_names_beside(src.shards) if src.shards and os.path.exists(src.shards[0]) else None
    if isinstance(src, ImageFolderSource):
        return src.classes or None
    return None


def build_cache(sources: list, out: str | os.PathLike, image_size: int, progress: bool = True,
                limit: int | None = None) -> dict:
    """Decode ``sources`` (:class:`DataConfig` s, see :func:`source_config`) into the cache
    folder ``out``; returns its manifest. ``out`` must not exist or be empty; the folder
    appears whole or not at all. ``limit``: stop after that many images."""
    from tqdm.auto import tqdm

    from ..io import atomic_write

    out = Path(out)
    if is_cache(out):
        m = read_manifest(out)
        raise FileExistsError(f"{out} already holds a cache ({m['count']} images at {m['image_size']} px from "
                              f"{', '.join(s['urls'] for s in m['sources'])}); remove it or choose another -o")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another -o")
    if out.is_dir():
        out.rmdir()  # atomic_write puts the finished folder in its place

    opened = [open_source(c, image_size, train=False) for c in sources]  # a wrong path fails before any write
    skips = SkipCounter(" + ".join(f"{c.source} {c.urls!r}" for c in sources))
    keys: list[str] = []
    captions: list[str | None] = []
    labels: list[int] = []
    counts = []

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        bar = tqdm(desc="cache build", unit="img", disable=not progress, dynamic_ncols=True)
        with open(tmp / "images.raw", "wb") as raw_file:
            for src in opened:
                n_before = len(keys)
                for read, item in _raw_samples(src):
                    if limit is not None and len(keys) >= limit:
                        break
                    sample = process(read, item, None)
                    skips.add(sample.pop("_events", ()), seen=0 if sample.get("_marker") else 1)
                    if "_skip" in sample:
                        continue
                    if sample.get("image") is None:  # a caption alone has no place in an image cache
                        skips.add([("skip", "no_image", str(sample.get("key", "")))])
                        continue
                    img = resize_center_crop_uint8(sample["image"], image_size)
                    raw_file.write(img.permute(1, 2, 0).contiguous().numpy().tobytes())
                    keys.append(str(sample["key"]))
                    captions.append(sample.get("caption") or None)
                    labels.append(int(sample.get("label", -1)))
                    bar.update(1)
                    if bar.n % 500 == 0 and skips.num_skipped:
                        bar.set_postfix(skipped=skips.num_skipped)
                counts.append(len(keys) - n_before)
        bar.close()
        if not keys:
            raise DataError(f"no image could be read from {skips.source}: {skips.summary()}")
        shape = (len(keys), image_size, image_size, 3)
        with open(tmp / "images.npy", "wb") as f, open(tmp / "images.raw", "rb") as raw_file:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            shutil.copyfileobj(raw_file, f, 16 << 20)
        (tmp / "images.raw").unlink()
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        (tmp / "text.json").write_text(json.dumps({"keys": keys, "captions": captions}))
        manifest = {
            "format": FORMAT, "version": VERSION, "image_size": image_size, "count": len(keys),
            "with_caption": sum(c is not None for c in captions), "with_label": sum(x >= 0 for x in labels),
            "sources": [{"source": c.source, "urls": c.urls, "count": n} for c, n in zip(sources, counts)],
            "class_names": _class_names(opened[0]) if len(opened) == 1 else None,
            "decode": skips.state_dict(),
            "files": {name: (tmp / name).stat().st_size for name in FILES},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    atomic_write(out, write)
    return read_manifest(out)


# ---------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise DataNotFound(f"no cache at {path}: {file} does not exist (build one with `m3ae cache build`)")
    try:
        m = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{file} is not a readable cache manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{file} is not an m3ae image cache manifest")
    if m.get("version") != VERSION:
        raise DataError(f"{file}: cache format version {m.get('version')}, this m3ae reads {VERSION}; rebuild it")
    return m


class ImageCache:
    """A cache folder opened for reading: ``images`` (N, S, S, 3) uint8 memory map, ``labels``,
    ``keys``, ``texts`` (the captions, None where absent), ``class_names``, ``manifest``. Every
    file is checked against the manifest first: a missing, truncated or mismatched one is a one-line error naming it."""

    name = "cache"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        n, s = m["count"], m["image_size"]
        for name in FILES:
            file = self.path / name
            if not file.is_file():
                raise DataNotFound(f"cache {self.path}: {file} is missing; rebuild the cache")
            if file.stat().st_size != m["files"][name]:
                raise DataError(f"cache {self.path}: {file} has {file.stat().st_size} bytes, the manifest says "
                                f"{m['files'][name]} (truncated or replaced); rebuild the cache")
        try:
            # Copy-on-write: a writable view for torch that never writes back to the file.
            self.images = np.load(self.path / "images.npy", mmap_mode="c")
            self.labels = np.load(self.path / "labels.npy")
            text = json.loads((self.path / "text.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cache {self.path}: cannot read its files ({e}); rebuild the cache") from None
        self.keys, self.texts = text.get("keys", []), text.get("captions", [])
        if self.images.shape != (n, s, s, 3) or self.images.dtype != np.uint8:
            raise DataError(f"cache {self.path}: images.npy holds {self.images.dtype} {self.images.shape}, the "
                            f"manifest says uint8 {(n, s, s, 3)}; rebuild the cache")
        if len(self.labels) != n or len(self.keys) != n or len(self.texts) != n:
            raise DataError(f"cache {self.path}: labels.npy/text.json do not hold {n} entries; rebuild the cache")
        self.image_size = s
        self.class_names = m.get("class_names")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        """One sample as the other sources give it (image a uint8 (3, S, S) tensor)."""
        image = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return dict(key=self.keys[i], image=image, caption=self.texts[i], label=int(self.labels[i]))

    def captions(self, limit: int | None = None):
        """The captions (the protocol of the other sources: a tokenizer trains on them)."""
        return itertools.islice((c for c in self.texts if c), limit)

    def describe(self) -> str:
        m = self.manifest
        dec = SkipCounter.merged([m["decode"]], str(self.path))
        skipped = f"; its build skipped {dec.summary()}" if dec.num_skipped or dec.shards else ""
        return f"cache {self.path}: {m['count']} images at {m['image_size']} px, {m['with_caption']} with captions{skipped}"


# --------------------------------------------------------------------------- augmentation
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def crop_boxes(n: int, scale=(0.2, 1.0), hflip: float = 0.5, generator: torch.Generator | None = None,
               tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop boxes for ``n`` square images as torchvision's RandomResizedCrop
    draws them (area fraction uniform in ``scale``, log aspect ratio uniform in [3/4, 4/3],
    up to ``tries`` draws, else the whole image), in fractions of the side, and flips.
    -> (boxes (n, 4) = x0, y0, w, h; flipped (n,) bool), drawn on the CPU."""
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    ratio = torch.exp(torch.empty(n, tries).uniform_(*_LOG_RATIO, generator=generator))
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp_min(0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.ones(n))
    x0 = torch.rand(n, generator=generator) * (1 - w)
    y0 = torch.rand(n, generator=generator) * (1 - h)
    flipped = torch.rand(n, generator=generator) < hflip
    return torch.stack([x0, y0, w, h], 1), flipped


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor, size: int,
                     mode: str = "bilinear") -> torch.Tensor:
    """uint8 (B, S, S, 3) images -> float32 (B, 3, size, size) ImageNet-normalised crops, in
    one batched ``grid_sample`` on the images' device (an affine map per sample: the box, and
    a negative x scale for a flip)."""
    b, dev = images.shape[0], images.device
    x0, y0, w, h = boxes.to(dev, torch.float32).unbind(1)
    sx = torch.where(flipped.to(dev), -w, w)
    zero = torch.zeros_like(w)
    # align_corners=False: normalised -1..1 spans the image's outer pixel edges, so the box
    # [x0, x0 + w] (fractions of the side) has centre 2*x0 + w - 1 and half-width w.
    theta = torch.stack([torch.stack([sx, zero, 2 * x0 + w - 1], 1),
                         torch.stack([zero, h, 2 * y0 + h - 1], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = images.permute(0, 3, 1, 2).float()
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    if mode == "bicubic":
        out = out.clamp(0, 255)  # cubic overshoot
    return normalize_uint8(out)


# -------------------------------------------------------------------------------- loading
def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.4 * free  # the rest is the model's and its activations'


class CacheLoader:
    """Pre-training batches of an :class:`ImageCache` for one rank (see the module doc).

    The interface the trainer uses of :class:`m3ae.data.PretrainLoader`: iterating gives one
    epoch of batches (the last one smaller; with several ranks every rank gets
    ``N // world_size`` samples), ``state_dict()`` / ``load_state_dict()`` the exact position
    (the same ``kind="map"`` state as an indexable source's, so a resume with another process
    count converts it, see :class:`EpochSampler`'s ``offset``),
    ``skips`` the counts. ``placement``: ``"auto"`` keeps the images in the training GPU's
    memory when they take under 40 % of what is free there, else in (memory-mapped) host
    memory; ``"cpu"`` always the latter."""

    def __init__(self, cache: ImageCache, *, image_size: int, batch_size: int, text_tokenizer=None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 train: bool = True, crop_scale=(0.2, 1.0), hflip: float = 0.5, swap_captions: bool = True,
                 word_pairs=(("left", "right"),), paired_fraction: float = 1.0, max_skip_fraction: float = 1.0,
                 placement: str = "auto", interpolation: str = "bilinear"):
        self.cache, self.image_size, self.batch_size = cache, image_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.train, self.crop_scale, self.hflip, self.interpolation = train, tuple(crop_scale), hflip, interpolation
        self.sampler = EpochSampler(len(cache), seed, shuffle=train, rank=rank, world_size=world_size,
                                    even=train and world_size > 1)
        self.skips = SkipCounter(f"cache {str(cache.path)!r}", max_skip_fraction)
        self._read = 0
        images = torch.from_numpy(cache.images)
        check_choice("data.cache_placement", placement, CachePlacement, DataError)
        check_choice("data.cache_interpolation", interpolation, CacheInterpolation, DataError)
        self.on_device = placement == "auto" and _fits_on(self.device, images.numel())
        self.images = images.to(self.device) if self.on_device else images
        self.labels = torch.from_numpy(cache.labels)
        self._tokenise(text_tokenizer, paired_fraction, WordSwapper(word_pairs) if swap_captions else None)

    def _tokenise(self, text_tokenizer, paired_fraction: float, swap) -> None:
        """Every caption's ids and padding once, and those of its flipped version."""
        c = self.cache
        self.has_caption = torch.tensor([bool(cap) and keeps_caption(k, paired_fraction)
                                         for k, cap in zip(c.keys, c.texts)], dtype=torch.bool)
        self.ids = self.ids_flipped = None
        if text_tokenizer is None or not bool(self.has_caption.any()):
            return
        rows = self.has_caption.nonzero().squeeze(1).tolist()
        texts = [c.texts[i] for i in rows]
        n, t = len(c), text_tokenizer.text_len
        self.ids = torch.full((n, t), text_tokenizer.pad_id, dtype=torch.long)
        self.pad = torch.ones(n, t, dtype=torch.bool)
        self.ids[rows], self.pad[rows] = text_tokenizer(texts)
        self.ids_flipped, self.pad_flipped = self.ids, self.pad
        changed = [(i, s) for i, cap in zip(rows, texts) if swap is not None and (s := swap(cap)) != cap]
        if changed:
            self.ids_flipped, self.pad_flipped = self.ids.clone(), self.pad.clone()
            where = [i for i, _ in changed]
            self.ids_flipped[where], self.pad_flipped[where] = text_tokenizer([s for _, s in changed])

    # ------------------------------------------------------------------ the PretrainLoader protocol
    is_stream = False

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def state_dict(self) -> dict:
        return {"skips": self.skips.state_dict(), "world_size": self.world_size, "rank": self.rank,
                "kind": "map", "epoch": self.sampler.epoch, "position": self.sampler.start + self._read,
                "offset": self.sampler.offset}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise DataError(f"the data position was saved with world size {state['world_size']}, "
                            f"this run has {self.world_size}; resume with the same number of ranks")
        if state.get("kind") != "map":
            raise DataError("the saved data position is for a stream source, this run reads a cache")
        self.skips.load_state_dict(state["skips"])
        self.sampler.set_position(state["epoch"], state["position"], state.get("offset", 0))

    def __iter__(self):
        epoch, start = self.sampler.epoch, self.sampler.start
        mine = self.sampler.indices()
        self._read = 0
        for b0 in range(0, len(mine), self.batch_size):
            idx = mine[b0:b0 + self.batch_size]
            batch = self._batch(idx, epoch, start + b0)
            self._read = b0 + len(idx)
            self.skips.add((), seen=len(idx))
            yield batch
        self.sampler.set_position(epoch + 1, 0)
        self._read = 0

    def _batch(self, idx: torch.Tensor, epoch: int, position: int) -> dict:
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{self.rank}/{position}".encode()))
        n = len(idx)
        if self.train:
            boxes, flipped = crop_boxes(n, self.crop_scale, self.hflip, g)
        else:  # the whole (already centre-cropped) square
            boxes, flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4), torch.zeros(n, dtype=torch.bool)
        if self.on_device:
            images = self.images[idx.to(self.device, non_blocking=True)]
        else:
            images = self.images[idx]
            if self.device.type == "cuda":
                images = images.pin_memory().to(self.device, non_blocking=True)
            else:
                images = images.to(self.device)
        batch = {"key": [self.cache.keys[i] for i in idx.tolist()], "num_read": n, "data_events": [],
                 "image": crop_resize_flip(images, boxes, flipped, self.image_size, self.interpolation),
                 "image_valid": None, "label": self.labels[idx], "text": None, "text_padding_mask": None}
        # Token ids stay on the host: the step plans on them there (m3ae.training.step.plan_batch).
        if self.ids is not None and bool(self.has_caption[idx].any()):
            f = flipped.unsqueeze(1)
            batch["text"] = torch.where(f, self.ids_flipped[idx], self.ids[idx])
            batch["text_padding_mask"] = torch.where(f, self.pad_flipped[idx], self.pad[idx])
        return batch


__all__ = ["ImageCache", "CacheLoader", "build_cache", "source_config", "source_kind", "is_cache", "read_manifest",
           "crop_boxes", "crop_resize_flip"]
