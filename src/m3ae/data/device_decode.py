"""JPEG decoding and augmentation of whole batches on the training device (``data.decode_device``).

With ``data.decode_device=cuda`` the loader workers of a WebDataset source no longer decode:
they read each JPEG's header (size, mode, EXIF orientation), draw the random crop and the flip
exactly as :class:`~m3ae.data.transforms.PretrainTransform` does (same generator calls, so a
seeded run gets the same geometry and an exact resume still works), swap the caption's words
on a flip, and hand over the raw bytes. The main process decodes the batch in one call of
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG's batched decoder) and crops, resizes
(antialiased bicubic, rounded to whole pixel values like the uint8 path), flips and
normalises on the device. A file the device decoder cannot take as it is (not a JPEG, CMYK,
a rotated phone photo) is decoded in the worker as before and travels as pixels; a JPEG that
fails on the device is retried on the CPU, and one that fails there too loses its image (its
caption still trains) and is counted as ``data/repaired/bad_image_on_device``.

The same functions run with device ``cpu`` (the tests compare them with the per-sample path).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.io
from PIL import Image

from .decode import BadSample, DataError, decode_image
from .transforms import PretrainTransform, normalize_uint8, uint8_tensor

_ORIENTATION = 0x0112  # EXIF tag


@dataclass
class PendingImage:
    """An image the device will decode: JPEG bytes (1-D uint8), or (3, H, W) uint8 pixels
    where the worker had to decode; its size and, once drawn, the crop box and flip."""

    data: torch.Tensor
    height: int
    width: int
    box: tuple[int, int, int, int] | None = None  # top, left, height, width
    flip: bool = False


def check_decode_device(name: str) -> torch.device:
    """``data.decode_device`` -> a torch device, or a one-line :class:`DataError`."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"data.decode_device must be 'cpu' or 'cuda' (or 'cuda:N'), not {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"data.decode_device must be 'cpu' or 'cuda' (or 'cuda:N'), not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"data.decode_device={name} needs a CUDA GPU and this machine has none; "
                        "use data.decode_device=cpu")
    return device


def pending_image(data: bytes, key: str) -> PendingImage:
    """Raw image bytes -> :class:`PendingImage` without decoding a plain JPEG (only its header
    is read); anything else is decoded here as the CPU path would. A header that cannot be
    read raises :class:`BadSample` like a failed decode."""
    if not data:
        raise BadSample("empty_file", key)
    try:
        img = Image.open(io.BytesIO(data))
        plain = img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_ORIENTATION, 1) == 1
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ...
        raise BadSample("bad_image", key, f"{type(e).__name__}: {e}") from None
    if plain:
        w, h = img.size
        return PendingImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), h, w)
    pixels = uint8_tensor(decode_image(data, key, 0, fast_jpeg=True))
    return PendingImage(pixels, pixels.shape[1], pixels.shape[2])


class DeferredPretrainTransform(PretrainTransform):
    """:class:`PretrainTransform`'s random choices on a :class:`PendingImage`, without touching
    pixels: the same draws from torch's generator, in the same order."""

    def __call__(self, sample: dict) -> dict:
        image = sample.get("image")
        if not isinstance(image, PendingImage):
            return super().__call__(sample)
        sample = dict(sample)
        # get_params reads only the size: a zero-stride view stands in for the pixels.
        shape = torch.empty(1, dtype=torch.uint8).expand(3, image.height, image.width)
        box = tuple(int(v) for v in self.crop.get_params(shape, self.crop.scale, self.crop.ratio))
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        if flip and self.swap_captions and sample.get("caption"):
            sample["caption"] = self.swap_words(sample["caption"])
        sample["image"] = PendingImage(image.data, image.height, image.width, box, flip)
        return sample


def collate_pending(images: list) -> dict:
    """The batch fields of a list of :class:`PendingImage` (or None where a sample has no
    image): ``jpeg`` (list of tensors), ``jpeg_box`` (B, 4) and ``jpeg_flip`` (B,)."""
    empty = torch.zeros(0, dtype=torch.uint8)
    return {"jpeg": [im.data if im is not None else empty for im in images],
            "jpeg_box": torch.tensor([im.box if im is not None else (0, 0, 0, 0) for im in images], dtype=torch.long),
            "jpeg_flip": torch.tensor([bool(im is not None and im.flip) for im in images])}


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # decode_jpeg: deprecated since 0.29
        try:
            return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB).to(device, non_blocking=True)
        except RuntimeError:
            return None


class DeviceDecoder:
    """Turns a collated batch's ``jpeg*`` fields into ``image`` (B, 3, S, S) float32 on
    ``device``, normalised as the CPU path does; see the module docstring."""

    def __init__(self, image_size: int, device: torch.device | str):
        self.size, self.device = image_size, torch.device(device)

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """JPEG bytes -> uint8 (3, H, W) on the device, batched; None where even the CPU fails."""
        if not data:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                                       device=self.device))
            except RuntimeError:  # one bad file fails the whole call: find it one by one
                return [_decode_one(d, self.device) for d in data]

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        data, boxes, flips = batch.pop("jpeg"), batch.pop("jpeg_box").tolist(), batch.pop("jpeg_flip").tolist()
        valid = batch.get("image_valid")
        present = [True] * len(data) if valid is None else valid.tolist()
        encoded = [i for i, d in enumerate(data) if present[i] and d.dim() == 1]
        pixels = dict(zip(encoded, self.decode([data[i] for i in encoded])))
        out = torch.zeros(len(data), 3, self.size, self.size, device=self.device)
        events = list(batch.get("data_events", ()))
        for i, d in enumerate(data):
            if not present[i]:
                continue
            img = pixels[i] if i in pixels else d.to(self.device, non_blocking=True)
            if img is None:
                present[i] = False
                events.append(("fix", "bad_image_on_device", batch["key"][i]))
                continue
            top, left, h, w = boxes[i]
            crop = img[None, :, top:top + h, left:left + w].float()
            x = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 255).round_()
            out[i] = x[0].flip(-1) if flips[i] else x[0]
        out = normalize_uint8(out)
        if not all(present):
            out[~torch.tensor(present, device=self.device)] = 0  # as the collator pads a missing image
        batch["image"] = out
        batch["image_valid"] = None if all(present) else torch.tensor(present)
        batch["data_events"] = events
        return batch
