"""Encoder features for downstream work: image-only, text-only or image+text inputs.

A feature is the encoder's CLS token or the mean of its tokens (the real ones: caption
padding and absent images are left out), from the final output (after the encoder's
LayerNorm, what the paper probes) or from a chosen block (that block's residual stream,
before any LayerNorm; the probe's BatchNorm takes care of the scale). A sequence of blocks
(``block=(0, 1, None)``, or :func:`m3ae.ops.resolve_blocks` of ``"all"``) reads them all from one
forward pass: a probe at every layer costs one pass over the data, as timm's
``forward_intermediates`` does.

:func:`cached_features` stores features on disk under a key made of the model weights'
hash, the data fingerprint and the options, so a probe, kNN and OOD run on the same model
and data compute them once. Several poolings come out of one pass over the data, and every
extraction also keeps each image average-pooled to 8 x 8 pixels (``Features.pixels``, 192
numbers), so a raw-pixel baseline costs no extra pass.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from tqdm.auto import tqdm

from ..data import model_inputs
from ..factory import load_pretrained
from ..model import M3AE
from ..io import atomic_write, save_safetensors
from ..ops import POOLS, pool_tokens, resolve_blocks  # noqa: F401 (one pooling for every path, also M3AE.encode_*)
from ..pretrained import WEIGHTS_NAME
from ..tokenizer import TextTokenizer
from ..device import resolve_device  # noqa: F401 (also imported from here)

MODALITIES = ("image", "text", "both")


@dataclass
class Features:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray    # (N,) int64, -1 where unknown
    keys: list[str]
    class_names: list[str] | None = None
    pixels: np.ndarray | None = None  # (N, 192) images average-pooled to 8 x 8, for a baseline

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> Path:
        """``.safetensors`` (tensors ``features``, ``labels``; keys and class names in the
        metadata) or ``.npy`` (features; ``<stem>.labels.npy`` and ``<stem>.keys.json`` beside)."""
        path = Path(path)
        meta = {"keys": self.keys, "class_names": self.class_names}
        if path.suffix == ".safetensors":
            arrays = {"features": self.features, "labels": self.labels}
            if self.pixels is not None:
                arrays["pixels"] = self.pixels
            save_safetensors(arrays, path, metadata={"m3ae": json.dumps(meta)})
        elif path.suffix == ".npy":
            atomic_write(path.with_name(path.stem + ".labels.npy"), _npy_writer(self.labels))
            atomic_write(path.with_name(path.stem + ".keys.json"), json.dumps(meta))
            atomic_write(path, _npy_writer(self.features))
        else:
            raise ValueError(f"feature file {path} must end in .npy or .safetensors")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Features:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                meta = json.loads((f.metadata() or {}).get("m3ae", "{}"))
            t = load_np(str(path))
            return cls(t["features"], t["labels"], meta.get("keys", []), meta.get("class_names"), t.get("pixels"))
        meta = json.loads(path.with_name(path.stem + ".keys.json").read_text())
        return cls(np.load(path), np.load(path.with_name(path.stem + ".labels.npy")), meta["keys"],
                   meta.get("class_names"))


def _npy_writer(array: np.ndarray):
    """An :func:`atomic_write` content function that saves ``array`` as .npy (``np.save`` given
    a path would add ``.npy`` to the temporary name)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return write


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               need_tokenizer: bool = False) -> tuple[M3AE, TextTokenizer | None]:
    """Deprecated: ``m3ae.load_pretrained(directory, device)[:2]``, the one way in."""
    import warnings

    warnings.warn("m3ae.evaluation.load_model is deprecated: use m3ae.load_pretrained(path, device) "
                  "-> (model, tokenizer, transform)", DeprecationWarning, stacklevel=2)
    return load_pretrained(directory, device, need_tokenizer=need_tokenizer)[:2]


def layer_name(block: int | None) -> str:
    """A layer's name in tables and JSON: ``"block 3"`` or ``"final"`` (after the LayerNorm)."""
    return "final" if block is None else f"block {block}"


