"""Labelled data for evaluation, named by one string (a *data spec*):

- ``shapes`` or ``shapes:N`` or ``shapes:N:SEED`` -- the built-in shapes (4 classes). Use
  different seeds for a train and an evaluation split (``shapes:2000:0``, ``shapes:500:1``).
- a folder of class sub-folders (``root/CLASS/xxx.jpg``, images at any depth below a class
  folder), classes in sorted order as torchvision's ``ImageFolder`` numbers them; an optional
  ``xxx.txt`` beside an image is its caption; a folder without class sub-folders gives
  unlabelled images;
- WebDataset shards with ``.cls`` labels (brace patterns/globs, several joined by ``::``);
  class names come from a ``classes.txt`` (one per line) or ``classes.tsv`` (index, id,
  name) beside the shards when there is one;
- a cache folder (``m3ae cache build``): its images are already decoded and centre-cropped,
  so reading them is a copy (class names as recorded when it was built).

Everything goes through :mod:`m3ae.data` (its sources, transforms and :class:`Collator`), so
evaluation sees images exactly as pre-training's evaluation path does.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import Collator, EvalTransform, PretrainTransform, ShapesDataset, SkipCounter
from ..data.cache import ImageCache, is_cache
from ..data.loader import EpochSampler, MapDataset, PretrainLoader
from ..data.sources import ImageFolderSource
from ..data.webdataset import class_names_beside, expand_urls, webdataset_source


@dataclass
class LabelledData:
    dataset: Dataset | IterableDataset  # samples: dict(key, image tensor, caption, label)
    class_names: list[str] | None
    fingerprint: str  # changes when the data (or how it is read) changes; for feature caches
    name: str = ""  # the data spec, for messages about skipped samples


class _Prefix(IterableDataset):
    """The first ``n`` samples of an iterable dataset (shards are shuffled at build time, so a
    prefix is a fair sample)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __iter__(self):
        return itertools.islice(iter(self.ds), self.n)

    def __len__(self) -> int:  # an upper bound: the shards may hold fewer
        return self.n


def _samples_in(shard: str) -> int:
    """Number of samples (distinct keys) in one tar shard, read without decoding anything."""
    import tarfile

    keys = set()
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.split("/")[-1].split(".")[0])
    except (OSError, tarfile.TarError):
        pass
    return len(keys)


def data_name(spec: str) -> str:
    """A short name for a data spec, for titles: 'cifar10/test' for '.../cifar10/test-*.tar.gz'."""
    if spec == "shapes" or spec.startswith("shapes:"):
        return "shapes"
    first = spec.split("::")[0].rstrip("/")
    path = Path(first)
    if os.path.isdir(first):
        return path.name
    stem = path.name.split(".")[0].split("{")[0].split("*")[0].rstrip("-_")
    return f"{path.parent.name}/{stem}" if path.parent.name else stem or path.name


def _file_stamp(paths) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _image_folder(root: str, transform, limit: int | None, tag: str) -> LabelledData:
    """An image folder read as pre-training reads one (:class:`m3ae.data.sources.ImageFolderSource`:
    every image suffix, any depth, robust decoding; an unreadable image is counted and skipped by
    :func:`make_loader`), with the optional ``xxx.txt`` captions beside the images."""
    src = ImageFolderSource(root)
    base: Dataset = src
    if limit is not None and limit < len(src):
        # A folder is ordered by class: take an even stride, not the first classes only.
        base = torch.utils.data.Subset(src, torch.linspace(0, len(src) - 1, limit).round().long().tolist())
    ds = MapDataset(base, transform)  # outermost, so a shuffling EpochSampler can seed each sample
    return LabelledData(ds, src.classes or None, f"{tag}|imagefolder|{_file_stamp(src.files)}", root)


def _cache(path: str, transform, limit: int | None, tag: str) -> LabelledData:
    """A cache folder: its samples through the same transform as any other source (the
    stored squares are resized when the model's image size differs). ``limit`` keeps the
    first samples (a cache keeps its sources' order; shards are shuffled at build time)."""
    cache = ImageCache(path)
    base: Dataset = cache
    if limit is not None and limit < len(cache):
        base = torch.utils.data.Subset(cache, range(limit))
    ds = MapDataset(base, transform)  # outermost, so a shuffling EpochSampler can seed each sample
    files = [Path(path) / name for name in ("manifest.json", "images.npy")]
    return LabelledData(ds, cache.class_names, f"{tag}|cache|{_file_stamp(files)}", path)


