"""The image side of the M3AE encoder as a timm ``VisionTransformer`` (and back).

Differences that the conversion absorbs:

* timm embeds patches with a Conv2d (D, C, p, p) on NCHW pixels; ours is a Linear on
  patchified pixels whose inner order is (y, x, c), so the weight is reshaped to
  (D, p, p, C) and permuted to (D, C, p, p).
* timm has one learned ``pos_embed`` with a CLS slot. Ours is a fixed sin-cos table plus a
  learned image type embedding and a CLS token without a position, so timm's table is
  [0 for CLS; sin-cos + image type for every patch].
* LayerNorm eps 1e-6 and tanh GELU must be requested from timm (its defaults differ).

Only the image path exists in timm: the exported model computes
``M3AE.forward_features(image)`` (text=None). The decoder is not exported.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..ops import sincos_2d

# Encoder block parameters are named identically in both (blocks.i.{norm1,attn.qkv,...}).
_ENC = "encoder."


def timm_kwargs(config) -> dict[str, Any]:
    """JSON-serialisable keyword arguments for ``timm.models.vision_transformer.VisionTransformer``.

    Pass them through :func:`build_timm_kwargs` to get the layer factories timm needs.
    """
    return dict(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_chans,
                embed_dim=config.emb_dim, depth=config.depth, num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio, qkv_bias=True, class_token=True, global_pool="token",
                num_classes=0, ln_eps=config.ln_eps, gelu_approximate=config.gelu_approximate)


def build_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn :func:`timm_kwargs` output into real VisionTransformer arguments."""
    from torch import nn

    kw = dict(kwargs)
    eps = kw.pop("ln_eps", 1e-6)
    approx = kw.pop("gelu_approximate", "tanh")
    kw["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    kw["act_layer"] = partial(nn.GELU, approximate=approx)
    return kw


def to_timm_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our state dict -> timm VisionTransformer state dict (encoder image path only)."""
    d, p, c = config.emb_dim, config.patch_size, config.in_chans
    out = {}
    w = state["patch_embed.weight"]  # (D, p*p*C), inputs ordered (y, x, c)
    out["patch_embed.proj.weight"] = w.reshape(d, p, p, c).permute(0, 3, 1, 2).contiguous()
    out["patch_embed.proj.bias"] = state["patch_embed.bias"].clone()
    out["cls_token"] = state["cls_token"].clone()
    pos = sincos_2d(d, config.grid_size).to(w.dtype)
    if config.use_type_embedding:
        pos = pos + state["encoder_image_type"].reshape(1, d)
    out["pos_embed"] = torch.cat([pos.new_zeros(1, d), pos])[None]  # CLS has no position
    for k, v in state.items():
        if k.startswith(_ENC):
            out[k[len(_ENC):]] = v.clone()  # encoder.blocks.* -> blocks.*, encoder.norm -> norm
    return out


def from_timm_state_dict(state: dict[str, torch.Tensor], *, atol: float = 1e-4) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state dict -> our encoder's image-side keys.

    Exact only for position tables of the form [c; sin-cos + constant] (what
    :func:`to_timm_state_dict` writes, and MAE's fixed sin-cos tables): the constant becomes
    the image type embedding and timm's CLS position is folded into ``cls_token``. A learned
    position table cannot be represented by M3AE's fixed sin-cos positions and is refused.
    The classification head (``head.*``, ``fc_norm.*``) is dropped.
    """
    w = state["patch_embed.proj.weight"]  # (D, C, p, p)
    d, c, p, _ = w.shape
    out = {"patch_embed.weight": w.permute(0, 2, 3, 1).reshape(d, p * p * c).contiguous(),
           "patch_embed.bias": state["patch_embed.proj.bias"].clone()}
    pos = state["pos_embed"].reshape(-1, d)
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[0]:
        raise ValueError(f"timm pos_embed has {pos.shape[0]} rows; expected 1 CLS + a square grid")
    residual = pos[1:] - sincos_2d(d, grid).to(pos.dtype)
    type_emb = residual.mean(0)
    err = (residual - type_emb).abs().max().item()
    if err > atol:
        raise ValueError(f"timm pos_embed is not a sin-cos table plus a constant (off by {err:.3g}); "
                         "M3AE uses fixed sin-cos positions and cannot hold a learned table")
    out["encoder_image_type"] = type_emb.reshape(1, 1, d).clone()
    out["cls_token"] = (state["cls_token"].reshape(1, 1, d) + pos[0].reshape(1, 1, d)).clone()
    for k, v in state.items():
        if k.startswith(("blocks.", "norm.")):
            out[_ENC + k] = v.clone()
    return out


def to_timm(model, as_model: bool = False):
    """Export ``model``'s image encoder for timm.

    Returns (state_dict, kwargs) or, with ``as_model=True``, (a timm VisionTransformer with
    the weights loaded, in eval mode, kwargs). ``kwargs`` is JSON-serialisable (see
    :func:`build_timm_kwargs`). ``timm_model.forward_features(image)`` equals
    ``model.forward_features(image)`` for image-only input.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sd = to_timm_state_dict(state, model.config)
    kwargs = timm_kwargs(model.config)
    if not as_model:
        return sd, kwargs
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # optional extra
        raise ImportError("timm is not installed: pip install 'm3ae[timm]'") from e
    vit = VisionTransformer(**build_timm_kwargs(kwargs))
    vit.load_state_dict(sd, strict=True)
    return vit.eval(), kwargs
