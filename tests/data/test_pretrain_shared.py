"""A few `m3ae pretrain` steps on the shared real data, through the CLI a user would type."""
from __future__ import annotations

import json

import pytest

from m3ae.cli import main

OPTIONS = ["--preset", "tiny", "--no-progress"]  # options first: argparse wants the overrides together
COMMON = ["train.steps=3", "train.batch_size=8", "train.log_every=1",
          "train.recon_every=0", "train.ckpt_every=0", "train.device=cpu", "data.source=webdataset",
          "data.tokenizer=from-data", "data.shuffle_buffer=50", "data.num_workers=0"]


def _run(tmp_path, urls, *extra, name="run"):
    out = tmp_path / name
    assert main(["pretrain", "--out", str(out), *OPTIONS, f"data.urls={urls}", *COMMON, *extra]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["loss"] == m["loss"] and 0 < m["loss"] < 20 for m in lines)  # finite
    return lines


@pytest.mark.slow
def test_pretrain_coco_mini(shared_data, tmp_path):
    lines = _run(tmp_path, shared_data / "coco-mini" / "all-000000.tar.gz")
    assert all(m["text_loss"] > 0 for m in lines)  # every coco image has a caption


@pytest.mark.slow
def test_pretrain_tiny_imagenet_paired_fraction(shared_data, tmp_path):
    urls = shared_data / "tiny-imagenet-captions" / "train-000000.tar.gz"
    every = _run(tmp_path, urls, "train.text_loss_norm=batch")
    some = _run(tmp_path, urls, "train.text_loss_norm=batch", "data.paired_fraction=0.3", name="some")
    # The same images in the same order. With text_loss_norm=batch a sample whose caption was
    # dropped adds 0 to the text loss, and at initialisation every caption's loss is about the
    # same, so the ratio is the share of the 24 samples read that kept their caption: 0.46
    # measured (the key hash keeps about 11 of these 24 at 0.3); 1.0 if the fraction is ignored.
    ratio = sum(m["text_loss"] for m in some) / sum(m["text_loss"] for m in every)
    assert 0.05 < ratio < 0.65, ratio


def test_misconfigured_path_is_one_line_error(tmp_path, capsys):
    code = main(["pretrain", "--out", str(tmp_path / "r"), "--preset", "tiny", "data.source=table",
                 f"data.urls={tmp_path / 'nope.csv'}", "data.tokenizer=from-data"])
    assert code == 2
    assert "nope.csv is not an existing file; expected a table" in capsys.readouterr().err


def test_paired_fraction_on_real_keys(shared_data):
    from m3ae.config import DataConfig
    from m3ae.data import build_dataset

    ds = build_dataset(DataConfig(source="webdataset", paired_fraction=0.3, reduced_decode=True,
                                  urls=str(shared_data / "coco-mini" / "all-000000.tar.gz")), 32, train=False)
    caps = [s["caption"] is not None for s in ds]
    assert len(caps) == 239 and abs(sum(caps) / 239 - 0.3) < 0.08  # 239 keys: binomial sd 0.03
