"""The official M3AE weights as PyTorch ``.pth`` state dicts (encoder only).

young-geng/m3ae_public's README points to a Colab that turns the released JAX checkpoints
into ``m3ae_small/base/large.pth`` for a PyTorch re-implementation of the encoder. Its names
follow the Flax modules one to one, with PyTorch layouts (a ``Linear`` weight is (out, in),
the transpose of the Flax kernel)::

    Flax path (params["params"])                 .pth name
    cls_token                                    cls_token
    image_embedding/{kernel,bias}                image_embedding.{weight,bias}
    text_embedding/embedding                     text_embedding.weight
    encoder_{image,text}_type_embedding          encoder_{image,text}_type_embedding
    encoder/Block_N/LayerNorm_{0,1}              encoder.blocks.N.layer_norm{1,2}
    encoder/Block_N/Attention_0/Dense_{0,1}      encoder.blocks.N.attention.{qkv_linear,fc}
    encoder/Block_N/TransformerMLP_0/fc{1,2}     encoder.blocks.N.transformer_mlp.fc{1,2}
    encoder/LayerNorm_0                          encoder.layer_norm

There is no decoder, so the model built from such a file is encoder-only
(``ModelConfig.encoder_only``). The attention heads, image size and caption length are not
in the weights: the heads follow from the width for the official sizes (small, base,
large), the image size defaults to the official 256.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig

_TOP = {
    "cls_token": "cls_token",
    "image_embedding.weight": "patch_embed.weight",
    "image_embedding.bias": "patch_embed.bias",
    "text_embedding.weight": "text_embed.weight",
    "encoder_image_type_embedding": "encoder_image_type",
    "encoder_text_type_embedding": "encoder_text_type",
    "encoder.layer_norm.weight": "encoder.norm.weight",
    "encoder.layer_norm.bias": "encoder.norm.bias",
}
_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "attention.qkv_linear": "attn.qkv",
          "attention.fc": "attn.proj", "transformer_mlp.fc1": "mlp.fc1", "transformer_mlp.fc2": "mlp.fc2"}
_BLOCK_RE = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TOKENS = ("cls_token", "encoder_image_type_embedding", "encoder_text_type_embedding")
# Heads of the official sizes, by encoder width (the official model_type table).
_HEADS_BY_WIDTH = {PRESETS[n]["emb_dim"]: PRESETS[n]["num_heads"] for n in ("small", "base", "large")}
# The official code's default image size (data.image_size).
DEFAULT_IMAGE_SIZE = 256


def is_official_pth(state: dict) -> bool:
    """Whether ``state`` has the official Colab's ``.pth`` names."""
    return "image_embedding.weight" in state or any(
        isinstance(k, str) and ".attention.qkv_linear." in k for k in state)


def pth_name(name: str) -> str | None:
    """Our parameter name for a ``.pth`` name, or None if unknown."""
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK:
        return f"encoder.blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def convert_official_pth(state: dict) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict -> ours (float32). Refuses unknown names and missing tensors."""
    out, unknown = {}, []
    for name, value in state.items():
        ours = pth_name(name)
        if ours is None:
            unknown.append(name)
            continue
        t = torch.as_tensor(value).detach().to(torch.float32)
        if name in _TOKENS:
            t = t.reshape(1, 1, -1)  # (D,), (1, D) or (1, 1, D): ours is (1, 1, D)
        out[ours] = t.contiguous()
    if unknown:
        raise ValueError("not the official encoder .pth layout: unknown tensors "
                         + ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else ""))
    missing = [n for n in _TOP if n not in state]
    depth = _depth(state)
    missing += [f"encoder.blocks.{i}.{part}.{leaf}" for i in range(depth) for part in _BLOCK
                for leaf in ("weight", "bias") if f"encoder.blocks.{i}.{part}.{leaf}" not in state]
    if missing:
        hint = (" (the Colab's model registers its type embeddings only when it is built on CPU: "
                "export the .pth again from a CPU runtime)"
                if any(n.endswith("_type_embedding") for n in missing) else "")
        raise ValueError(f"the .pth lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
                         f"{hint}; refusing to build a model with those tensors left at random")
    return out


def _depth(state: dict) -> int:
    ids = {int(m.group(1)) for k in state if isinstance(k, str) and (m := _BLOCK_RE.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"encoder blocks are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def infer_pth_config(state: dict, *, image_size: int | None = None, num_heads: int | None = None,
                     max_text_len: int | None = None) -> tuple[ModelConfig, dict]:
    """An encoder-only ModelConfig from the tensor shapes; keyword arguments give what shapes
    cannot tell. Returns (config, notes)."""
    for key in ("cls_token", "image_embedding.weight", "text_embedding.weight"):
        if key not in state:
            raise ValueError(f"not the official encoder .pth layout: {key} is missing")
    emb_dim = int(state["cls_token"].shape[-1])
    patch_dim = int(state["image_embedding.weight"].shape[1])
    patch = round((patch_dim // 3) ** 0.5)
    if patch * patch * 3 != patch_dim:
        raise ValueError(f"image_embedding has {patch_dim} inputs, not p*p*3 for an RGB patch size p")
    heads = num_heads or _HEADS_BY_WIDTH.get(emb_dim)
    if not heads:
        raise ValueError(f"width {emb_dim} is not an official size (small/base/large): pass the number of "
                         "attention heads (--num-heads)")
    fc1 = state.get("encoder.blocks.0.transformer_mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / emb_dim if fc1 is not None else 4.0
    size = image_size or DEFAULT_IMAGE_SIZE
    cfg = ModelConfig(
        image_size=int(size), patch_size=patch, in_chans=3, vocab_size=int(state["text_embedding.weight"].shape[0]),
        max_text_len=int(max_text_len or 64), emb_dim=emb_dim, depth=_depth(state), num_heads=int(heads),
        mlp_ratio=float(mlp_ratio), use_type_embedding=True, ln_eps=1e-6, gelu_approximate="tanh",
        encoder_only=True)
    notes = {"kind": "pth", "image_only": False, "encoder_only": True,
             "image_size_from": "given" if image_size else f"default {DEFAULT_IMAGE_SIZE}",
             "heads_from": "given" if num_heads else "official size table"}
    return cfg, notes


def read_official_pth(path: str | Path) -> dict:
    """The state dict in a ``.pth`` (read with ``weights_only``: no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"{path} is not a readable PyTorch state dict ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model"):  # a state dict wrapped in a training checkpoint
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not is_official_pth(obj):
            obj = obj[key]
    if not isinstance(obj, dict) or not is_official_pth(obj):
        keys = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is a PyTorch file, but not an official JAX M3AE checkpoint nor the official "
                         f"Colab's M3AE .pth (image_embedding.weight, encoder.blocks.N.attention.qkv_linear.*, "
                         f"...); it holds {keys}")
    return obj


def load_official_pth(path: str | Path, **config_overrides) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Read an official ``.pth`` -> (encoder-only ModelConfig, our state dict, meta).
    ``config_overrides``: image_size, num_heads, max_text_len."""
    raw = read_official_pth(path)
    state = convert_official_pth(raw)
    cfg, notes = infer_pth_config(raw, **config_overrides)
    meta = {**notes, "source": str(path), "source_params": sum(int(v.numel()) for v in state.values()),
            "step": None, "epoch": None}
    return cfg, state, meta
