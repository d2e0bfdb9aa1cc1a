"""data.image_backend: the uint8 tensor path (torchvision JPEG decode, uint8 crop/resize/flip,
float last) against the Pillow path: same crops and flips, pixels within a stated tolerance,
same handling of awkward and bad files, and used when (and only when) configured."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

import m3ae.data.decode as decode_mod
from helpers import image_bytes, write_tar
from m3ae.config import DataConfig
from m3ae.data import build_dataset, build_text_tokenizer
from m3ae.data.decode import BadSample, decode_image
from m3ae.data.sources import open_indexed_source
from m3ae.data.transforms import IMAGENET_STD, EvalTransform, PretrainTransform
from m3ae.data.webdataset import ShardSource

ROOT = Path(__file__).resolve().parents[2]
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def photo_like(size=(500, 375), seed=0) -> bytes:
    """A smooth image with edges (blurred noise + gradients), JPEG quality 90."""
    rng = np.random.default_rng(seed)
    w, h = size
    noise = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.NEAREST)
    arr = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    arr = 0.7 * arr + 0.3 * np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.mark.parametrize("kind", ["rgb", "grey", "exif6"])
def test_fast_jpeg_gives_pillows_pixels_as_a_uint8_tensor(kind):
    data = image_bytes(kind, size=(40, 30))
    fast = decode_image(data, "k", fast_jpeg=True)
    assert isinstance(fast, torch.Tensor) and fast.dtype == torch.uint8
    assert torch.equal(fast, as_tensor(decode_image(data, "k")))  # exif6: upright, (3, 40, 30)


@pytest.mark.parametrize("kind", ["cmyk", "palette", "rgba", "16bit"])
def test_other_images_keep_the_pillow_path(kind):
    fast, plain = decode_image(image_bytes(kind), "k", fast_jpeg=True), decode_image(image_bytes(kind), "k")
    assert isinstance(fast, Image.Image) and np.array_equal(np.asarray(fast), np.asarray(plain))


def test_reduced_decode_and_files_with_fast_jpeg(tmp_path):
    big = image_bytes("rgb", size=(1600, 1200))
    assert decode_image(big, "k", min_side=100, fast_jpeg=True).size == (200, 150)  # Pillow's draft
    (tmp_path / "a.jpg").write_bytes(image_bytes("rgb", size=(40, 30)))
    assert torch.equal(decode_image(tmp_path / "a.jpg", "a", fast_jpeg=True),
                       as_tensor(decode_image(tmp_path / "a.jpg", "a")))
    with pytest.raises(BadSample, match="missing_file"):
        decode_image(tmp_path / "nope.jpg", "nope.jpg", fast_jpeg=True)


def compare_backends(jpegs: list[bytes], monkeypatch, image_size=64, seeds=(0, 1, 2)) -> list[dict]:
    """Both backends on the same seeds: crop boxes, flips, and pixel differences in 1/255."""
    boxes: list = []
    draw = RandomResizedCrop.get_params

    def spy(img, scale, ratio):
        boxes.append(draw(img, scale, ratio))
        return boxes[-1]
    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(spy))
    pil, fast = PretrainTransform(image_size, backend="pil"), PretrainTransform(image_size)
    out = []
    for data, seed in itertools.product(jpegs, seeds):
        sample = {"caption": "a dog on the left"}
        torch.manual_seed(seed)
        a = pil(dict(sample, image=decode_image(data, "k")))
        torch.manual_seed(seed)
        b = fast(dict(sample, image=decode_image(data, "k", fast_jpeg=True)))
        torch.manual_seed(seed)
        c = fast(dict(sample, image=decode_image(data, "k")))  # a PIL image on the tensor path
        assert torch.equal(b["image"], c["image"])
        diff = (a["image"] - b["image"]).abs() * STD * 255  # back to 0..255 pixel units
        out.append(dict(box_pil=boxes[-3], box_tensor=boxes[-2], caption=(a["caption"], b["caption"]),
                        mean=diff.mean().item(), over=(diff > 2.5).float().mean().item()))
    return out


def check_close(rows: list[dict], both_flips: bool = True) -> None:
    for r in rows:
        assert r["box_pil"] == r["box_tensor"] and r["caption"][0] == r["caption"][1]
        # Measured on the 239 COCO photos at 256 px: mean 0.036/255, worst image 0.27/255.
        assert r["mean"] < 0.5 and r["over"] < 0.01, r
    assert np.mean([r["mean"] for r in rows]) < 0.15
    if both_flips:
        assert {r["caption"][0] for r in rows} == {"a dog on the left", "a dog on the right"}


def test_tensor_backend_matches_pil_on_a_photo_like_image(monkeypatch):
    check_close(compare_backends([photo_like(seed=0), photo_like((375, 500), seed=1)], monkeypatch,
                                 seeds=range(4)))


def test_tensor_backend_matches_pil_on_coco_photos(shared_data, monkeypatch):
    src = ShardSource(str(shared_data / "coco-mini" / "all-000000.tar.gz"))
    jpegs = [r["jpg"] for r in itertools.islice(src.items(0, 0, 1, 0), 4)]
    check_close(compare_backends(jpegs, monkeypatch, image_size=256, seeds=(0, 1)), both_flips=False)


def test_eval_transform_backends_agree():
    img = decode_image(photo_like(), "k")
    a = EvalTransform(64, backend="pil")({"image": img})["image"]
    b = EvalTransform(64)({"image": img})["image"]
    assert a.shape == b.shape == (3, 64, 64) and ((a - b).abs() * STD * 255).mean() < 0.15


def test_image_backend_is_used_when_configured(tmp_path, monkeypatch):
    calls = []
    real = decode_mod._torchvision_jpeg
    monkeypatch.setattr(decode_mod, "_torchvision_jpeg", lambda data: calls.append(1) or real(data))
    write_tar(tmp_path / "s-000000.tar", [m for i in range(4) for m in (
        (f"k{i}.jpg", photo_like((80, 60), seed=i)), (f"k{i}.txt", b"a cat on the left"))])
    images = {}
    for backend in ("tensor", "pil"):
        cfg = DataConfig(source="webdataset", urls=str(tmp_path / "s-000000.tar"), image_backend=backend)
        ds = build_dataset(cfg, 32)
        assert ds.components[0][0].fast_jpeg == (backend == "tensor")
        calls.clear()
        torch.manual_seed(0)
        images[backend] = torch.stack([s["image"] for s in ds])
        assert len(calls) == (4 if backend == "tensor" else 0)
    assert ((images["tensor"] - images["pil"]).abs() * STD * 255).mean() < 0.5
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes("rgb"))
    assert open_indexed_source(DataConfig(source="imagefolder", urls=str(tmp_path / "img"))).fast_jpeg
    with pytest.raises(ValueError, match="data.image_backend must be 'tensor' or 'pil'"):
        build_dataset(dataclasses.replace(cfg, image_backend="cv2"), 32)


def test_data_benchmark_times_the_loaders_stages(tmp_path):
    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "benchmarks" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_tar(tmp_path / "s-000000.tar", [m for i in range(6) for m in (
        (f"k{i}.jpg", photo_like((80, 60), seed=i)), (f"k{i}.txt", f"caption number {i}".encode()))])
    cfg = DataConfig(source="webdataset", urls=str(tmp_path / "s-000000.tar"), tokenizer="from-data",
                     tokenizer_vocab_size=100)
    raws, read = bench.read_raw(cfg, 100)
    assert len(raws) == 6 and read[0] >= 0
    times = bench.stage_times(cfg, 32, raws, build_text_tokenizer(cfg), batch_size=4)
    assert set(times) == set(bench.STAGES) | {"sum of stages", "whole (as the loader)"}
    assert all(cpu >= 0 and wall > 0 for cpu, wall in times.values())
