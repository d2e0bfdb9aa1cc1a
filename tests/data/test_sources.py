"""Every source type, read from files the test writes, including broken ones."""
from __future__ import annotations

import gzip
import json
import tarfile

import numpy as np
import pytest

from helpers import image_bytes, pair_shards, write_tar
from m3ae.config import DataConfig
from m3ae.data import DataError, DataNotFound, build_dataset, build_pretrain_loader, keeps_caption
from m3ae.data.sources import HDF5Source, ImageFolderSource, TableSource, TextSource
from m3ae.data.webdataset import ShardSource


def read_all(cfg: DataConfig, batch_size: int = 4, **kw):
    """All samples of one epoch through the real loader (no tokenizer needed)."""
    loader = build_pretrain_loader(cfg, 16, None, batch_size, train=False, **kw)
    batches = list(loader)
    return loader, batches, [k for b in batches for k in b["key"]]


# ------------------------------------------------------------------ webdataset
def test_img2dataset_layout(tmp_path):
    members = [("a.jpg", image_bytes(size=(16, 16))), ("a.txt", b"a cat"), ("a.json", b'{"caption": "x"}'),
               ("b.png", image_bytes("palette")), ("b.json", b'{"caption": "from json"}'),
               ("c.webp", image_bytes(fmt="WEBP")), ("c.txt", b"a webp"),
               ("d.txt", b"text only")]
    tar = write_tar(tmp_path / "x.tar", members)
    src = ShardSource(str(tar))
    got = {s["key"]: s for s in (src.decode(r) for r in src.items(0, 0, 1, 0))}
    assert {k: got[k]["caption"] for k in got} == {"a": "a cat", "b": "from json", "c": "a webp", "d": "text only"}
    assert got["d"]["image"] is None and got["c"]["image"].size == (40, 30)


def test_shards_brace_pattern_and_gzip(tmp_path):
    pattern = pair_shards(tmp_path, 3, 5)
    with open(tmp_path / "train-000002.tar", "rb") as f:  # one shard gzip-compressed, as shared data is
        (tmp_path / "extra.tar.gz").write_bytes(gzip.compress(f.read()))
    _, _, keys = read_all(DataConfig(source="webdataset", urls=pattern + "::" + str(tmp_path / "*.tar.gz")))
    assert len(keys) == 20 and len(set(keys)) == 15


