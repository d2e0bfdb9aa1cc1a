"""Interoperability: official JAX checkpoints, timm, and one filter for foreign state dicts.

* :func:`load_official_checkpoint` / :func:`convert_official` -- official M3AE/MAE pickles,
  read without jax/flax and without running code from the file;
* :func:`to_timm` -- the image encoder as a timm ``VisionTransformer``;
* :func:`filter_state_dict` -- official / timm / m3ae state dicts into our names and layouts.
"""
from .filter import FORMATS, detect_format, filter_state_dict
from .official import convert_official, load_official_checkpoint
from .timm import to_timm

__all__ = ["FORMATS", "detect_format", "filter_state_dict", "convert_official",
           "load_official_checkpoint", "to_timm"]
