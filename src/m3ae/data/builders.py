"""From a :class:`DataConfig` to what the trainer consumes: the configured dataset
(:func:`build_dataset`, one source or a mixture, with its transforms), the tokenizer
(:func:`build_text_tokenizer`) and the loader (:func:`build_pretrain_loader`); also the
captions of a source (:func:`source_captions`, what a tokenizer is trained on)."""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch

from ..config import DataConfig
from ..tokenizer import SPECIAL_TOKENS, TextTokenizer, from_vocab, load_tokenizer, train_wordpiece
from .cache import CacheLoader, ImageCache
from .collate import Collator
from .decode import DataError, SkipCounter
from .device_decode import DeferredPretrainTransform, DeviceDecoder, check_decode_device
from .loader import EpochSampler, IndexedStream, MapDataset, PretrainLoader, StreamDataset, dist_info, keeps_caption
from .sources import open_source
from .synthetic import ShapesDataset
from .synthetic import vocabulary as synthetic_vocabulary
from .transforms import EvalTransform, PretrainTransform
from .webdataset import ShardSource


def _apply_paired_fraction(sample: dict, paired_fraction: float) -> dict:
    if sample.get("caption") and sample.get("image") is not None and not keeps_caption(sample["key"], paired_fraction):
        sample = dict(sample, caption=None)
    return sample


def _compose(*fns):
    def run(sample):
        for fn in fns:
            sample = fn(sample)
        return sample
    return run


def _entries(cfg: DataConfig) -> list[DataConfig]:
    """The configs of a mixture's entries (each inherits the unset fields), or [cfg]."""
    if cfg.source != "mixture":
        return [cfg]
    if not cfg.mixture:
        raise DataError("data.source=mixture needs data.mixture, a list of entries such as "
                        "[{source: webdataset, urls: 'a-{0..9}.tar', weight: 3}, {source: text, urls: t.txt}]")
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mixture", "source", "urls", "weight")}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    out = []
    for i, entry in enumerate(cfg.mixture):
        if not isinstance(entry, dict) or "source" not in entry:
            raise DataError(f"data.mixture[{i}] must be a mapping with at least 'source' and 'urls', got {entry!r}")
        unknown = set(entry) - known
        if unknown:
            raise DataError(f"data.mixture[{i}] has unknown field(s) {sorted(unknown)}")
        if entry["source"] in ("mixture", "synthetic", "cache"):
            raise DataError(f"data.mixture[{i}]: source {entry['source']!r} cannot be a mixture entry")
        out.append(DataConfig(**{**base, **entry}))
    return out


def _open(cfg: DataConfig, min_side: int, train: bool):
    """The raw source of one (non-mixture) config: a map-style dataset, a ShardSource or an
    ImageCache."""
    if cfg.source == "cache":
        return ImageCache(cfg.urls)
    return open_source(cfg, min_side, train, defer_jpeg=_on_device(cfg, train))


def _on_device(cfg: DataConfig, train: bool) -> bool:
    """Whether this pre-training source's JPEGs are decoded on ``data.decode_device`` (checked
    here, so that a machine without CUDA says so before anything is read)."""
    if cfg.decode_device == "cpu" or not train:
        return False
    check_decode_device(cfg.decode_device)
    if cfg.source != "webdataset":
        raise DataError(f"data.decode_device={cfg.decode_device} applies to data.source=webdataset only, "
                        f"not {cfg.source}; use data.decode_device=cpu")
    return True


def _min_side(cfg: DataConfig, image_size: int, train: bool) -> int:
    """Smallest shorter side that loses no detail: the smallest random crop (crop_scale[0] of
    the area) must still hold image_size pixels across."""
    if not cfg.reduced_decode:
        return 0
    return math.ceil(image_size / math.sqrt(cfg.crop_scale[0])) if train else image_size


