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

import functools
import re
import warnings

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

from ..config import ImageBackend, check_choice
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


def uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W) RGB tensor, a channels-last view of one copy of the
    pixels (the layout torch's fast uint8 resize kernel works in); a tensor is returned as is."""
    if isinstance(image, torch.Tensor):
        return image
    with warnings.catch_warnings():  # a read-only array: nothing ever writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(to_rgb(image))).permute(2, 0, 1)


_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD).view(-1, 1, 1))
_BIAS = -torch.tensor(IMAGENET_MEAN).view(-1, 1, 1) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)


@functools.lru_cache(maxsize=8)
def _affine_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _SCALE.to(device), _BIAS.to(device)  # once per device, not a copy per batch


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 255]) (..., 3, H, W) on any device -> float32 normalised,
    ``(x / 255 - mean) / std`` as one multiply-add."""
    scale, bias = (_SCALE, _BIAS) if x.device.type == "cpu" else _affine_on(x.device)
    return torch.addcmul(bias, x.to(torch.float32), scale)


def _resize_uint8(x: torch.Tensor, size) -> torch.Tensor:
    # torch's antialiased bicubic on uint8 is the filter Pillow applies, faster than Pillow's,
    # and fastest on channels-last input (benchmarks/RESULTS.md, "Data loading at 256 px").
    x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # no copy when already channels-last
    return F2.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def resize_center_crop_uint8(image, size: int) -> torch.Tensor:
    """A PIL image or uint8 (3, H, W) tensor -> uint8 (3, size, size): the shorter side
    resized to ``size`` (bicubic, antialiased), then the centre square. Evaluation's geometry,
    and what an image cache (m3ae.data.cache) stores."""
    return F2.center_crop(_resize_uint8(uint8_tensor(image), size), size)


class PretrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation, caption-aware.

    ``backend="tensor"`` (the default) crops, resizes and flips uint8 tensors and converts
    to float once, at the end; ``"pil"`` resizes with Pillow and converts the whole crop to
    float before normalising. Both draw the same crop and flip from torch's generator, so a
    seeded sample gets the same geometry either way and pixels within ~0.05/255 on average
    (tests/data/test_fast_path.py). A sample's image may be a PIL image or a uint8 tensor
    (``decode_image(fast_jpeg=True)``); a tensor always takes the tensor path.
    """

    def __init__(self, image_size: int, crop_scale=(0.2, 1.0), hflip: float = 0.5,
                 swap_captions: bool = True, word_pairs=DEFAULT_WORD_PAIRS, backend: str = "tensor"):
        self.image_size = image_size
        self.crop = RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.hflip = hflip
        self.swap_captions = swap_captions
        self.swap_words = WordSwapper(word_pairs)
        self.backend = check_choice("data.image_backend", backend, ImageBackend)

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:  # unpaired text
            return sample
        image, flipped = self.augment(sample["image"])
        if flipped and self.swap_captions and sample.get("caption"):
            sample["caption"] = self.swap_words(sample["caption"])
        sample["image"] = self.finish(image)
        return sample

    def augment(self, image):
        """-> (the random crop resized to image_size, flipped or not; whether it was flipped).
        An image smaller than the crop is upsampled."""
        if not isinstance(image, torch.Tensor):
            image = to_rgb(image)
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        size = [self.image_size, self.image_size]
        if isinstance(image, torch.Tensor):
            out = _resize_uint8(image[:, top:top + h, left:left + w], size)
        elif self.backend == "tensor":  # crop in Pillow first: only the crop's pixels are copied
            out = _resize_uint8(uint8_tensor(image.crop((left, top, left + w, top + h))), size)
        else:
            out = TF.resized_crop(image, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
            return (TF.hflip(out) if flip else out), flip
        return (out.flip(-1) if flip else out), flip

    def finish(self, image) -> torch.Tensor:
        """The augmented image -> normalised float32 (3, H, W)."""
        if isinstance(image, torch.Tensor):
            return normalize_uint8(image)
        return normalize(TF.to_tensor(image))


class EvalTransform:
    """Resize the shorter side (bicubic) then centre-crop, and normalise (``backend`` as in
    :class:`PretrainTransform`)."""

    def __init__(self, image_size: int, backend: str = "tensor"):
        self.image_size = image_size
        self.backend = check_choice("data.image_backend", backend, ImageBackend)

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("image") is None:
            return sample
        img = sample["image"]
        if isinstance(img, torch.Tensor) or self.backend == "tensor":
            sample["image"] = normalize_uint8(resize_center_crop_uint8(img, self.image_size))
            return sample
        img = TF.resize(to_rgb(img), self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, self.image_size)
        sample["image"] = normalize(TF.to_tensor(img))
        return sample
