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

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import PRESETS, model_config
from .model import M3AE
from .pretrained import CONFIG_NAME, TOKENIZER_NAME, read_model_config, resolve_pretrained
from .tokenizer import CaptionTokenizer, load_tokenizer


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


def get_tokenizer(src, text_len: int | None = None) -> CaptionTokenizer:
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
            raise FileNotFoundError(f"{src} has no {TOKENIZER_NAME}: pass a tokenizer file "
                                    "(m3ae convert-official --tokenizer stores one beside the weights)")
        length = text_len or read_model_config(folder).max_text_len
        return CaptionTokenizer(load_tokenizer(folder / TOKENIZER_NAME), length)
    return CaptionTokenizer(load_tokenizer(src), text_len or 64)


def load_pretrained(src, device: str | torch.device | None = None
                    ) -> tuple[M3AE, CaptionTokenizer | None, ImageTransform]:
    """``model, tokenizer, transform`` for a pretrained folder, a run folder, or a Hub id in
    the local cache (never a download).

    The model is in eval mode on ``device`` (default: CUDA when available, else CPU).
    ``tokenizer`` is None when the folder holds no ``tokenizer.json`` (e.g. an official
    checkpoint converted without ``--tokenizer``): image features still work.
    """
    folder = _model_folder(src)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = M3AE.from_pretrained(folder).to(device).eval()
    tokenizer = None
    if (folder / TOKENIZER_NAME).is_file():
        tokenizer = CaptionTokenizer(load_tokenizer(folder / TOKENIZER_NAME), model.config.max_text_len)
    return model, tokenizer, ImageTransform(model.config.image_size)


class ModelInfo(NamedTuple):
    """A preset's architecture and size (:func:`list_models`)."""

    name: str
    params: int          # the whole model
    encoder_params: int  # what features and fine-tuning use
    emb_dim: int
    depth: int
    num_heads: int
    image_size: int
    patch_size: int


def list_models() -> list[ModelInfo]:
    """Every preset of :func:`m3ae.create_model`, with its parameter counts."""
    out = []
    for name in PRESETS:
        cfg = model_config(name)
        with torch.device("meta"):  # counts without allocating (huge has 0.6 B parameters)
            model = M3AE(cfg)
        total = sum(p.numel() for p in model.parameters())
        encoder = sum(p.numel() for n, p in model.named_parameters() if model.group_matcher(n) <= cfg.depth
                      or n.startswith("encoder."))
        out.append(ModelInfo(name, total, encoder, cfg.emb_dim, cfg.depth, cfg.num_heads,
                             cfg.image_size, cfg.patch_size))
    return out
