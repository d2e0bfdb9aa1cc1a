"""Checkpoints of the official JAX code (young-geng/m3ae_public): M3AE and its image-only MAE.

The official training scripts pickle ``{"step", "epoch", "variant", "state"}`` where
``state`` is a Flax train state whose ``params["params"]`` holds the weights as a nested
dict and ``variant`` is the flat dict of run flags. We read that file with
:mod:`m3ae.interop.safe_pickle` (no jax/flax/optax needed, nothing from the file is run),
infer the architecture from the parameter shapes plus the few numbers shapes cannot tell
(attention heads, image size, mask ratios), and map names and layouts onto :class:`m3ae.M3AE`.

Layouts: a Flax ``Dense`` kernel is (in, out), a torch ``Linear`` weight (out, in), so every
kernel is transposed; LayerNorm ``scale`` is torch's ``weight``. Token tables
(cls/type/mask, (1, 1, D)) and the text embedding table need no change.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PRESETS, ModelConfig
from .safe_pickle import Inert, safe_load

# Flax path (inside params["params"], '/'-joined) -> our name, for the non-repeated parts.
_TOP = {
    "cls_token": "cls_token",
    "image_embedding/kernel": "patch_embed.weight",
    "image_embedding/bias": "patch_embed.bias",
    "text_embedding/embedding": "text_embed.weight",
    "encoder_image_type_embedding": "encoder_image_type",
    "encoder_text_type_embedding": "encoder_text_type",
    "decoder_image_type_embedding": "decoder_image_type",
    "decoder_text_type_embedding": "decoder_text_type",
    "image_mask_embedding": "image_mask_token",
    "text_mask_embedding": "text_mask_token",
    "decoder_input_projection/kernel": "decoder_embed.weight",
    "decoder_input_projection/bias": "decoder_embed.bias",
    "decoder_image_output/Dense_0/kernel": "image_head.weight",
    "decoder_image_output/Dense_0/bias": "image_head.bias",
    "decoder_text_output/Dense_0/kernel": "text_head.weight",
    "decoder_text_output/Dense_0/bias": "text_head.bias",
}
_BLOCK_PARTS = {
    "LayerNorm_0": "norm1", "LayerNorm_1": "norm2",
    "Attention_0/Dense_0": "attn.qkv", "Attention_0/Dense_1": "attn.proj",
    "TransformerMLP_0/fc1": "mlp.fc1", "TransformerMLP_0/fc2": "mlp.fc2",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK_RE = re.compile(r"^(encoder|decoder)/Block_(\d+)/(.+)/(kernel|scale|bias)$")
_NORM_RE = re.compile(r"^(encoder|decoder)/LayerNorm_0/(scale|bias)$")

# The text side of the model: absent from an image-only (MAE) checkpoint.
TEXT_KEYS = ("text_embed.weight", "encoder_text_type", "decoder_text_type", "text_mask_token",
             "text_head.weight", "text_head.bias")

# Globals whose presence in a checkpoint means it tries to run commands or touch files. The
# safe reader never calls them, but such a file is not an honest checkpoint: refuse it.
_SUSPICIOUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib",
                       "runpy", "pty", "ctypes", "pickle", "_pickle", "marshal", "code", "webbrowser")
_SUSPICIOUS_BUILTINS = ("eval", "exec", "compile", "__import__", "open", "breakpoint", "input")

# The official default image size (data.image_size) when the variant does not record one.
DEFAULT_IMAGE_SIZE = 256
# Heads of the official ``model_type`` presets (get_transformer_by_config); "debug" is not ours.
_OFFICIAL_HEADS = {name: (PRESETS[name]["num_heads"], PRESETS[name]["dec_num_heads"])
                   for name in ("small", "base", "large", "huge")}
_OFFICIAL_HEADS["debug"] = (16, 16)


def suspicious_globals(names) -> list[str]:
    out = []
    for full in names:
        module, _, name = full.rpartition(".")
        top = full.split(".")[0]
        if top in _SUSPICIOUS_MODULES or (module == "builtins" and name in _SUSPICIOUS_BUILTINS):
            out.append(full)
    return sorted(out)


def _plain_tree(obj: Any, path: str = "") -> Any:
    """Strip Flax/JAX stand-ins from a params tree: dicts of numpy arrays remain."""
    if isinstance(obj, dict):
        return {str(k): _plain_tree(v, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, (np.generic, float, int)):
        return np.asarray(obj)
    if isinstance(obj, Inert):
        # flax FrozenDict pickles as FrozenDict(dict) or with its dict in the state.
        if obj._args and isinstance(obj._args[0], dict):
            return _plain_tree(obj._args[0], path)
        state = obj._state
        if isinstance(state, dict) and isinstance(state.get("_dict"), dict):
            return _plain_tree(state["_dict"], path)
        # A jax.Array pickles as _reconstruct_array(numpy_rebuild_fn, args, arr_state, aval):
        # the numpy part was already rebuilt by the allow-listed numpy functions.
        if obj._qualname.endswith("_reconstruct_array") and len(obj._args) >= 3:
            fn, args, arr_state = obj._args[:3]
            if not isinstance(fn, type) or not issubclass(fn, Inert):
                arr = fn(*args)
                if arr_state is not None:
                    arr.__setstate__(arr_state)
                if isinstance(arr, np.ndarray):
                    return np.array(arr)
    raise ValueError(f"parameter {path or '/'} is a {obj!r}, not an array or a dict of arrays")


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def flax_params(tree: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree -> ``{'a/b/c': numpy array}`` relative to ``params["params"]``.

    Takes nested dicts (FrozenDicts and jax arrays from the safe unpickler, torch tensors) or
    keys that are already '/'-joined, with or without the ``params`` collection level."""
    flat = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in _flatten(tree).items()}
    flat = _flatten(_plain_tree(flat))  # stand-ins held in a flat dict become dicts: flatten again
    if all(k.startswith("params/") for k in flat):  # the Flax variable collection level
        flat = {k[len("params/"):]: v for k, v in flat.items()}
    return flat


