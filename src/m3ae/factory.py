"""From a trained model to features in three lines, in the style of open_clip and timm::

    model, tokenizer, transform = m3ae.load_pretrained("runs/demo/final")
    ids, padding_mask = tokenizer("a picture of a red circle")
    features = model.encode(transform(image), ids, padding_mask)

``load_pretrained`` reads a pretrained folder (``config.json`` + ``model.safetensors`` [+
``tokenizer.json``]: what training, ``m3ae convert-official`` and ``save_pretrained`` write),
a run folder (its ``final/``), or a Hugging Face Hub id already in the local cache. It never
downloads. ``transform`` gives exactly the pixels evaluation uses
(:class:`m3ae.data.EvalTransform`: shorter side resized bicubic, centre crop, ImageNet
normalisation).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import PRESETS, model_config
from .model import M3AE
from .pretrained import CONFIG_NAME, TOKENIZER_NAME, read_model_config, resolve_pretrained
from .tokenizer import TextTokenizer, load_tokenizer


class ImageTransform:
    """One image -> the normalised float tensor (3, S, S) the model takes, S its image size.

    Takes a PIL image, an (H, W, 3) / (H, W) uint8 numpy array, or a (3, H, W) uint8 tensor;
    the pixels are those of evaluation (:class:`m3ae.data.EvalTransform`).
    """

    def __init__(self, image_size: int):
        # Imported here: `import m3ae` stays free of the data package's image decoders.
        from .data.transforms import EvalTransform

        self.image_size = image_size
        self.eval_transform = EvalTransform(image_size)

    def __call__(self, image) -> torch.Tensor:
        return self.eval_transform({"image": self._pixels(image)})["image"]

    @staticmethod
    def _pixels(image):
        from PIL import Image

        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"image arrays must be uint8 (H, W, 3), got {image.dtype}")
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise ValueError(f"image arrays must be (H, W, 3) RGB, got shape {image.shape}")
            return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(f"image tensors must be uint8 (3, H, W) pixels, got {image.dtype} "
                                "(a float tensor could be 0-1 or 0-255: convert it to uint8 first)")
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensors must be (3, H, W), got shape {tuple(image.shape)}")
            return image
        raise TypeError(f"transform takes a PIL image, a uint8 (H, W, 3) array or a uint8 (3, H, W) "
                        f"tensor, got {type(image).__name__}")

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size})"


def _model_folder(src) -> Path:
    """A pretrained folder for ``src``: the folder itself, a run folder's ``final/``, or a
    cached Hub snapshot."""
    path = Path(src)
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    return resolve_pretrained(src)


def _no_tokenizer(folder) -> str:
    """What to do about a model folder without a tokenizer (one sentence, for a warning or an error)."""
    return (f"{folder} holds no {TOKENIZER_NAME}, so captions cannot be tokenised (text features, "
            "fill_mask, zero_shot, reconstruct with a caption): store one beside the weights with "
            f"`m3ae convert-official CHECKPOINT {folder} --tokenizer VOCAB` (vocab.txt / tokenizer.json), "
            "or load one with m3ae.get_tokenizer(PATH)")


def _folder_tokenizer(folder: Path, text_len: int) -> TextTokenizer:
    try:
        tok = load_tokenizer(folder / TOKENIZER_NAME)
    except Exception as e:  # the tokenizers library's own error type
        raise ValueError(f"{folder / TOKENIZER_NAME} is damaged ({type(e).__name__}: {e})") from None
    return TextTokenizer(tok, text_len, warn_truncation=True)


def get_tokenizer(src, text_len: int | None = None) -> TextTokenizer:
    """The tokenizer of a model (its folder's ``tokenizer.json``, at its caption length), or of
    a tokenizer file / folder / cached HF name (``text_len`` then defaults to 64)."""
    path = Path(src)
    folder = None
    if path.is_dir() or not path.exists():
        try:
            folder = _model_folder(src)
        except FileNotFoundError:
            folder = None
    if folder is not None and (folder / CONFIG_NAME).is_file():
        if not (folder / TOKENIZER_NAME).is_file():
            raise FileNotFoundError(_no_tokenizer(folder))
        return _folder_tokenizer(folder, text_len or read_model_config(folder).max_text_len)
    return TextTokenizer(load_tokenizer(src), text_len or 64, warn_truncation=True)


def load_pretrained(src, device: str | torch.device | None = None, need_tokenizer: bool | None = None
                    ) -> tuple[M3AE, TextTokenizer | None, ImageTransform]:
    """``model, tokenizer, transform`` for a pretrained folder, a run folder, or a Hub id in
    the local cache (never a download): the one way in for a trained model (the CLI, the demo,
    the experiments and the trainer's resume use it).

    The model is in eval mode on ``device`` (default: CUDA when available, else CPU).
    ``tokenizer`` is None when the folder holds no ``tokenizer.json`` (e.g. an official
    checkpoint converted without ``--tokenizer``): image features still work, and a warning
    says how to add one. ``need_tokenizer=True`` makes that an error instead; ``False``
    (image-only work) loads without the warning.
    """
    folder = _model_folder(src)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = M3AE.from_pretrained(folder).to(device).eval()
    tokenizer = None
    if (folder / TOKENIZER_NAME).is_file():
        tokenizer = _folder_tokenizer(folder, model.config.max_text_len)
    elif need_tokenizer:
        raise FileNotFoundError(_no_tokenizer(folder))
    elif need_tokenizer is None:
        warnings.warn(_no_tokenizer(folder), stacklevel=2)
    return model, tokenizer, ImageTransform(model.config.image_size)


class ModelInfo(NamedTuple):
    """A preset's architecture and size (:func:`model_info`)."""

    name: str
    params: int          # the whole model
    encoder_params: int  # what features and fine-tuning use
    emb_dim: int
    depth: int
    num_heads: int
    image_size: int
    patch_size: int


def list_models() -> list[str]:
    """The names of :func:`m3ae.create_model`'s presets, as ``timm.list_models()`` and
    ``open_clip.list_models()`` give them. An alias (a name whose preset is an earlier name's,
    e.g. ``m3ae_base_patch16`` for ``base``) is not listed again; ``create_model`` and
    :func:`model_info` take it."""
    seen: list[dict] = []
    names = []
    for name, preset in PRESETS.items():
        if not any(preset is s for s in seen):
            seen.append(preset)
            names.append(name)
    return names


def model_info(name: str) -> ModelInfo:
    """A preset's architecture and parameter counts (any name :func:`m3ae.create_model` takes)."""
    cfg = model_config(name)
    with torch.device("meta"):  # counts without allocating (huge has 0.6 B parameters)
        model = M3AE(cfg)
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for n, p in model.named_parameters() if model.group_matcher(n) <= cfg.depth
                  or n.startswith("encoder."))
    return ModelInfo(name, total, encoder, cfg.emb_dim, cfg.depth, cfg.num_heads, cfg.image_size, cfg.patch_size)