def build_transform(cfg: DataConfig, image_size: int, train: bool = True):
    """The per-sample image transform the configured loader applies."""
    if _on_device(cfg, train):
        return DeferredPretrainTransform(image_size, cfg.crop_scale, cfg.hflip, cfg.flip_swaps_left_right,
                                         cfg.flip_word_pairs, backend=cfg.image_backend)
    if train:
        return PretrainTransform(image_size, cfg.crop_scale, cfg.hflip, cfg.flip_swaps_left_right,
                                 cfg.flip_word_pairs, backend=cfg.image_backend)
    return EvalTransform(image_size, backend=cfg.image_backend)


def build_dataset(cfg: DataConfig, image_size: int, train: bool = True, seed: int = 0, *,
                  rank: int | None = None, world_size: int | None = None, batch_size: int | None = None):
    """The configured source with its transforms applied: a map-style :class:`MapDataset`
    (index it with ``(index, seed)`` from :class:`EpochSampler`, or a plain index) or an
    iterable :class:`StreamDataset` (shards, mixtures). ``batch_size`` is needed for a
    mixture with ``mixture_mode=batch``. A cache (``data.source=cache``) is returned opened,
    as an :class:`ImageCache`: its loader augments whole batches, not single samples."""
    if cfg.source == "cache":
        return ImageCache(cfg.urls)
    rank, world_size = dist_info(rank, world_size)
    transform = build_transform(cfg, image_size, train)
    if cfg.source == "synthetic":
        fn = _compose(partial(_apply_paired_fraction, paired_fraction=cfg.paired_fraction), transform)
        return MapDataset(ShapesDataset(cfg.synthetic_size, image_size, cfg.synthetic_seed), fn)
    min_side = _min_side(cfg, image_size, train)
    entries = _entries(cfg)
    components = []
    for e in entries:
        src = _open(e, min_side, train)
        fn = _compose(partial(_apply_paired_fraction, paired_fraction=e.paired_fraction), transform)
        if cfg.source != "mixture" and not isinstance(src, ShardSource):
            return MapDataset(src, fn)
        stream = src if isinstance(src, ShardSource) else IndexedStream(src, shuffle=train)
        if e.weight <= 0:
            raise DataError(f"mixture entry {e.source} {e.urls!r} has weight {e.weight}; weights must be > 0")
        components.append((stream, fn, e.weight))
    if cfg.source == "mixture" and cfg.mixture_mode == "batch" and not batch_size:
        raise DataError("data.mixture_mode=batch needs the batch size (build_dataset(..., batch_size=B))")
    return StreamDataset(components, seed=seed, rank=rank, world_size=world_size, mode=cfg.mixture_mode,
                         batch_size=batch_size or 1)


def source_captions(cfg: DataConfig, limit: int = 20000):
    """Up to ``limit`` captions of the configured source(s), without decoding images."""
    n = 0
    for e in _entries(cfg):
        if e.source == "synthetic":
            src = ShapesDataset(e.synthetic_size, seed=e.synthetic_seed)
        else:
            src = _open(e, 0, train=False)
        for c in src.captions(limit=limit - n):
            yield c
            n += 1
        if n >= limit:
            return


def has_captions(cfg: DataConfig, scan: int = 200) -> bool:
    """Whether the configured source(s) hold any caption; shards are judged by their first
    ``scan`` samples (an image-only set such as CIFAR-10 in shards has none)."""
    for e in _entries(cfg):
        if e.source == "synthetic":
            return True
        src = _open(e, 0, train=False)
        if isinstance(src, ShardSource):
            if src.has_captions(scan):
                return True
        elif next(iter(src.captions(limit=1)), None) is not None:
            return True
    return False


