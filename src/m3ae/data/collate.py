"""Samples -> batches: stacks images, tokenises captions, marks missing modalities.

A batch is a dict with:
- ``image`` (B, 3, H, W) or None when no sample has an image;
- ``image_valid`` (B,) bool, or None when every sample has an image;
- ``text`` (B, T) long and ``text_padding_mask`` (B, T) bool (True = padding), or None when
  no sample has a caption (a sample without one is all padding);
- ``label`` (B,) long (-1 where unknown) and ``key`` (list of str);
- ``num_read`` (int): samples read for this batch, including skipped ones (not the markers
  of damaged shards, which are no samples);
- ``data_events`` (list of ``(kind, reason, key)``, kind "skip" or "fix"): what went wrong
  while reading them, carried back from the worker process to the loader's counter;
- ``jpeg``, ``jpeg_box``, ``jpeg_flip`` instead of ``image`` with ``data.decode_device`` set
  (:mod:`m3ae.data.device_decode`; the loader decodes them before yielding the batch);
- ``stream_pos`` ``(worker id, items handed out)`` for stream sources (resume bookkeeping).

Samples marked as skipped (``_skip``) are left out, so a batch can be smaller than asked for,
or empty (``key == []``; the loader does not yield those).
"""
from __future__ import annotations

import torch

from ..tokenizer import TextTokenizer
from .device_decode import PendingImage, collate_pending


class Collator:
    def __init__(self, text_tokenizer: TextTokenizer | None):
        self.text_tokenizer = text_tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        events = [e for s in samples for e in s.get("_events", ())]
        positions = [s["_pos"] for s in samples if "_pos" in s]
        num_read = sum(not s.get("_marker") for s in samples)  # a damaged shard's marker is no sample
        samples = [s for s in samples if "_skip" not in s]
        batch: dict = {"key": [s.get("key", "") for s in samples], "num_read": num_read, "data_events": events}
        if positions:  # one worker builds a whole batch, so they share the worker id
            batch["stream_pos"] = max(positions)
        images = [s.get("image") for s in samples]
        present = [im is not None for im in images]
        if any(isinstance(im, PendingImage) for im in images):  # decoded later, on the device
            batch.update(collate_pending(images))
            batch["image"] = None
            batch["image_valid"] = None if all(present) else torch.tensor(present)
        elif any(present):
            ref = next(im for im in images if im is not None)
            batch["image"] = torch.stack([im if im is not None else torch.zeros_like(ref) for im in images])
            batch["image_valid"] = None if all(present) else torch.tensor(present)
        else:
            batch["image"] = batch["image_valid"] = None
        captions = [s.get("caption") for s in samples]
        if self.text_tokenizer is not None and any(c for c in captions):
            ids, pad = self.text_tokenizer([c or "" for c in captions], warn=False)  # cut silently, as documented
            batch["text"], batch["text_padding_mask"] = ids, pad
        else:
            batch["text"] = batch["text_padding_mask"] = None
        batch["label"] = torch.tensor([int(s.get("label", -1)) for s in samples], dtype=torch.long)
        return batch


def model_inputs(batch: dict, device: torch.device | str) -> dict:
    """The tensors of a batch that :class:`m3ae.M3AE` takes, moved to ``device``."""
    out = {}
    for name in ("image", "text", "text_padding_mask", "image_valid"):
        t = batch.get(name)
        out[name] = None if t is None else t.to(device, non_blocking=True)
    return out