def flax_name(path: str) -> str | None:
    """Our parameter name for a Flax path (relative to params["params"]), or None if unknown."""
    if path in _TOP:
        return _TOP[path]
    m = _BLOCK_RE.match(path)
    if m and m.group(3) in _BLOCK_PARTS:
        return f"{m.group(1)}.blocks.{m.group(2)}.{_BLOCK_PARTS[m.group(3)]}.{_LEAF[m.group(4)]}"
    m = _NORM_RE.match(path)
    if m:
        return f"{m.group(1)}.norm.{_LEAF[m.group(2)]}"
    return None


def convert_flax_params(flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Flat Flax params ('/'-joined, without the 'params' collection) -> our state dict."""
    out, unknown = {}, []
    for path, value in flat.items():
        name = flax_name(path)
        if name is None:
            unknown.append(path)
            continue
        a = np.asarray(value, dtype=np.float32)
        if path.endswith("/kernel"):
            if a.ndim != 2:
                raise ValueError(f"{path}: expected a 2-D Dense kernel, got shape {a.shape}")
            a = a.T  # Flax Dense (in, out) -> torch Linear (out, in)
        out[name] = torch.from_numpy(np.ascontiguousarray(a))
    if unknown:
        raise ValueError("parameters this converter does not know (an output head with "
                         "output_head_depth > 0, or a discretized-image model?): "
                         + ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else ""))
    return out


def _count_blocks(flat: dict, which: str) -> int:
    ids = {int(m.group(2)) for p in flat if (m := _BLOCK_RE.match(p)) and m.group(1) == which}
    if ids != set(range(len(ids))):
        raise ValueError(f"{which} blocks are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def infer_config(flat: dict[str, np.ndarray], variant: dict | None = None, *,
                 image_size: int | None = None, num_heads: int | None = None,
                 dec_num_heads: int | None = None, max_text_len: int | None = None
                 ) -> tuple[ModelConfig, dict]:
    """ModelConfig from parameter shapes and the run's ``variant`` flags.

    Shapes give widths, depths, patch size, vocabulary and whether type embeddings exist.
    Heads come from ``<prefix>.num_heads`` (or the official ``model_type`` table, which
    overrides the flags in the official code); image size from ``data.image_size`` (M3AE) or
    ``<dataset>_data.image_size`` (MAE), else 256, the official default. The image size is
    not in the weights but sets the position table, so pass the size you trained at.
    Keyword arguments override what the file says. Returns (config, notes).
    """
    variant = dict(variant or {})
    for key in ("cls_token", "image_embedding/kernel", "decoder_input_projection/kernel"):
        if key not in flat:
            raise ValueError(f"not an M3AE/MAE parameter tree: {key} is missing")
    image_only = "text_embedding/embedding" not in flat
    prefix = "mae" if image_only else "m3ae"
    if f"{prefix}.emb_dim" not in variant and any(k.startswith("m3ae.") for k in variant):
        prefix = "m3ae"
    v = {k[len(prefix) + 1:]: val for k, val in variant.items() if k.startswith(prefix + ".")}

    emb_dim = flat["cls_token"].shape[-1]
    patch_dim = flat["image_embedding/kernel"].shape[0]
    patch = math.isqrt(patch_dim // 3)
    if patch * patch * 3 != patch_dim:
        raise ValueError(f"image_embedding has {patch_dim} inputs, not p*p*3 for an RGB patch size p")
    dec_emb_dim = flat["decoder_input_projection/kernel"].shape[1]
    fc1 = flat.get("encoder/Block_0/TransformerMLP_0/fc1/kernel")
    mlp_ratio = fc1.shape[1] / emb_dim if fc1 is not None else float(v.get("mlp_ratio", 4))

    model_type = v.get("model_type")
    if model_type:
        if model_type not in _OFFICIAL_HEADS:
            raise ValueError(f"unknown official model_type {model_type!r}")
        heads, dec_heads = _OFFICIAL_HEADS[model_type]
    else:
        heads, dec_heads = v.get("num_heads"), v.get("dec_num_heads")
        if v.get("emb_dim") not in (None, emb_dim):
            raise ValueError(f"variant says {prefix}.emb_dim={v['emb_dim']} but the weights have {emb_dim}")
    heads = num_heads or heads
    dec_heads = dec_num_heads or dec_heads
    if not heads or not dec_heads:
        raise ValueError("the checkpoint does not record the number of attention heads; pass "
                         "num_heads / dec_num_heads (--num-heads / --dec-num-heads)")

    size_from = "given"
    if image_size is None:
        # m3ae_main records data.*; mae_main records the chosen dataset's flags (cc12m_data.*).
        size_key = f"{variant['dataset']}_data.image_size" if "dataset" in variant else "data.image_size"
        image_size = variant.get(size_key) or DEFAULT_IMAGE_SIZE
        size_from = f"variant {size_key}" if variant.get(size_key) else f"default {DEFAULT_IMAGE_SIZE}"
    if image_only:
        # An MAE has no text side; keep that part of our model as small as it can be.
        vocab, text_len = 1, 1
    else:
        vocab = flat["text_embedding/embedding"].shape[0]
        text_len = max_text_len or variant.get("data.tokenizer_max_length") or 64
        text_len = min(int(text_len), 512)  # the official default is "unbounded" (1e9)

    cfg = ModelConfig(
        image_size=int(image_size), patch_size=patch, in_chans=3, vocab_size=int(vocab),
        max_text_len=int(text_len), emb_dim=int(emb_dim), depth=_count_blocks(flat, "encoder"),
        num_heads=int(heads), dec_emb_dim=int(dec_emb_dim), dec_depth=_count_blocks(flat, "decoder"),
        dec_num_heads=int(dec_heads), mlp_ratio=mlp_ratio,
        use_type_embedding="encoder_image_type_embedding" in flat,
        image_mask_ratio=float(v.get("image_mask_ratio", 0.75)),
        text_mask_ratio=float(v.get("text_mask_ratio", 0.75)),
        ln_eps=1e-6, gelu_approximate="tanh")
    notes = {"kind": "mae" if image_only else "m3ae", "image_only": image_only,
             "image_size_from": size_from, "model_type": model_type}
    return cfg, notes


_OFFICIAL_LOOKS_LIKE = ("An official checkpoint is a plain pickle of {step, epoch, variant, state} written by "
                        "the young-geng/m3ae_public training scripts (e.g. checkpoint.pkl / model.pkl)")


def _refuse_other_formats(path: Path) -> None:
    """Name the formats people pass by mistake, instead of a pickle error."""
    with open(path, "rb") as f:
        head = f.read(16)
    kind = None
    if head.startswith(b"PK\x03\x04"):
        kind = "a PyTorch file (torch.save, a zip archive)"
    elif len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        kind = "a safetensors file"
    elif head.startswith(b"\x89HDF"):
        kind = "an HDF5 file"
    if kind:
        raise ValueError(f"{path} is {kind}, not an official JAX M3AE checkpoint. {_OFFICIAL_LOOKS_LIKE}; "
                         f"m3ae's own models (a folder with config.json + model.safetensors) load directly")


def is_torch_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file (a zip archive), e.g. the official Colab's .pth."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_official_pickle(path: str | Path) -> tuple[dict, set[str]]:
    """The checkpoint dict, read safely; refuses files that try to run commands."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _refuse_other_formats(path)
    try:
        obj, stubbed = safe_load(path)
    except ValueError as e:
        raise ValueError(f"{path} is not an official JAX M3AE checkpoint ({e}). {_OFFICIAL_LOOKS_LIKE}") from None
    bad = suspicious_globals(stubbed)
    if bad:
        raise ValueError(f"refusing {path}: unpickling it would call {', '.join(bad)} "
                         "(nothing was run). This is not how an M3AE checkpoint is written.")
    return obj, stubbed


def _params_of(ckpt: Any) -> dict:
    if isinstance(ckpt, dict) and "state" in ckpt:
        state = ckpt["state"]
    else:
        state = ckpt  # a bare train state, or a params dict
    params = state.get("params") if isinstance(state, dict) else getattr(state, "params", None)
    if params is None:
        raise ValueError("not an official M3AE/MAE checkpoint: found no state.params "
                         f"(top level is {type(ckpt).__name__}"
                         + (f" with keys {sorted(map(str, ckpt))[:6]})" if isinstance(ckpt, dict) else ")"))
    return _plain_tree(params, "params")


def load_official_checkpoint(path: str | Path, **config_overrides
                             ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Read an official checkpoint -> (ModelConfig, our state dict, meta).

    ``config_overrides``: image_size, num_heads, dec_num_heads, max_text_len (see
    :func:`infer_config`). For an image-only MAE, the state dict has no text-side keys
    (``TEXT_KEYS``) and ``meta["image_only"]`` is True.
    """
    ckpt, stubbed = read_official_pickle(path)
    flat = flax_params(_params_of(ckpt))  # TrainState.params is {"params": {...}}
    variant = ckpt.get("variant") if isinstance(ckpt, dict) else None
    variant = variant if isinstance(variant, dict) else {}
    cfg, notes = infer_config(flat, variant, **config_overrides)
    state = convert_flax_params(flat)

    def scalar(x):
        try:
            return int(np.asarray(x))
        except (TypeError, ValueError):
            return None

    meta = {**notes, "source": str(path), "flax_params": sum(int(np.prod(a.shape)) for a in flat.values()),
            "step": scalar(ckpt.get("step")) if isinstance(ckpt, dict) else None,
            "epoch": scalar(ckpt.get("epoch")) if isinstance(ckpt, dict) else None,
            "variant": {k: val for k, val in variant.items() if isinstance(val, (str, int, float, bool, type(None)))},
            "replaced_globals": len(stubbed)}
    return cfg, state, meta


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], image_only: bool = False):
    """An :class:`M3AE` holding ``state``. For an image-only checkpoint, the text side keeps a
    fixed-seed initialisation (it is unused by image-only inputs)."""
    from ..model import M3AE
    from ..pretrained import load_state_dict_checked

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = M3AE(cfg)
    if image_only:
        own = model.state_dict()
        state = {**{k: own[k] for k in TEXT_KEYS if k in own and k not in state}, **state}
    load_state_dict_checked(model, state, strict=True)
    return model.eval()


def convert_official(src: str | Path, dst: str | Path, **config_overrides):
    """Convert an official checkpoint into a pretrained folder (config.json + model.safetensors).

    ``src``: a pickle of the official JAX training scripts, or the official Colab's PyTorch
    ``.pth`` (encoder only: the model and its ``config.json`` say ``encoder_only``).
    Returns (model, meta). ``config.json`` records ``image_only`` and where it came from.
    """
    from ..pretrained import save_pretrained

    if is_torch_file(src):  # the official Colab's encoder-only .pth (m3ae.interop.official_pth)
        from .official_pth import load_official_pth

        config_overrides.pop("dec_num_heads", None)  # no decoder
        cfg, state, meta = load_official_pth(src, **config_overrides)
        fmt = "official-colab-pth"
    else:
        cfg, state, meta = load_official_checkpoint(src, **config_overrides)
        fmt = f"official-jax-{meta['kind']}"
    model = build_model(cfg, state, meta["image_only"])
    extra = {"image_only": meta["image_only"],
             "converted_from": {"format": fmt, "file": Path(src).name,
                                "step": meta["step"], "epoch": meta["epoch"],
                                "image_size_from": meta["image_size_from"]}}
    save_pretrained(model, dst, extra=extra)
    meta["num_params"] = sum(p.numel() for p in model.parameters())
    return model, meta