def test_truncated_tar_is_a_counted_skip(tmp_path):
    pair_shards(tmp_path, 1, 10)
    data = (tmp_path / "train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        member = tar.getmembers()[15]  # s5_000.jpg
    (tmp_path / "cut.tar").write_bytes(data[: member.offset_data + 50])  # ends mid-member
    loader, _, keys = read_all(DataConfig(source="webdataset", urls=str(tmp_path / "cut.tar"),
                                          max_skip_fraction=1.0))
    assert len(keys) == 5  # the samples before the damage are kept
    assert loader.skips.shards == {"corrupt_shard": 1} and loader.skips.seen == 5
    assert loader.skips.examples["corrupt_shard"] == [str(tmp_path / "cut.tar")]


def test_bad_samples_in_shards_counted(tmp_path):
    members = [("ok.jpg", image_bytes(size=(16, 16))), ("ok.txt", b"fine"),
               ("zero.jpg", b""), ("zero.txt", b"x"), ("junk.jpg", b"junk"),
               ("enc.jpg", image_bytes(size=(16, 16))), ("enc.txt", b"caf\xe9")]
    loader, _, keys = read_all(DataConfig(source="webdataset", urls=str(write_tar(tmp_path / "b.tar", members)),
                                          max_skip_fraction=1.0))
    assert sorted(keys) == ["enc", "ok"]
    assert dict(loader.skips.skipped) == {"empty_file": 1, "bad_image": 1}
    assert dict(loader.skips.fixed) == {"caption_not_utf8": 1}


def test_missing_shards_fail_at_start(tmp_path):
    with pytest.raises(DataNotFound, match="matched no file"):
        build_dataset(DataConfig(source="webdataset", urls=str(tmp_path / "*.tar")), 16)
    with pytest.raises(DataNotFound, match=r"1 of 1 shard\(s\) do not exist"):
        build_dataset(DataConfig(source="webdataset", urls=str(tmp_path / "a-{0..0}.tar")), 16)


# ------------------------------------------------------------------ HDF5
def _h5(path, **fields):
    import h5py

    with h5py.File(path, "w") as f:
        for name, values in fields.items():
            dt = h5py.vlen_dtype(np.dtype("uint8")) if name == "jpg" else h5py.string_dtype()
            ds = f.create_dataset(name, (len(values),), dtype=dt)
            for i, v in enumerate(values):
                ds[i] = np.frombuffer(v, np.uint8) if name == "jpg" else v
    return path


def test_hdf5_pairs_and_text(tmp_path):
    pytest.importorskip("h5py")
    jpgs = [image_bytes(seed=i, size=(20, 10)) for i in range(3)] + [b"broken"]
    p = _h5(tmp_path / "pairs.h5", jpg=jpgs, caption=[b"one", b"two", b"three", b"four"])
    loader, _, keys = read_all(DataConfig(source="hdf5", urls=str(p), max_skip_fraction=1.0), batch_size=2)
    assert sorted(keys) == ["pairs.h5:0", "pairs.h5:1", "pairs.h5:2"]
    assert loader.skips.skipped["bad_image"] == 1
    src = HDF5Source(str(p))
    s = src[1]
    assert s["caption"] == "two" and s["image"].size == (20, 10)
    t = HDF5Source(str(_h5(tmp_path / "text.h5", text=["unpaired one", "unpaired two"])))
    assert t[0]["image"] is None and t[1]["caption"] == "unpaired two"
    with pytest.raises(DataError, match="no dataset 'nope'"):
        HDF5Source(str(p), image_field="nope")


# ------------------------------------------------------------------ tables
def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (folder / n).write_bytes(image_bytes(seed=i, size=(12, 12)))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_tables(tmp_path, fmt):
    _images(tmp_path / "img", ["a.jpg", "b.jpg"])
    rows = [("img/a.jpg", "first of a"), ("img/a.jpg", "second of a"), ("img/b.jpg", "only b"),
            ("img/missing.jpg", "gone")]
    path = tmp_path / f"t.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"filepath{sep}title\n" + "".join(f"{a}{sep}{b}\n" for a, b in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"filepath": a, "title": b}) + "\n" for a, b in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"filepath": [r[0] for r in rows], "title": [r[1] for r in rows]}), path)
    src = TableSource(str(path))  # columns found by their usual names
    assert len(src) == 3 and src.caption_lists[0] == ["first of a", "second of a"]
    seen = {src[0]["caption"] for _ in range(40)}
    assert seen == {"first of a", "second of a"}  # one of its captions per read
    loader, _, keys = read_all(DataConfig(source="table", urls=str(path), max_skip_fraction=1.0), batch_size=2)
    assert sorted(keys) == ["img/a.jpg", "img/b.jpg"]
    assert loader.skips.skipped == {"missing_file": 1} and loader.skips.examples["missing_file"] == ["img/missing.jpg"]


def test_table_caption_lists_and_errors(tmp_path):
    _images(tmp_path, ["a.jpg"])
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"image": "a.jpg", "captions": ["x", "y", "z"]}) + "\n")
    assert TableSource(str(p)).caption_lists == [["x", "y", "z"]]
    with pytest.raises(DataError, match=r"no column 'cap' for the caption; its columns are \['captions', 'image'\]"):
        TableSource(str(p), caption_column="cap")
    q = tmp_path / "t.csv"
    q.write_text("name,caption\na.jpg,x\n")
    with pytest.raises(DataError, match="no image path column found among"):
        TableSource(str(q))
    r = tmp_path / "r.csv"
    r.write_text("image,caption\nelsewhere/a.jpg,x\n")
    with pytest.raises(DataError, match="relative to the table's folder"):
        TableSource(str(r))
    with pytest.raises(DataNotFound, match="not an existing file"):
        TableSource(str(tmp_path / "nope.csv"))


