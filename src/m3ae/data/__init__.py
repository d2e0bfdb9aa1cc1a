"""Data: sources -> robust decoding -> transforms -> batches, for one or many ranks.

Sources (``data.source``): ``synthetic`` (built-in shapes), ``webdataset`` (tar shards,
local or remote), ``hdf5`` (the official M3AE layout), ``table`` (CSV/TSV/JSONL/Parquet),
``imagefolder``, ``text``, ``cache`` (small images decoded once into one uint8 array, see
:mod:`m3ae.data.cache`), and ``mixture`` (weighted combination of the others). See
``docs/data.md``.

:func:`build_text_tokenizer` and :func:`build_pretrain_loader` (:mod:`m3ae.data.builders`) turn
a :class:`DataConfig` into what the trainer consumes. The loader's resume protocol and
bad-sample accounting are described in :mod:`m3ae.data.loader`. This module only hands on names.
"""
from __future__ import annotations

import typing

from ..config import Source
from .builders import build_dataset, build_pretrain_loader, build_text_tokenizer, build_transform, source_captions
from .cache import CacheLoader, ImageCache
from .collate import Collator, model_inputs
from .decode import BadSample, DataError, DataNotFound, SkipCounter
from .loader import EpochSampler, PretrainLoader, StreamDataset, dist_info, keeps_caption
from .synthetic import ShapesDataset
from .transforms import EvalTransform, PretrainTransform

__all__ = ["Collator", "model_inputs", "ShapesDataset", "PretrainTransform", "EvalTransform",
           "build_text_tokenizer", "build_transform", "build_dataset", "EpochSampler", "build_pretrain_loader", "keeps_caption",
           "BadSample", "DataError", "DataNotFound", "SkipCounter", "PretrainLoader", "StreamDataset", "dist_info",
           "source_captions", "ImageCache", "CacheLoader"]

SOURCES = typing.get_args(Source)


def __getattr__(name: str):
    if name == "build_text_encoder":  # the first name of build_text_tokenizer
        import warnings

        warnings.warn("m3ae.data.build_text_encoder is now build_text_tokenizer", DeprecationWarning, stacklevel=2)
        return build_text_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
