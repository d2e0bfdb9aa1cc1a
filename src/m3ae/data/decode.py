"""Robust decoding of one sample's image and caption, and counting of what went wrong.

Bad input never crashes a run and is never silent. A sample that cannot be used raises
:class:`BadSample` with a short reason (``bad_image``, ``missing_file`` ...) and its key; the
loader turns that into a counted skip. A sample that can be used after a repair (a non-UTF-8
caption decoded with replacement characters, a 100 kB caption truncated, an empty caption
dropped so the image trains alone) is kept and the repair is counted. Both end up in a
:class:`SkipCounter`, which the loader fills in the main process (data-loader workers attach
their events to the batches they return, since they run in other processes).
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision.io
from PIL import Image, ImageOps

log = logging.getLogger("m3ae.data")


class BadSample(Exception):
    """A sample that must be skipped: ``reason`` is a short counter name, ``key`` names it.

    ``sample=False`` marks damage that is not a sample of its own (a cut or unreadable
    shard): it is counted per shard, but not as a sample read or skipped."""

    def __init__(self, reason: str, key: str, detail: str = "", sample: bool = True):
        super().__init__(f"{reason}: {key}" + (f" ({detail})" if detail else ""))
        self.reason, self.key, self.detail, self.sample = reason, key, detail, sample


class DataError(ValueError):
    """A data problem that stops the run: a misconfigured or empty source, or too many skips.

    A ``ValueError`` so that the CLI reports it as one line instead of a traceback."""


class DataNotFound(FileNotFoundError):
    """A configured path, file or shard pattern that does not exist or matches nothing."""




def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparent pixels are composited on white, as a
    browser shows them (their stored colour is often arbitrary); 16/32-bit greyscale is
    scaled to 8 bits rather than clipped, which would turn most 16-bit images white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes | str | os.PathLike, key: str, min_side: int = 0,
                 fast_jpeg: bool = False) -> Image.Image | torch.Tensor:
    """Bytes or a file path -> upright 8-bit RGB PIL image, or :class:`BadSample`.

    ``min_side`` > 0 lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling via
    ``Image.draft``) as long as the shorter side stays >= ``min_side``: a 4000 px photo cropped
    to 224 px need not be decoded at full size, which is most of the cost. EXIF orientation
    is applied, so phone photos are upright.

    ``fast_jpeg``: a plain JPEG (RGB or greyscale, not reduced) is decoded by
    ``torchvision.io.decode_jpeg`` straight into a uint8 (3, H, W) tensor: the same
    libjpeg-turbo decoder with the same settings (identical pixels), minus Pillow's copies.
    Anything else, and any JPEG that decoder refuses, takes the Pillow path and stays a PIL
    image (the transforms take both).
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise BadSample("missing_file", key, str(path))
        if path.stat().st_size == 0:
            raise BadSample("empty_file", key, str(path))
        if fast_jpeg:
            data = path.read_bytes()
    elif not data:
        raise BadSample("empty_file", key)
    src = data if isinstance(data, (str, os.PathLike)) else io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Pillow refuses images above ~179 MP by raising; below that it only warns. A web
            # crawl has a few such files; they are decoded (reduced when a JPEG), not attacks.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
        reduced = False
        if min_side and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / min_side
            if scale >= 2:  # draft picks the largest reduction keeping both sides >= requested
                img.draft(img.mode, (int(w / scale) + 1, int(h / scale) + 1))
                reduced = True
        if fast_jpeg and not reduced and img.format == "JPEG" and img.mode in ("RGB", "L"):
            tensor = _torchvision_jpeg(data)
            if tensor is not None:
                return tensor
        img.load()  # a truncated or corrupt file raises here
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright image
        return _to_rgb(img)
    except BadSample:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ...
        raise BadSample("bad_image", key, f"{type(e).__name__}: {e}") from None


def _torchvision_jpeg(data: bytes) -> torch.Tensor | None:
    """JPEG bytes -> upright uint8 (3, H, W) RGB tensor, or None where torchvision cannot
    (a corrupt or truncated file, which Pillow then reports; a torchvision without
    ``decode_jpeg``, deprecated since 0.29 in favour of TorchCodec)."""
    decode_jpeg = getattr(torchvision.io, "decode_jpeg", None)
    if decode_jpeg is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            return None