# ------------------------------------------------------------------ folders and text
def test_image_folders(tmp_path):
    _images(tmp_path / "cls" / "dog", ["1.jpg", "2.jpg"])
    _images(tmp_path / "cls" / "cat", ["1.png"])
    src = ImageFolderSource(str(tmp_path / "cls"))
    assert src.classes == ["cat", "dog"] and sorted(src.labels) == [0, 1, 1]
    assert src[0]["label"] == 0 and src[0]["caption"] is None
    _images(tmp_path / "flat", ["x.jpg", "y.jpg"])
    flat = ImageFolderSource(str(tmp_path / "flat"))
    assert len(flat) == 2 and flat.labels == [-1, -1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        ImageFolderSource(str(tmp_path / "empty"))
    # An xxx.txt beside an image is its caption, for pre-training as for evaluation.
    (tmp_path / "cls" / "dog" / "2.txt").write_text("a dog on the grass\n")
    src = ImageFolderSource(str(tmp_path / "cls"))
    assert [src[i]["caption"] for i in range(3)] == [None, None, "a dog on the grass"]
    assert list(src.captions()) == ["a dog on the grass"] and list(flat.captions()) == []


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first line\n\n   \nsecond \xff line\n")
    (tmp_path / "b.jsonl").write_text('{"text": "from jsonl"}\n{"text": ""}\n')
    src = TextSource(str(tmp_path))
    assert [src[i]["caption"] for i in range(len(src))] == ["first line", "second \ufffd line", "from jsonl"]
    assert src[0]["image"] is None
    _, batches, _ = read_all(DataConfig(source="text", urls=str(tmp_path)), batch_size=3)
    assert batches[0]["image"] is None and batches[0]["text"] is None  # no tokenizer given here
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no non-empty lines"):
        TextSource(str(tmp_path / "e.txt"))


# ------------------------------------------------------------------ paired fraction and mixtures
def test_keeps_caption_is_deterministic_and_accurate():
    keys = [f"img-{i:06d}.jpg" for i in range(20_000)]
    for frac in (0.1, 0.2, 0.3):
        kept = [keys[i] for i in range(len(keys)) if keeps_caption(keys[i], frac)]
        assert abs(len(kept) / len(keys) - frac) < 0.01
        assert kept == [k for k in keys if keeps_caption(k, frac)]  # same answer every time
        assert set(kept) <= {k for k in keys if keeps_caption(k, frac + 0.1)}  # nested subsets
    assert all(keeps_caption(k, 1.0) for k in keys[:10])


def test_paired_fraction_in_the_loader(tmp_path):
    pattern = pair_shards(tmp_path, 1, 100)
    cfg = DataConfig(source="webdataset", urls=pattern, paired_fraction=0.3)
    ds = build_dataset(cfg, 16, train=False)
    first = {s["key"]: s["caption"] for s in ds}
    again = {s["key"]: s["caption"] for s in ds}
    assert first == again and all(s is None or s.startswith("caption") for s in first.values())
    assert sum(c is not None for c in first.values()) == sum(keeps_caption(k, 0.3) for k in first)


def test_mixture_batch_and_sample_modes(tmp_path):
    pattern = pair_shards(tmp_path / "shards", 2, 20)
    (tmp_path / "t.txt").write_text("".join(f"text line {i}\n" for i in range(30)))
    mixture = [{"source": "webdataset", "urls": pattern, "weight": 3.0},
               {"source": "text", "urls": str(tmp_path / "t.txt"), "weight": 1.0}]
    cfg = DataConfig(source="mixture", mixture=mixture, mixture_mode="batch", shuffle_buffer=10)
    loader = build_pretrain_loader(cfg, 16, None, 4)
    it = iter(loader)
    batches = [next(it) for _ in range(40)]
    kinds = [(b["image"] is None, len(b["key"])) for b in batches]
    assert all(n == 4 for _, n in kinds)  # every batch from one entry: all images or none
    text_share = sum(k for k, _ in kinds) / len(kinds)
    assert 0.1 < text_share < 0.45  # weight 1 of 4
    cfg = DataConfig(source="mixture", mixture=mixture, mixture_mode="sample", shuffle_buffer=10)
    b = next(iter(build_pretrain_loader(cfg, 16, None, 64)))
    valid = b["image_valid"]
    assert valid is not None and 0.6 < valid.float().mean() < 0.9  # mixed within the batch
    assert float(b["image"][~valid].abs().sum()) == 0.0
    with pytest.raises(DataError, match="needs data.mixture"):
        build_dataset(DataConfig(source="mixture"), 16)


def test_webdataset_source_for_evaluation(tmp_path):
    from m3ae.data.webdataset import webdataset_source

    tar = write_tar(tmp_path / "e.tar", [("a.jpg", image_bytes(size=(8, 8))), ("a.cls", b"4"), ("b.jpg", b"bad")])
    ds = webdataset_source(str(tar))
    got = list(ds)
    assert [(s["key"], s["label"], s["image"].size) for s in got] == [("a", 4, (8, 8))]
    assert ds.skips.skipped["bad_image"] == 1
    with pytest.raises(FileNotFoundError, match="do not exist"):
        webdataset_source(str(tmp_path / "nope-{000..001}.tar"))
