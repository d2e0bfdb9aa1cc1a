"""Data: sources (built-in shapes, WebDataset shards) -> transforms -> batches.

:func:`build_text_encoder` and :func:`build_pretrain_loader` turn a :class:`DataConfig` into
what the trainer consumes.
"""
from __future__ import annotations

import zlib
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..config import DataConfig
from ..tokenizer import TextEncoder, load_tokenizer, train_wordpiece
from .collate import Collator, model_inputs
from .synthetic import ShapesDataset
from .transforms import EvalTransform, PretrainTransform
from .webdataset import webdataset_source

__all__ = ["Collator", "model_inputs", "ShapesDataset", "PretrainTransform", "EvalTransform",
           "build_text_encoder", "build_dataset", "EpochSampler", "build_pretrain_loader", "keeps_caption"]


def keeps_caption(key: str, paired_fraction: float) -> bool:
    """Deterministic per key: True for about ``paired_fraction`` of all keys."""
    if paired_fraction >= 1.0:
        return True
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < paired_fraction * 10_000


def _apply_paired_fraction(sample: dict, paired_fraction: float) -> dict:
    if sample.get("caption") and not keeps_caption(sample["key"], paired_fraction):
        sample = dict(sample, caption=None)
    return sample


class _MapTransform(Dataset):
    """Applies ``fn`` to samples of ``base``. Indexed by ``(index, seed)`` from
    :class:`EpochSampler`, the random augmentation of a sample is a function of that seed
    alone, so it is the same whatever the worker count and after a resume."""

    def __init__(self, base: Dataset, fn):
        self.base, self.fn = base, fn

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if isinstance(i, tuple):
            i, seed = i
            with torch.random.fork_rng(devices=[]):
                # CPU generator only: torch.manual_seed would also queue CUDA seeding (slow).
                torch.default_generator.manual_seed(seed)
                return self.fn(self.base[i])
        return self.fn(self.base[i])


class EpochSampler(Sampler):
    """A fresh random order each epoch, drawn from ``(seed, epoch)``, that can start mid-epoch.

    Yields ``(index, augmentation seed)`` pairs. The trainer records ``(epoch, position)``
    in checkpoints and calls :meth:`set_position` on resume, so no sample is repeated or
    skipped.

    With ``world_size`` processes, every process draws the same epoch order, truncated to a
    multiple of ``world_size``, and takes every ``world_size``-th entry from ``rank`` on, so
    the processes' n-th batches together hold exactly the samples of a single process's n-th
    batch of ``world_size`` times the size. ``start`` counts this process's samples.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // self.world_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        aug = torch.randint(0, 2**62, (self.size,), generator=g)
        usable = self.size - self.size % self.world_size
        mine = order[:usable][self.rank::self.world_size]
        for i in mine[self.start:].tolist():
            yield i, int(aug[i])


def build_text_encoder(cfg: DataConfig) -> TextEncoder:
    """The configured tokenizer; for the built-in data one is trained on its captions."""
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif cfg.source == "synthetic":
        ds = ShapesDataset(cfg.synthetic_size, seed=cfg.synthetic_seed)
        tok = train_wordpiece(ds.captions(limit=2000), vocab_size=1000)
    else:
        tok = load_tokenizer("bert-base-uncased")  # only from the local cache; says how otherwise
    return TextEncoder(tok, cfg.text_len)


def _compose(*fns):
    def run(sample):
        for fn in fns:
            sample = fn(sample)
        return sample
    return run


def build_dataset(cfg: DataConfig, image_size: int, train: bool = True, seed: int = 0):
    """The configured source with its transforms applied (map-style or iterable)."""
    transform = (PretrainTransform(image_size, cfg.crop_scale, cfg.hflip, cfg.flip_swaps_left_right)
                 if train else EvalTransform(image_size))
    fn = _compose(partial(_apply_paired_fraction, paired_fraction=cfg.paired_fraction), transform)
    if cfg.source == "synthetic":
        return _MapTransform(ShapesDataset(cfg.synthetic_size, image_size, cfg.synthetic_seed), fn)
    if cfg.source == "webdataset":
        return webdataset_source(cfg.urls, shuffle_buffer=cfg.shuffle_buffer if train else 0,
                                 seed=seed, transform=fn)
    raise ValueError(f"unknown data.source {cfg.source!r}; expected 'synthetic' or 'webdataset'")


def build_pretrain_loader(cfg: DataConfig, image_size: int, text_encoder: TextEncoder,
                          batch_size: int, seed: int = 0, train: bool = True, rank: int = 0,
                          world_size: int = 1) -> DataLoader:
    """Batches for pre-training. A map-style source gets an :class:`EpochSampler`
    (``loader.sampler``) whose position the trainer saves and restores; with several
    processes it holds this ``rank``'s share. (WebDataset splits shards by node itself.)"""
    ds = build_dataset(cfg, image_size, train=train, seed=seed)
    sampler = None if isinstance(ds, IterableDataset) else EpochSampler(
        len(ds), seed, shuffle=train, rank=rank, world_size=world_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=cfg.num_workers, collate_fn=Collator(text_encoder),
                      pin_memory=torch.cuda.is_available())