@torch.no_grad()
def encode_batch(model: M3AE, batch: dict, modality: str = "image", pool: str | tuple = "cls",
                 block=None) -> torch.Tensor | dict:
    """Features (B, D) of one collated batch; a tuple of pools gives ``{pool: (B, D)}`` from
    one forward pass. ``block`` (0-based, negative from the end) takes that block's output
    instead of the final normalised encoder output; a list or tuple of blocks (None: the final
    output) gives ``{block: <that block's result>}`` from the same single pass, keyed by the
    non-negative index."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    device = next(model.parameters()).device
    x = model_inputs(batch, device)
    image = x["image"] if modality in ("image", "both") else None
    text = pad = None
    if modality in ("text", "both"):
        if x["text"] is None:
            raise ValueError(f"modality={modality!r} needs captions, but the data has none "
                             "(or the model folder has no tokenizer)")
        text, pad = x["text"], x["text_padding_mask"]
    if image is None and text is None:
        raise ValueError("modality='image' needs images, but the batch has none")
    sweep = isinstance(block, (list, tuple))
    blocks = resolve_blocks(block if sweep else [block], model.config.depth)
    enc, _ = model.forward_encoder(image, text, pad, x["image_valid"] if image is not None else None,
                                   return_intermediates=any(b is not None for b in blocks))

    def pooled(b):
        tokens = enc.latent if b is None else enc.intermediates[b]
        if isinstance(pool, str):
            return pool_tokens(tokens, enc.key_valid, pool).float()
        return {p: pool_tokens(tokens, enc.key_valid, p).float() for p in pool}

    return {b: pooled(b) for b in blocks} if sweep else pooled(blocks[0])


def pixel_features(image: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The raw-pixel baseline of every report: (B, 3, H, W) normalised images -> (B, 192), the
    images average-pooled to 8 x 8 (zeros without images). Pooling keeps a linear probe on
    pixels small and comparable across image sizes."""
    if image is None:
        return torch.zeros(rows, 192)
    return torch.nn.functional.adaptive_avg_pool2d(image.float().cpu(), 8).flatten(1)


def random_init_model(config, seed: int) -> M3AE:
    """The random-init baseline of every report: the architecture of ``config`` (a
    :class:`m3ae.config.ModelConfig`) with the weights ``torch.manual_seed(seed)`` gives, the
    trainer's starting point for that seed; in eval mode."""
    torch.manual_seed(seed)
    return M3AE(config).eval()