class RandAugmented:
    """:class:`PretrainTransform` (crop + flip) with torchvision's ``RandAugment`` applied to
    the crop before normalisation, as in MAE's and the official fine-tuning."""

    def __init__(self, base: PretrainTransform, num_ops: int = 2, magnitude: int = 9):
        from torchvision.transforms import v2

        self.base = base
        self.randaug = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:
            return sample
        image, flipped = self.base.augment(sample["image"])
        if flipped and self.base.swap_captions and sample.get("caption"):
            sample["caption"] = self.base.swap_words(sample["caption"])
        sample["image"] = self.base.finish(self.randaug(image))
        return sample


def load_labelled(spec: str, image_size: int, *, train: bool = False, limit: int | None = None,
                  crop_scale=(0.08, 1.0), randaug: tuple[int, int] | None = None) -> LabelledData:
    """A labelled dataset from a data spec (see the module doc).

    ``train=True`` applies the usual fine-tuning augmentation (random resized crop with
    ``crop_scale``, horizontal flip, and with ``randaug=(num_ops, magnitude)`` RandAugment);
    otherwise resize + centre crop. ``limit`` keeps the first ``limit`` samples.
    """
    transform = (PretrainTransform(image_size, crop_scale, hflip=0.5, swap_captions=True) if train
                 else EvalTransform(image_size))
    if train and randaug and randaug[0] > 0:
        transform = RandAugmented(transform, *randaug)
    tag = f"{spec}|{image_size}|{train}|{limit}" + (f"|randaug{tuple(randaug)}" if train and randaug else "")
    if spec == "shapes" or spec.startswith("shapes:"):
        parts = spec.split(":")[1:]
        try:
            size = int(parts[0]) if parts else 1000
            seed = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            raise ValueError(f"bad shapes spec {spec!r}; expected shapes, shapes:N or shapes:N:SEED") from None
        ds = ShapesDataset(size if limit is None else min(size, limit), image_size, seed, transform=transform)
        return LabelledData(ds, list(ShapesDataset.class_names), tag, spec)
    if is_cache(spec):
        return _cache(spec, transform, limit, tag)
    if os.path.isdir(spec):
        return _image_folder(spec, transform, limit, tag)
    shards = expand_urls(spec)
    if not shards or not any(u.endswith((".tar", ".tar.gz", ".tgz")) or "://" in u for u in shards):
        raise FileNotFoundError(f"data {spec!r} is neither 'shapes[:N[:SEED]]', an image folder, "
                                "nor WebDataset shards (*.tar / *.tar.gz) that exist")
    # Fine-tuning reads shards through a shuffle buffer; evaluation in shard order.
    ds = webdataset_source(shards, transform=transform, shuffle_buffer=1000 if train else 0)
    local = [u for u in shards if os.path.exists(u)]
    if limit is not None:
        ds = _Prefix(ds, limit)
    elif local:
        ds.approx_len = _samples_in(local[0]) * len(shards)  # for progress bars: shards are alike in size
    return LabelledData(ds, class_names_beside(shards), tag + "|" + _file_stamp(local), spec)


def make_loader(data: LabelledData, text_tokenizer=None, batch_size: int = 128, shuffle: bool = False,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """Batches (see :class:`m3ae.data.Collator`); captions are tokenised when given a text encoder.

    Samples that cannot be read are left out and counted (``loader.skips`` for an indexable
    source, ``data.dataset.skips`` for shards), as in pre-training."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(batch_size=batch_size, generator=g, num_workers=num_workers, collate_fn=Collator(text_tokenizer))
    if isinstance(data.dataset, IterableDataset):  # shards count their own skips
        return DataLoader(data.dataset, **kw)
    if shuffle and isinstance(data.dataset, MapDataset):
        # Pre-training's sampler: the order and each sample's augmentation come from (seed,
        # epoch, position), so a fine-tuning run can save its position and resume exactly.
        kw["sampler"] = EpochSampler(len(data.dataset), seed)
        shuffle = False
    return PretrainLoader(data.dataset, skips=SkipCounter(data.name or "evaluation data"), shuffle=shuffle, **kw)
