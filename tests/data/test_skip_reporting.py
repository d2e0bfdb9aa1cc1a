"""Issue 13, cases 1 and 2: skipped samples are counted per reason with example keys, for every
source, summed over loader workers and ranks, and reported in metrics.jsonl, the progress bar
and the run's final line; a cut shard is one damaged shard, not samples."""
from __future__ import annotations

import pytest

from helpers import hostile_shards, hostile_table, image_bytes
from m3ae.config import DataConfig
from m3ae.data import SkipCounter, build_pretrain_loader

# The hostile table: rows 2 and 5 bad images, 9 a truncated JPEG, 7 empty, 11 missing.
TABLE_SKIPS = {"bad_image": 3, "empty_file": 1, "missing_file": 1}
# The hostile shards: 12 samples in bad-000000.tar (a003, a004 junk, a005 empty, a007 nothing).
SHARD_SKIPS = {"bad_image": 2, "empty_file": 1, "no_image_or_text": 1}


def read_all(cfg, batch_size=4):
    loader = build_pretrain_loader(cfg, 16, None, batch_size)
    keys = [k for b in loader for k in b["key"]]
    return loader, keys


@pytest.mark.parametrize("workers", [0, 2])
def test_table_counts_add_up_and_name_every_reason(tmp_path, workers):
    path = hostile_table(tmp_path)
    loader, keys = read_all(DataConfig(source="table", urls=str(path), max_skip_fraction=0.5,
                                       num_workers=workers))
    s = loader.skips
    assert dict(s.skipped) == TABLE_SKIPS and s.seen == 24 and len(keys) == 24 - 5
    assert dict(s.fixed) == {"empty_caption": 1, "caption_truncated": 1}
    # Both bad images are named, not only the first one.
    assert sorted(s.examples["bad_image"]) == ["img/002.jpg", "img/005.jpg", "img/009.jpg"]
    m = s.metrics()
    assert m["data/seen"] == 24 and m["data/skipped"] == 5 and m["data/skipped/missing_file"] == 1
    assert m["data/examples"]["missing_file"] == ["img/011.jpg"]
    assert s.postfix() == "bad_image 3, empty_file 1, missing_file 1"


@pytest.mark.parametrize("workers", [0, 2])
def test_cut_shard_is_one_damaged_shard_not_samples(tmp_path, workers):
    urls = hostile_shards(tmp_path)
    loader, keys = read_all(DataConfig(source="webdataset", urls=urls, max_skip_fraction=0.5,
                                       num_workers=workers, shuffle_buffer=0))
    s = loader.skips
    assert dict(s.skipped) == SHARD_SKIPS
    assert dict(s.shards) == {"corrupt_shard": 1} and s.examples["corrupt_shard"] == [urls.split("::")[1]]
    assert sorted(k for k in keys if k.startswith("b")) == [f"b{i:03d}" for i in range(6)]
    # What was read: the 12 samples of the first shard and the 6 the cut one still held.
    assert s.seen == 12 + 6 == len(keys) + sum(SHARD_SKIPS.values())
    assert dict(s.fixed) == {"caption_not_utf8": 1}
    assert "damaged shards: corrupt_shard 1" in s.summary()


def test_counts_for_folders_and_mixtures(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(image_bytes(seed=i, size=(12, 12)) if i < 4 else b"junk")
    loader, keys = read_all(DataConfig(source="imagefolder", urls=str(folder), max_skip_fraction=0.5))
    assert loader.skips.metrics()["data/skipped/bad_image"] == 2 and loader.skips.seen == 6 == len(keys) + 2
    (tmp_path / "t.txt").write_text("".join(f"t{i}\n" for i in range(5)))
    cfg = DataConfig(source="mixture", mixture_mode="sample", max_skip_fraction=0.9, mixture=[
        {"source": "imagefolder", "urls": str(folder)}, {"source": "text", "urls": str(tmp_path / "t.txt")}])
    loader = build_pretrain_loader(cfg, 16, None, 4)
    it = iter(loader)
    keys = [k for _ in range(10) for k in next(it)["key"]]
    assert loader.skips.seen == len(keys) + loader.skips.num_skipped
    assert set(loader.skips.skipped) == {"bad_image"}


def test_counters_of_ranks_add_up():
    a, b = SkipCounter("x"), SkipCounter("x")
    a.add([("skip", "bad_image", "k1"), ("fix", "empty_caption", "k2")], seen=10)
    b.add([("skip", "bad_image", "k3"), ("skip", "missing_file", "k4"), ("shard", "corrupt_shard", "u")], seen=7)
    total = SkipCounter.merged([a.state_dict(), b.state_dict()], "x")
    assert total.seen == 17 and dict(total.skipped) == {"bad_image": 2, "missing_file": 1}
    assert total.examples["bad_image"] == ["k1", "k3"] and dict(total.shards) == {"corrupt_shard": 1}
    a.add([("skip", "bad_image", "k1")], seen=1)  # the same file again, in the next epoch
    assert a.examples["bad_image"] == ["k1"] and a.skipped["bad_image"] == 2
    # A checkpoint of an earlier version kept one example key per reason, as a string.
    old = {"seen": 3, "skipped": {"bad_image": 1}, "fixed": {}, "examples": {"bad_image": "k0"}}
    c = SkipCounter()
    c.load_state_dict(old)
    assert c.examples == {"bad_image": ["k0"]} and SkipCounter.merged([old]).examples == {"bad_image": ["k0"]}


TINY = ["model.depth=1", "model.emb_dim=32", "model.num_heads=2", "model.dec_emb_dim=32", "model.dec_depth=1",
        "model.dec_num_heads=2", "model.image_size=16", "model.patch_size=8", "data.text_len=16",
        "model.max_text_len=16", "model.vocab_size=300", "data.tokenizer=from-data",
        "data.tokenizer_vocab_size=120", "train.recon_every=0", "train.log_every=1", "train.warmup_steps=1"]


@pytest.mark.parametrize("source", ["table", "webdataset"])
def test_pretrain_reports_skips_in_metrics_bar_and_final_line(tmp_path, source, capsys):
    """The hostile corpus through `m3ae pretrain`: per-reason counts in every metrics row, the
    progress bar and the final line, adding up to what was read."""
    from m3ae.cli import main
    from m3ae.training.loggers import read_metrics

    urls = str(hostile_table(tmp_path / "t")) if source == "table" else hostile_shards(tmp_path / "w")
    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "tiny", "--out", str(out), *TINY, f"data.source={source}",
               f"data.urls={urls}", "data.max_skip_fraction=0.5", "data.shuffle_buffer=0",
               "train.steps=3", "train.batch_size=8"])
    captured = capsys.readouterr()
    assert rc == 0
    rows = read_metrics(out / "metrics.jsonl")
    expected = TABLE_SKIPS if source == "table" else SHARD_SKIPS
    last = rows[-1]
    # Three batches of 8 are one whole epoch of either corpus: every bad sample has been read.
    reasons = {k.removeprefix("data/skipped/"): v for k, v in last.items() if k.startswith("data/skipped/")}
    assert reasons == expected and last["data/skipped"] == sum(expected.values())
    assert all(last["data/examples"][r] for r in expected)
    assert last["data/seen"] == (24 if source == "table" else 18)
    assert [r["data/seen"] for r in rows] == sorted(r["data/seen"] for r in rows)
    final = captured.out.strip().splitlines()[-1]
    assert final.startswith("done: 3 steps") and f"data: read {last['data/seen']}, skipped " in final
    assert "bad_image" in final
    assert "skipped=bad_image" in captured.err  # the progress bar's postfix
