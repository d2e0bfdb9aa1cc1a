"""One entry point for foreign state dicts: recognise the source format, map names and layouts.

Formats:

* ``"official"`` -- the official JAX/Flax parameter tree (nested dicts, with or without the
  ``params`` collection level, or flat '/'-joined paths), numpy or torch values;
* ``"official_pth"`` -- the official Colab's PyTorch ``.pth`` of the encoder
  (:mod:`m3ae.interop.official_pth`);
* ``"timm"`` -- a timm ``VisionTransformer`` state dict (image encoder only; see
  :mod:`m3ae.interop.timm` for what can be represented);
* ``"m3ae"`` -- our own names, possibly behind a ``module.`` (DDP) or ``_orig_mod.``
  (``torch.compile``) prefix.
"""
from __future__ import annotations

from typing import Any

import torch

FORMATS = ("official", "official_pth", "timm", "m3ae")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _flat_keys(state: dict) -> list[str]:
    keys = []
    for k, v in state.items():
        if isinstance(v, dict):
            keys += [f"{k}/{kk}" for kk in _flat_keys(v)]
        else:
            keys.append(str(k))
    return keys


def detect_format(state: dict) -> str:
    """Which of :data:`FORMATS` ``state`` is in; ValueError if none fits."""
    keys = _flat_keys(state)
    if any(k.endswith(("image_embedding/kernel", "encoder/LayerNorm_0/scale")) for k in keys):
        return "official"
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        return "timm"
    from .official_pth import is_official_pth

    if is_official_pth(state):
        return "official_pth"
    stripped = {_strip(k) for k in keys}
    if "patch_embed.weight" in stripped or any(k.startswith("encoder.blocks.") for k in stripped):
        return "m3ae"
    raise ValueError("unrecognised checkpoint format (expected an official Flax param tree, the official "
                     "Colab's .pth, a timm "
                     f"VisionTransformer or an m3ae state dict); first keys: {keys[:5]}")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def filter_state_dict(state: dict[str, Any], source: str = "auto") -> dict[str, torch.Tensor]:
    """A foreign state dict in our names and layouts (float32 torch tensors for official).

    ``source``: one of :data:`FORMATS`, or ``"auto"`` to detect it. The result may cover only
    part of the model (timm: the image encoder; an MAE: no text side): load it with
    :func:`m3ae.pretrained.load_state_dict_checked` with ``strict=False`` to see what is missing.
    """
    if source == "auto":
        source = detect_format(state)
    if source == "official":
        from .official import convert_flax_params, flax_params

        return convert_flax_params(flax_params(state))
    if source == "official_pth":
        from .official_pth import convert_official_pth

        return convert_official_pth(state)
    if source == "timm":
        from .timm import from_timm_state_dict

        return from_timm_state_dict(state)
    if source == "m3ae":
        return {_strip(k): v for k, v in state.items()}
    raise ValueError(f"unknown source format {source!r}; choose one of {FORMATS} or 'auto'")