def clean_caption(raw, key: str, max_chars: int, events: list) -> str | None:
    """Bytes or str -> one-line caption, or None when there is no text.

    Non-UTF-8 bytes are decoded with U+FFFD replacement characters and counted
    (``caption_not_utf8``): the rest of the caption is usually fine, and dropping the sample
    would bias the data against non-English sources that use legacy encodings. Whitespace runs
    (including newlines) become one space. Captions longer than ``max_chars`` are cut at a word
    boundary and counted (``caption_truncated``); the tokenizer would cut them later anyway,
    but tokenising 100 kB of text is slow. Empty or whitespace-only captions become None and
    are counted (``empty_caption``): the sample still trains its image.
    """
    if raw is None:
        return None
    if isinstance(raw, np.ndarray):
        raw = raw.tobytes()
    if isinstance(raw, (bytes, bytearray, np.bytes_, np.void)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            events.append(("fix", "caption_not_utf8", key))
    else:
        text = str(raw)
    text = text.replace("\x00", " ")
    if len(text) > 8 * max_chars:  # don't split 100 kB just to keep 1 kB
        text = text[: 8 * max_chars]
    text = " ".join(text.split())
    if not text:
        events.append(("fix", "empty_caption", key))
        return None
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > max_chars // 2 else max_chars]
        events.append(("fix", "caption_truncated", key))
    return text


class SkipCounter:
    """Counts of skipped samples, of repairs and of damaged shards, per reason, with the first
    few offending keys of each reason.

    An event is ``(kind, reason, key)``: kind ``"skip"`` (a sample read and dropped), ``"fix"``
    (a sample repaired and kept) or ``"shard"`` (a shard that was cut or could not be opened:
    not a sample, so it is not counted in :attr:`seen`). The loader calls :meth:`add` with the
    events each batch carries; :meth:`metrics`, :meth:`postfix` and :meth:`summary` report
    them, and :meth:`merged` adds up the counters of several ranks. :meth:`check` raises
    :class:`DataError` once more than ``max_fraction`` of the samples read were skipped
    (judged from ``min_seen`` samples on, and at every epoch end whatever the number).
    """

    max_examples = 3  # keys kept per reason: enough to find the files, bounded in size

    def __init__(self, source: str = "", max_fraction: float = 1.0, min_seen: int = 200):
        self.source, self.max_fraction, self.min_seen = source, max_fraction, min_seen
        self.seen = 0
        self.skipped: Counter = Counter()
        self.fixed: Counter = Counter()
        self.shards: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, events, seen: int = 0) -> None:
        self.seen += seen
        for kind, reason, key in events:
            {"skip": self.skipped, "fix": self.fixed, "shard": self.shards}[kind][reason] += 1
            keys = self.examples.setdefault(reason, [])
            first = not keys
            if len(keys) < self.max_examples and key not in keys:  # a bad file recurs every epoch
                keys.append(key)
            # The first of each reason is a warning; the rest are counted, and named at DEBUG.
            level = logging.DEBUG if not first else logging.INFO if kind == "fix" else logging.WARNING
            log.log(level, "%s %s: %s", {"skip": "skipped sample", "fix": "repaired sample",
                                         "shard": "damaged shard"}[kind], reason, key)

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "fixed": dict(self.fixed),
                "shards": dict(self.shards), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self.skipped, self.fixed = Counter(state["skipped"]), Counter(state["fixed"])
        self.shards = Counter(state.get("shards", {}))
        # Checkpoints of earlier versions kept one example key per reason, as a string.
        self.examples = {k: [v] if isinstance(v, str) else list(v) for k, v in state["examples"].items()}

    @classmethod
    def merged(cls, states: list[dict], source: str = "") -> SkipCounter:
        """One counter for several (ranks' counters' ``state_dict()``s): counts add up."""
        total = cls(source)
        for st in states:
            total.seen += st["seen"]
            for name in ("skipped", "fixed", "shards"):
                getattr(total, name).update(st.get(name, {}))
            for reason, keys in st["examples"].items():
                have = total.examples.setdefault(reason, [])
                for key in [keys] if isinstance(keys, str) else keys:
                    if len(have) < cls.max_examples and key not in have:
                        have.append(key)
        return total

    def metrics(self) -> dict:
        """Numbers for a metrics row: ``data/seen`` (samples read), ``data/skipped`` and
        ``data/skipped/<reason>`` (their sum), ``data/repaired/<reason>``,
        ``data/damaged_shards/<reason>``, and ``data/examples`` (reason -> first keys)."""
        out = {"data/seen": self.seen, "data/skipped": self.num_skipped}
        out.update({f"data/skipped/{k}": v for k, v in sorted(self.skipped.items())})
        out.update({f"data/repaired/{k}": v for k, v in sorted(self.fixed.items())})
        out.update({f"data/damaged_shards/{k}": v for k, v in sorted(self.shards.items())})
        if self.examples:
            out["data/examples"] = {k: list(v) for k, v in sorted(self.examples.items())}
        return out

    def postfix(self) -> str:
        """Short per-reason counts for a progress bar ("" when nothing went wrong)."""
        parts = [f"{r} {n}" for r, n in self.skipped.most_common()]
        parts += [f"{r} {n}" for r, n in self.shards.most_common()]
        return ", ".join(parts)

    def summary(self) -> str:
        if not (self.skipped or self.fixed or self.shards):
            return f"read {self.seen}, nothing skipped"
        parts = [f"read {self.seen}, skipped {self.num_skipped} "
                 f"({100 * self.num_skipped / max(self.seen, 1):.2f}%)"]
        parts += [f"{r} {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in self.skipped.most_common()]
        if self.shards:
            parts.append("damaged shards: " + ", ".join(
                f"{r} {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in self.shards.most_common()))
        if self.fixed:
            parts.append("repaired: " + ", ".join(f"{r} {n}" for r, n in self.fixed.most_common()))
        return "; ".join(parts)

    def check(self, force: bool = False) -> None:
        if self.seen == 0 or (self.seen < self.min_seen and not force):
            return
        if self.num_skipped > self.max_fraction * self.seen:
            raise DataError(f"data source {self.source}: {self.num_skipped} of {self.seen} samples were "
                            f"skipped, more than data.max_skip_fraction={self.max_fraction}: "
                            f"{self.summary()}. Fix the data or raise data.max_skip_fraction.")
