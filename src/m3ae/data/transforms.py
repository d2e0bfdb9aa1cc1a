"""Image and caption transforms: MAE's pre-training augmentation, caption-aware flips.

A horizontal flip swaps left and right in the picture, so a caption that says "on the left"
would become false. When ``swap_captions`` is on (the default), every flip also swaps the
words of each pair in ``word_pairs`` (whole words, any case) in the caption: "left" and
"right" by default, which is English only; give other languages' pairs through
``data.flip_word_pairs``. This is exact for the built-in data; in web captions it can misfire
where "right" means "correct", which is rare and cheaper than teaching the model wrong
spatial words half of the time.
"""
from __future__ import annotations

import re

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from .decode import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_WORD_PAIRS = (("left", "right"),)


class WordSwapper:
    """Swap the two words of each pair (whole words, any case, keeping the case style)."""

    def __init__(self, pairs=DEFAULT_WORD_PAIRS):
        self.other: dict[str, str] = {}
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair):
                raise ValueError(f"data.flip_word_pairs: each entry must be two words, got {pair!r}")
            a, b = (w.strip().lower() for w in pair)
            self.other[a], self.other[b] = b, a
        words = sorted(self.other, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else None

    def __call__(self, caption: str) -> str:
        if self.pattern is None:
            return caption

        def repl(m: re.Match) -> str:
            word = m.group(0)
            other = self.other[word.lower()]
            if word.isupper() and len(word) > 1:
                return other.upper()
            return other[:1].upper() + other[1:] if word[0].isupper() else other
        return self.pattern.sub(repl, caption)


swap_left_right = WordSwapper()


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
                 swap_captions: bool = True, word_pairs=DEFAULT_WORD_PAIRS):
        self.image_size = image_size
        self.crop = RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.hflip = hflip
        self.swap_captions = swap_captions
        self.swap_words = WordSwapper(word_pairs)

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:  # unpaired text
            return sample
        img = to_rgb(sample["image"])
        img = self.crop(img)  # an image smaller than the crop is upsampled
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            img = TF.hflip(img)
            if self.swap_captions and sample.get("caption"):
                sample["caption"] = self.swap_words(sample["caption"])
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
