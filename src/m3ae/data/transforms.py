"""Image and caption transforms: MAE's pre-training augmentation, caption-aware flips.

A horizontal flip swaps left and right in the picture, so a caption that says "on the left"
would become false. When ``swap_left_right`` is on (the default), every flip also swaps the
words "left" and "right" (whole words, any case) in the caption. This is exact for the
built-in data; in web captions it can misfire where "right" means "correct", which is rare
and cheaper than teaching the model wrong spatial words half of the time.
"""
from __future__ import annotations

import re

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    def repl(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other
    return _LEFT_RIGHT.sub(repl, caption)


def to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised (…, 3, H, W) -> pixels in [0, 1] (for pictures)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


class PretrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation, caption-aware."""

    def __init__(self, image_size: int, crop_scale=(0.2, 1.0), hflip: float = 0.5,
                 swap_captions: bool = True):
        self.image_size = image_size
        self.crop = RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.hflip = hflip
        self.swap_captions = swap_captions

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:  # unpaired text
            return sample
        img = to_rgb(sample["image"])
        img = self.crop(img)  # an image smaller than the crop is upsampled
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            img = TF.hflip(img)
            if self.swap_captions and sample.get("caption"):
                sample["caption"] = swap_left_right(sample["caption"])
        sample["image"] = normalize(TF.to_tensor(img))
        return sample


class EvalTransform:
    """Resize the shorter side (bicubic) then centre-crop, and normalise."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:
            return sample
        img = to_rgb(sample["image"])
        img = TF.resize(img, self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, self.image_size)
        sample["image"] = normalize(TF.to_tensor(img))
        return sample