def random_init_folder(model_dir, cache_dir, seed: int):
    """The model's architecture with fresh random weights, saved once in the cache (so its
    features are cached like any model's)."""
    from ..pretrained import read_model_config, save_pretrained

    cfg = read_model_config(model_dir)
    tag = hashlib.sha1(json.dumps([asdict(cfg), seed], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()).parent / "random-init" / tag
    if not (path / "model.safetensors").is_file():
        save_pretrained(random_init_model(cfg, seed), path)
    return path


def _approx_len(dataset) -> int | None:
    """The number of samples, or an estimate for shards (``approx_len``), for progress bars."""
    try:
        return len(dataset)
    except TypeError:
        return getattr(dataset, "approx_len", None)


@torch.no_grad()
def extract_features(model: M3AE, loader, modality: str = "image", pool: str | tuple = "cls",
                     block: int | None = None, progress: bool = True, class_names: list[str] | None = None,
                     desc: str = "features") -> Features | dict:
    """Run the encoder over every batch of ``loader`` (from :func:`m3ae.evaluation.data.make_loader`).

    A tuple of pools gives ``{pool: Features}`` from a single pass; a list or tuple of blocks
    (see :func:`encode_batch`) gives ``{block: {pool: Features}}``, also from a single pass."""
    model.eval()
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    sweep = isinstance(block, (list, tuple))
    blocks = resolve_blocks(block if sweep else [block], model.config.depth)
    feats: dict = {(b, p): [] for b in blocks for p in pools}
    labels, keys, pixels = [], [], []
    with tqdm(total=_approx_len(loader.dataset), disable=not progress, desc=desc, unit="img",
              dynamic_ncols=True) as bar:
        for batch in loader:
            out = encode_batch(model, batch, modality, pools, list(blocks))
            for b, p in feats:
                feats[b, p].append(out[b][p].cpu())
            labels.append(batch["label"])
            keys.extend(batch["key"])
            pixels.append(pixel_features(batch.get("image"), len(batch["label"])))
            bar.update(len(batch["label"]))
        bar.total = bar.n  # an estimated total (shards) ends exact
        bar.refresh()
    if not labels:
        raise ValueError("the data produced no samples")
    lab = torch.cat(labels).numpy().astype(np.int64)
    pix = torch.cat(pixels).numpy()
    out = {b: {p: Features(torch.cat(feats[b, p]).numpy(), lab, keys, class_names, pix) for p in pools}
           for b in blocks}
    if not sweep:
        out = out[blocks[0]]
        return out[pool] if isinstance(pool, str) else out
    return {b: o[pool] if isinstance(pool, str) else o for b, o in out.items()}


def weights_hash(directory: str | Path) -> str:
    """SHA-1 of the model's weights file (streamed: fine for multi-GB files)."""
    h = hashlib.sha1()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("M3AE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "m3ae")
    return Path(base) / "features"


def cached_features(model_dir: str | Path, data, *, model: M3AE | None = None, text_tokenizer=None,
                    modality: str = "image", pool: str | tuple = "cls", block=None,
                    batch_size: int = 128, cache_dir: str | Path | None = None, progress: bool = True,
                    device: str | torch.device = "cpu", desc: str = "features") -> Features | dict:
    """Features of ``data`` (a :class:`~m3ae.evaluation.data.LabelledData`), computed once and
    then read from ``cache_dir`` (default ``$M3AE_CACHE/features`` or ``~/.cache/m3ae/features``).
    A tuple of pools gives ``{pool: Features}``; a list or tuple of blocks (a layer sweep)
    ``{block: {pool: Features}}``. Each (block, pool) is one cache entry, shared by a sweep and a
    single-block call; whatever is missing is computed in one pass."""
    from ..pretrained import read_model_config
    from .data import make_loader

    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    sweep = isinstance(block, (list, tuple))
    blocks = resolve_blocks(block if sweep else [block], read_model_config(model_dir).depth)
    whash = weights_hash(model_dir)
    paths = {(b, p): Path(cache_dir or default_cache_dir()) / (hashlib.sha1(json.dumps(
        [whash, data.fingerprint, modality, p, b]).encode()).hexdigest()[:20] + ".safetensors")
        for b in blocks for p in pools}
    found = {k: Features.load(path) for k, path in paths.items() if path.is_file()}
    for b, p in found:  # say so: a cache hit explains a run that took no time
        tqdm.write(f"{desc} ({p}{'' if b is None else f', {layer_name(b)}'}): read from the cache {paths[b, p]}")
    todo_blocks = [b for b in blocks if any((b, p) not in found for p in pools)]
    if todo_blocks:
        if model is None:
            model, text_tokenizer, _ = load_pretrained(model_dir, device, need_tokenizer=modality != "image")
        loader = make_loader(data, text_tokenizer if modality != "image" else None, batch_size)
        fresh = extract_features(model, loader, modality, pools, todo_blocks, progress, data.class_names, desc)
        for b, by_pool in fresh.items():
            for p, feats in by_pool.items():
                if (b, p) not in found:
                    feats.save(paths[b, p])  # atomic: a crash never leaves a half-written cache entry
                    found[b, p] = feats
    by_block = {b: found[b, pool] if isinstance(pool, str) else {p: found[b, p] for p in pools} for b in blocks}
    return by_block if sweep else by_block[blocks[0]]
