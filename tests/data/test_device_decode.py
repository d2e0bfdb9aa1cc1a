"""data.decode_device: the batched decode-and-augment path (run here with device cpu) gives the
per-sample path's crops, flips, captions and pixels; awkward files fall back; without CUDA the
option is a one-line error. The CUDA run itself is tests/gpu/test_gpu.py::test_gpu_jpeg_decode."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import m3ae.data.builders as data_mod
from helpers import image_bytes, pair_shards
from m3ae.config import DataConfig
from m3ae.data import DataError, build_dataset, build_pretrain_loader
from m3ae.data.decode import decode_image
from m3ae.data.device_decode import (DeferredPretrainTransform, DeviceDecoder,
                                     check_decode_device, collate_pending, pending_image)
from m3ae.data.transforms import IMAGENET_STD, PretrainTransform
from m3ae.tokenizer import SPECIAL_TOKENS, TextTokenizer, from_vocab

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
TOL_MAX, TOL_MEAN = 1.01, 0.25  # pixel levels (of 255), photo-like images


def smooth_jpeg(size, seed: int = 0, mode: str = "RGB") -> bytes:
    """A photo-like JPEG (blurred noise over a gradient): pixel noise is no photo, and bicubic
    overshoot on it exaggerates how far the two resize kernels' roundings drift apart."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray(rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)).resize((w, h))
    arr = 0.7 * np.asarray(img.filter(ImageFilter.GaussianBlur(2)), np.float32) + \
        0.3 * np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _both_paths(blobs: list[bytes], captions: list[str], size: int, seed: int):
    """(per-sample images, captions), (batched images, captions), for the same seed."""
    per = PretrainTransform(size, hflip=0.5)
    torch.manual_seed(seed)
    a = [per({"image": decode_image(b, "k", fast_jpeg=True), "caption": c}) for b, c in zip(blobs, captions)]
    deferred = DeferredPretrainTransform(size, hflip=0.5)
    torch.manual_seed(seed)
    b = [deferred({"image": pending_image(x, "k"), "caption": c}) for x, c in zip(blobs, captions)]
    batch = {"key": [f"k{i}" for i in range(len(b))], "image_valid": None, "data_events": [],
             **collate_pending([s["image"] for s in b])}
    out = DeviceDecoder(size, "cpu")(batch)
    return (torch.stack([s["image"] for s in a]), [s["caption"] for s in a]), (out["image"], [s["caption"] for s in b])


def test_batched_path_equals_the_per_sample_path():
    blobs = [smooth_jpeg((97, 61), seed=i) for i in range(6)] + [smooth_jpeg((40, 50), mode="L")]
    captions = [f"a cat on the left {i}" for i in range(len(blobs))]
    for seed in range(3):
        (ref, ref_caps), (got, got_caps) = _both_paths(blobs, captions, 32, seed)
        assert got_caps == ref_caps and any("right" in c for c in got_caps)  # flips happened, words swapped
        diff = ((got - ref) * STD * 255).abs()  # in pixel levels
        # float bicubic rounded vs torch's fixed-point uint8 kernel (which rounds between its
        # horizontal and vertical passes): one level at most, on a fifth of the pixels or fewer
        assert diff.max() <= TOL_MAX and diff.mean() < TOL_MEAN, (diff.max(), diff.mean())


def test_files_the_device_cannot_take_are_decoded_in_the_worker():
    for kind in ("cmyk", "exif6", "palette"):
        p = pending_image(image_bytes(kind, (40, 30)), "k")
        assert p.data.dim() == 3 and p.data.dtype == torch.uint8  # pixels, upright
        assert (p.height, p.width) == ((40, 30) if kind == "exif6" else (30, 40))
    p = pending_image(image_bytes("rgb", (40, 30)), "k")
    assert p.data.dim() == 1 and (p.height, p.width) == (30, 40)  # bytes; only the header was read
    (ref, _), (got, _) = _both_paths([image_bytes("exif6", (40, 30)), image_bytes("cmyk", (40, 30))],
                                     ["x", "y"], 16, 0)
    assert ((got - ref) * STD * 255).abs().max() <= 16  # pixel noise: the kernels' worst case


def test_a_jpeg_that_fails_to_decode_loses_its_image_and_is_counted():
    good = smooth_jpeg((200, 150))
    cut = good[: len(good) // 2]  # the header parses; the data is cut short
    torch.manual_seed(0)
    t = DeferredPretrainTransform(16)
    samples = [t({"image": pending_image(x, "k"), "caption": "c"}) for x in (good, cut)]
    batch = {"key": ["good", "cut"], "image_valid": None, "data_events": [],
             **collate_pending([s["image"] for s in samples])}
    out = DeviceDecoder(16, "cpu")(batch)
    if out["image_valid"] is None:  # this libjpeg decoded the cut file (grey rows): nothing to count
        return
    assert out["image_valid"].tolist() == [True, False]
    assert out["data_events"] == [("fix", "bad_image_on_device", "cut")]
    assert out["image"][1].abs().max() == 0 and out["image"][0].abs().max() > 0


def test_without_cuda_the_option_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    urls = pair_shards(tmp_path / "s", 1, 4)
    with pytest.raises(DataError, match=r"^data.decode_device=cuda needs a CUDA GPU[^\n]*$"):
        build_dataset(DataConfig(source="webdataset", urls=urls, decode_device="cuda"), 16)
    with pytest.raises(DataError, match="must be 'cpu' or 'cuda'"):
        check_decode_device("gpu")
    with pytest.raises(DataError, match="webdataset only"):
        data_mod._on_device(DataConfig(source="synthetic", decode_device="cpu:0"), True)
    # Evaluation (train=False) decodes as before: the option is for pre-training streams.
    build_dataset(DataConfig(source="webdataset", urls=urls, decode_device="cuda"), 16, train=False)


def test_the_loader_hands_over_bytes_and_yields_decoded_batches(tmp_path, monkeypatch):
    """The wiring, with the batched path on the CPU: the workers' batches carry JPEG bytes, the
    loader yields images equal to the per-sample loader's, same keys, same skip counts."""
    urls = pair_shards(tmp_path / "s", 2, 6)
    enc = TextTokenizer(from_vocab(list(SPECIAL_TOKENS) + ["caption"] + [str(i) for i in range(10)]), 8)
    base = DataConfig(source="webdataset", urls=urls, shuffle_buffer=4)

    def batches(cfg):
        torch.manual_seed(0)
        loader = build_pretrain_loader(cfg, 16, enc, 4, seed=1)
        return list(loader), loader
    ref, _ = batches(base)
    monkeypatch.setattr(data_mod, "_on_device", lambda cfg, train: train)  # decode_device "cpu", batched
    got, loader = batches(dataclasses.replace(base))
    assert isinstance(loader.device_decoder, DeviceDecoder)
    assert [b["key"] for b in got] == [b["key"] for b in ref]
    for a, b in zip(ref, got):
        assert "jpeg" not in b and ((a["image"] - b["image"]) * STD * 255).abs().max() <= 16  # noise images
        assert torch.equal(a["text"], b["text"])
    assert loader.skips.seen == 12