def build_text_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The configured tokenizer (nothing is downloaded). The built-in data has a fixed
    vocabulary; ``tokenizer=from-data`` trains WordPiece on the source's captions. Data
    without any caption (image-only pre-training, i.e. MAE) needs no tokenizer: unless one
    is named, it gets a vocabulary of the special tokens alone."""
    if cfg.tokenizer in ("", "from-data") and cfg.source != "synthetic" and not has_captions(cfg):
        tok = from_vocab(list(SPECIAL_TOKENS))
    elif cfg.tokenizer == "from-data":
        caps = list(source_captions(cfg))
        if not caps:
            raise DataError(f"data.tokenizer=from-data: data source {cfg.source} {cfg.urls!r} has no captions "
                            "to train a tokenizer on; pass data.tokenizer=PATH")
        tok = train_wordpiece(caps, vocab_size=cfg.tokenizer_vocab_size, cased=cfg.tokenizer_cased,
                              keep_accents=cfg.tokenizer_keep_accents)
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif cfg.source == "synthetic":
        # The built-in captions use a closed set of words: a fixed vocabulary, no training.
        tok = from_vocab(SPECIAL_TOKENS + synthetic_vocabulary())
    else:
        tok = load_tokenizer("bert-base-uncased")  # only from the local cache; says how otherwise
    return TextTokenizer(tok, cfg.text_len)


def build_pretrain_loader(cfg: DataConfig, image_size: int, text_tokenizer: TextTokenizer, batch_size: int,
                          seed: int = 0, train: bool = True, *, rank: int | None = None,
                          world_size: int | None = None, dataset=None,
                          device: torch.device | str = "cpu") -> PretrainLoader | CacheLoader:
    """Batches for pre-training on this rank (rank/world size default to torch.distributed's).

    A map-style source gets an :class:`EpochSampler` (``loader.sampler``) whose position the
    trainer saves and restores; every source supports ``loader.state_dict()`` /
    ``loader.load_state_dict()``. Skips are counted in ``loader.skips``. ``dataset``: the
    result of :func:`build_dataset` with the same arguments, when the caller built it already.
    ``device``: where a cache's batches are augmented (the training device); other sources
    give host tensors, pinned when a GPU is present.
    """
    rank, world_size = dist_info(rank, world_size)
    ds = dataset if dataset is not None else build_dataset(cfg, image_size, train=train, seed=seed, rank=rank,
                                                           world_size=world_size, batch_size=batch_size)
    if isinstance(ds, ImageCache):
        return CacheLoader(ds, image_size=image_size, batch_size=batch_size, text_tokenizer=text_tokenizer, seed=seed,
                           rank=rank, world_size=world_size, device=device, train=train,
                           crop_scale=cfg.crop_scale, hflip=cfg.hflip, swap_captions=cfg.flip_swaps_left_right,
                           word_pairs=cfg.flip_word_pairs, paired_fraction=cfg.paired_fraction,
                           max_skip_fraction=cfg.max_skip_fraction, placement=cfg.cache_placement,
                           interpolation=cfg.cache_interpolation)
    workers = cfg.num_workers
    sampler = None
    if isinstance(ds, StreamDataset):
        for stream, _, _ in ds.components:
            if isinstance(stream, ShardSource):
                stream.check_readers(world_size * max(workers, 1))
    else:
        # Training on several ranks: equal shares, so that no rank waits for another.
        sampler = EpochSampler(len(ds), seed, shuffle=train, rank=rank, world_size=world_size,
                               even=train and world_size > 1)
    name = ds.name if isinstance(ds, StreamDataset) else f"{cfg.source} {cfg.urls!r}".strip()
    skips = SkipCounter(name, cfg.max_skip_fraction)
    extra = {}
    if workers > 0:
        extra = dict(prefetch_factor=cfg.prefetch_factor,
                     # Streams are re-sent to the workers each epoch with their new epoch and
                     # resume position; an indexable source's order lives in the main process.
                     persistent_workers=sampler is not None)
    # Every sample is read once per epoch: the last, smaller batch is kept rather than dropped.
    decoder = DeviceDecoder(image_size, check_decode_device(cfg.decode_device)) if _on_device(cfg, train) else None
    return PretrainLoader(ds, skips=skips, rank=rank, world_size=world_size, batch_size=batch_size,
                          device_decoder=decoder,
                          sampler=sampler, drop_last=False, num_workers=workers,
                          collate_fn=Collator(text_tokenizer), pin_memory=torch.cuda.is_available(), **extra)
