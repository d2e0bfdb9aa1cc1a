"""The in-memory image cache: building it, reading it back, its batched augmentation and its
loader's order, resume and captions."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from m3ae.data import DataError, DataNotFound
from m3ae.data.cache import (CacheLoader, ImageCache, build_cache, crop_boxes, crop_resize_flip,
                             source_config)
from m3ae.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from helpers import hostile_shards, image_bytes, pair_shards, write_tar


class _Words:
    """A whitespace tokenizer standing in for WordPiece (the loader only calls it)."""

    def __init__(self, text_len: int = 6):
        self.text_len, self.pad_id, self.vocab = text_len, 0, {}

    def __call__(self, captions):
        ids = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        pad = torch.ones(len(captions), self.text_len, dtype=torch.bool)
        for i, c in enumerate(captions):
            toks = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in c.split()][: self.text_len]
            ids[i, : len(toks)], pad[i, : len(toks)] = torch.tensor(toks), False
        return ids, pad


@pytest.fixture
def cache_dir(tmp_path):
    urls = pair_shards(tmp_path / "shards", 2, 10)
    build_cache([source_config(urls)], tmp_path / "cache", 16, progress=False)
    return tmp_path / "cache"


def _normalised(u8_hwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(u8_hwc)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ------------------------------------------------------------------------------ building
def test_build_keeps_every_sample_with_its_caption_label_and_pixels(cache_dir, tmp_path):
    from m3ae.data.decode import decode_image
    from m3ae.data.transforms import resize_center_crop_uint8

    cache = ImageCache(cache_dir)
    assert len(cache) == 20 and cache.images.shape == (20, 16, 16, 3)
    assert cache.keys[:2] == ["s0_000", "s0_001"] and cache.keys[10] == "s1_000"
    assert cache.texts[13] == "caption 1 3" and cache.labels[13] == 3 % 3 == 0 and cache.labels[14] == 1
    # The stored pixels are evaluation's resize + centre crop of the decoded JPEG, exactly.
    want = resize_center_crop_uint8(decode_image(image_bytes(seed=4, size=(16, 16)), "k"), 16)
    assert torch.equal(torch.from_numpy(np.array(cache.images[4])).permute(2, 0, 1), want)
    m = cache.manifest
    assert m["count"] == 20 and m["with_caption"] == 20 and m["with_label"] == 20
    assert m["sources"][0]["count"] == 20 and m["decode"]["seen"] == 20


def test_build_skips_and_counts_bad_samples_per_reason(tmp_path):
    urls = hostile_shards(tmp_path / "bad")
    m = build_cache([source_config(urls)], tmp_path / "cache", 8, progress=False)
    # bad-000000: 12 samples, 3 unreadable images, 1 with neither image nor text; cut-000000: 6 survive.
    assert m["count"] == 8 + 6
    assert m["decode"]["shards"] == {"corrupt_shard": 1}
    assert sum(m["decode"]["skipped"].values()) == 4 and "no_image_or_text" in m["decode"]["skipped"]
    assert "skipped" in ImageCache(tmp_path / "cache").describe()


def test_a_caption_without_its_image_is_skipped_as_no_image(tmp_path):
    write_tar(tmp_path / "t-000000.tar", [("a.jpg", image_bytes(size=(8, 8))), ("a.txt", b"one"),
                                          ("b.txt", b"a caption alone")])
    m = build_cache([source_config(str(tmp_path / "t-000000.tar"))], tmp_path / "c", 8, progress=False)
    assert m["count"] == 1 and m["decode"]["skipped"] == {"no_image": 1}


def test_build_refuses_a_folder_that_holds_a_cache_or_anything_else(cache_dir, tmp_path):
    urls = pair_shards(tmp_path / "more", 1, 2)
    with pytest.raises(FileExistsError, match="already holds a cache .20 images at 16 px"):
        build_cache([source_config(urls)], cache_dir, 16, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_cache([source_config(urls)], tmp_path / "other", 16, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_sources_are_concatenated_and_limit_stops_early(tmp_path):
    a, b = pair_shards(tmp_path / "a", 1, 5), pair_shards(tmp_path / "b", 1, 4, prefix="val")
    m = build_cache([source_config(a), source_config(b)], tmp_path / "c", 8, progress=False)
    assert m["count"] == 9 and [s["count"] for s in m["sources"]] == [5, 4]
    m = build_cache([source_config(a), source_config(b)], tmp_path / "d", 8, progress=False, limit=7)
    assert m["count"] == 7


def test_source_kind_is_guessed_or_the_guess_refused(tmp_path):
    assert source_config("x/train-{000..009}.tar").source == "webdataset"
    assert source_config("captions.tsv").source == "table"
    (tmp_path / "imgs").mkdir()
    assert source_config(str(tmp_path / "imgs")).source == "imagefolder"
    with pytest.raises(DataNotFound, match="cannot tell what"):
        source_config(str(tmp_path / "nothing-here"))
    with pytest.raises(DataError, match="built from image data"):
        source_config("t.txt", "text")


# ------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("damage, message", [
    ("truncate", "images.npy has .* bytes, the manifest says"),
    ("remove", "text.json is missing"),
    ("manifest", "not a readable cache manifest"),
    ("rows", "do not hold 20 entries"),
])
def test_a_damaged_cache_is_a_one_line_error_naming_the_file(cache_dir, damage, message):
    if damage == "truncate":
        with open(cache_dir / "images.npy", "r+b") as f:
            f.truncate(1000)
    elif damage == "remove":
        (cache_dir / "text.json").unlink()
    elif damage == "manifest":
        (cache_dir / "manifest.json").write_text("{not json")
    else:  # a text.json of another size, the manifest updated to match its bytes
        text = json.loads((cache_dir / "text.json").read_text())
        text["keys"] = text["keys"][:-1]
        (cache_dir / "text.json").write_text(json.dumps(text))
        m = json.loads((cache_dir / "manifest.json").read_text())
        m["files"]["text.json"] = (cache_dir / "text.json").stat().st_size
        (cache_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises((DataError, DataNotFound), match=message) as e:
        ImageCache(cache_dir)
    assert "\n" not in str(e.value)


def test_no_cache_there_says_how_to_build_one(tmp_path):
    with pytest.raises(DataNotFound, match="m3ae cache build"):
        ImageCache(tmp_path)


# ------------------------------------------------------------------------- augmentation
def test_crop_boxes_follow_random_resized_crop_ranges():
    g = torch.Generator().manual_seed(0)
    boxes, flipped = crop_boxes(4000, (0.2, 1.0), 0.5, g)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area, ratio = w * h, w / h
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert 0.45 < flipped.float().mean() < 0.55
    # The same generator state draws the same boxes: a resumed run gets the same crops.
    again = crop_boxes(4000, (0.2, 1.0), 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], boxes) and torch.equal(again[1], flipped)


def test_whole_box_is_the_image_and_a_flip_mirrors_it():
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = crop_resize_flip(img, whole, torch.tensor([False, True]), 8)
    ref = torch.stack([_normalised(i.numpy()) for i in img])
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref[1].flip(-1), atol=1e-5, rtol=0)


def test_a_box_is_that_crop_of_the_image_resized():
    img = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    # The bottom-right quarter at its own size is those 4 x 4 pixels, exactly.
    out = crop_resize_flip(img, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([False]), 4)
    torch.testing.assert_close(out[0], _normalised(img[0, 4:, 4:].numpy()), atol=1e-5, rtol=0)
    # Upsampled 2x it is that quarter of the whole image upsampled 2x (bilinear, half-pixel
    # centres): the crop's edge pixels blend with their neighbours outside the box.
    out = crop_resize_flip(img, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([False]), 8)
    whole = img.permute(0, 3, 1, 2).float()
    ref = torch.nn.functional.interpolate(whole, size=16, mode="bilinear", align_corners=False)[0, :, 8:, 8:]
    want = (ref / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- loader
def _loader(cache_dir, **kw):
    args = dict(image_size=16, batch_size=4, text_tokenizer=_Words(), seed=3)
    return CacheLoader(ImageCache(cache_dir), **{**args, **kw})


def test_every_sample_once_per_epoch_across_ranks_and_a_new_order_next_epoch(cache_dir):
    ranks = [_loader(cache_dir, rank=r, world_size=3) for r in range(3)]
    epochs = []
    for _ in range(2):
        keys = [k for loader in ranks for b in loader for k in b["key"]]
        assert len(keys) == len(set(keys)) == 3 * (20 // 3)  # even shares: 2 leftovers dropped
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    single = [k for b in _loader(cache_dir) for k in b["key"]]
    assert sorted(single) == sorted(ImageCache(cache_dir).keys)  # one rank reads all 20
    assert [len(b["key"]) for b in _loader(cache_dir)] == [4] * 5


def test_state_resumes_mid_epoch_with_the_same_batches(cache_dir):
    ref = _loader(cache_dir)
    ref_batches = [b for _ in range(2) for b in ref]  # two epochs
    a = _loader(cache_dir)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert state["kind"] == "map" and state["position"] == 12 and state["skips"]["seen"] == 12
    b = _loader(cache_dir)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's serialisation
    rest = list(b) + list(b)
    assert len(rest) == len(ref_batches) - 3
    for x, y in zip(rest, ref_batches[3:]):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
    assert b.skips.seen == 40


def test_a_flip_swaps_left_and_right_in_the_caption(tmp_path):
    write_tar(tmp_path / "t-000000.tar", [m for i in range(4) for m in (
        (f"k{i}.jpg", image_bytes(seed=i, size=(8, 8))), (f"k{i}.txt", b"a dog on the left"))])
    build_cache([source_config(str(tmp_path / "t-000000.tar"))], tmp_path / "c", 8, progress=False)
    words = _Words()
    words(["a dog on the left", "a dog on the right"])  # ids: a=1 dog=2 on=3 the=4 left=5 right=6
    flipped = next(iter(CacheLoader(ImageCache(tmp_path / "c"), image_size=8, batch_size=4,
                                    text_tokenizer=words, hflip=1.0)))
    kept = next(iter(CacheLoader(ImageCache(tmp_path / "c"), image_size=8, batch_size=4,
                                 text_tokenizer=words, hflip=0.0)))
    assert flipped["text"][:, 4].tolist() == [6] * 4 and kept["text"][:, 4].tolist() == [5] * 4
    no_swap = next(iter(CacheLoader(ImageCache(tmp_path / "c"), image_size=8, batch_size=4,
                                    text_tokenizer=words, hflip=1.0, swap_captions=False)))
    assert no_swap["text"][:, 4].tolist() == [5] * 4


def test_paired_fraction_drops_the_same_captions_as_streaming(cache_dir):
    from m3ae.data import keeps_caption

    none = next(iter(_loader(cache_dir, paired_fraction=0.0)))
    assert none["text"] is None and none["image"].shape == (4, 3, 16, 16)
    half = [b for b in _loader(cache_dir, paired_fraction=0.5, batch_size=20)][0]
    has = (~half["text_padding_mask"]).any(1).tolist()
    assert has == [keeps_caption(k, 0.5) for k in half["key"]] and 0 < sum(has) < 20


def test_bad_placement_and_interpolation_are_refused(cache_dir):
    with pytest.raises(DataError, match="cache_placement"):
        _loader(cache_dir, placement="gpu0")
    with pytest.raises(DataError, match="cache_interpolation"):
        _loader(cache_dir, interpolation="nearest")


def test_evaluation_reads_a_cache_as_it_reads_the_shards(tmp_path):
    from m3ae.evaluation import load_labelled, make_loader

    urls = pair_shards(tmp_path / "shards", 1, 6)
    build_cache([source_config(urls)], tmp_path / "cache", 16, progress=False)
    a = next(iter(make_loader(load_labelled(urls, 16), None, 6)))
    b = next(iter(make_loader(load_labelled(str(tmp_path / "cache"), 16), None, 6)))
    assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
    torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)


def test_cli_builds_reports_and_refuses_in_one_line(tmp_path):
    urls = pair_shards(tmp_path / "shards", 1, 3)
    cmd = [sys.executable, "-m", "m3ae", "cache", "build", urls, "-o", str(tmp_path / "c"), "--image-size", "8",
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "3 images at 8 px, 3 with captions" in p.stdout and "data.source=cache" in p.stdout
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already holds a cache" in p.stderr


def test_the_configured_loader_of_a_cache_is_the_batched_one(cache_dir):
    from m3ae.config import DataConfig
    from m3ae.data import build_dataset, build_pretrain_loader

    cfg = DataConfig(source="cache", urls=str(cache_dir), hflip=0.0)
    loader = build_pretrain_loader(cfg, 16, _Words(), 5, dataset=build_dataset(cfg, 16))
    assert isinstance(loader, CacheLoader) and not loader.on_device  # no GPU here: host memory
    assert [len(b["key"]) for b in loader] == [5] * 4


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3)])
def test_resumed_on_another_process_count_every_sample_is_read_once(cache_dir, old, new):
    """The trainer's conversion of a map position (m3ae.data.loader.convert_map_position)
    holds for the cache's loader: the epoch's samples read before and after, once each."""
    from m3ae.data.loader import convert_map_position

    before = [_loader(cache_dir, rank=r, world_size=old, batch_size=2) for r in range(old)]
    read = []
    for loader in before:
        it = iter(loader)
        read += next(it)["key"] + next(it)["key"]  # two batches on every rank
    pos = convert_map_position([json.loads(json.dumps(b.state_dict())) for b in before], new)
    after = [_loader(cache_dir, rank=r, world_size=new, batch_size=2) for r in range(new)]
    for r, loader in enumerate(after):
        loader.load_state_dict({**pos, "kind": "map", "world_size": new, "rank": r,
                                "skips": before[0].skips.state_dict()})
        read += [k for b in loader for k in b["key"]]
    assert len(read) == len(set(read)) and len(read) >= 20 - new  # only the even-split leftovers go
