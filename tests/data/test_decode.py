"""Bad input: every awkward image kind decodes to upright RGB or becomes a counted skip."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes
from m3ae.data.decode import BadSample, DataError, SkipCounter, clean_caption, decode_image
from m3ae.data.transforms import PretrainTransform


@pytest.mark.parametrize("kind", ["rgb", "grey", "cmyk", "palette"])
def test_modes_become_rgb(kind):
    img = decode_image(image_bytes(kind), "k")
    assert img.mode == "RGB" and img.size == (40, 30)


def test_rgba_is_composited_on_white():
    # A fully transparent pixel shows the background, whatever colour it stores.
    arr = np.asarray(decode_image(image_bytes("rgba"), "k"))
    assert arr.min() == 255


def test_16bit_is_scaled_not_clipped():
    arr = np.asarray(decode_image(image_bytes("16bit"), "k"))
    assert arr.shape == (30, 40, 3) and abs(int(arr[0, 0, 0]) - 127) <= 1  # 32767/65535 of 255


def test_exif_orientation_applied():
    assert decode_image(image_bytes("exif6"), "k").size == (30, 40)  # stored 40x30, rotated


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"this is not an image at all", "bad_image"),
    (image_bytes("rgb", size=(64, 64))[:300], "bad_image"),  # truncated JPEG
    (b"\xff\xd8\xff" + bytes(200), "bad_image"),  # corrupt JPEG header
])
@pytest.mark.parametrize("fast_jpeg", [False, True])  # the torchvision path reports them alike
def test_bad_bytes_raise_bad_sample(data, reason, fast_jpeg):
    with pytest.raises(BadSample) as e:
        decode_image(data, "key-1", fast_jpeg=fast_jpeg)
    assert e.value.reason == reason and e.value.key == "key-1"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(BadSample, match="missing_file"):
        decode_image(tmp_path / "nope.jpg", "nope.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(BadSample, match="empty_file"):
        decode_image(tmp_path / "zero.jpg", "zero.jpg")


def test_reduced_size_jpeg_decode():
    big = image_bytes("rgb", size=(1600, 1200))
    assert decode_image(big, "k").size == (1600, 1200)
    # Shorter side 1200 needs >= 100: libjpeg can go to 1/8 (150) but not further.
    assert decode_image(big, "k", min_side=100).size == (200, 150)
    assert decode_image(big, "k", min_side=700).size == (1600, 1200)  # 1/2 would be 600 < 700


def test_image_smaller_than_crop_is_upsampled():
    img = Image.open(io.BytesIO(image_bytes("rgb", size=(8, 6)))).convert("RGB")
    out = PretrainTransform(32)({"key": "k", "image": img, "caption": "a left cat", "label": -1})
    assert out["image"].shape == (3, 32, 32)


def test_captions():
    events: list = []
    assert clean_caption(b"  a  dog\non\tgrass ", "k", 100, events) == "a dog on grass"
    assert clean_caption("   \n ", "k", 100, events) is None
    assert clean_caption(b"caf\xe9 au lait", "k", 100, events) == "caf\ufffd au lait"
    long = ("word " * 20_000).encode()  # 100 kB
    cut = clean_caption(long, "k", 1000, events)
    assert len(cut) <= 1000 and cut.endswith("word") and len(cut) > 990
    assert [e[1] for e in events] == ["empty_caption", "caption_not_utf8", "caption_truncated"]
    assert all(e[0] == "fix" for e in events)


def test_skip_counter_threshold_names_source():
    c = SkipCounter("table 'x.csv'", max_fraction=0.1, min_seen=10)
    c.add([("skip", "bad_image", "a.jpg")], seen=5)
    c.check()  # too few samples seen to judge
    c.add([("skip", "missing_file", "b.jpg"), ("fix", "empty_caption", "c.jpg")], seen=5)
    assert c.num_skipped == 2 and c.seen == 10 and c.fixed["empty_caption"] == 1
    assert "bad_image 1 (e.g. a.jpg)" in c.summary()
    with pytest.raises(DataError, match=r"table 'x.csv': 2 of 10 samples were skipped"):
        c.check()
    c2 = SkipCounter("s", 0.5, 10)
    c2.load_state_dict(c.state_dict())
    assert c2.metrics()["data/skipped/missing_file"] == 1
