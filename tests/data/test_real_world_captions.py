"""Captions as real files hold them (issue 16): unquoted commas, missing headers, other
languages' flip words; and the loss curve of a run without captions."""
from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from m3ae.config import DataConfig
from m3ae.data import DataError, build_dataset
from m3ae.data.sources import TableSource
from m3ae.data.transforms import WordSwapper


@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    return tmp_path


def test_unquoted_commas_in_the_last_column_are_joined_and_reported(images, caplog):
    (images / "t.csv").write_text('image,caption\na.jpg,one, two, three\nb.jpg,"quoted, fine"\nc.jpg,plain\n')
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        src = TableSource(str(images / "t.csv"))
    assert src.caption_lists == [["one, two, three"], ["quoted, fine"], ["plain"]]  # never cut at the comma
    assert src.repairs == {"extra_fields_joined": 1, "malformed_row": 0}
    assert "1 row(s) have more fields than the header" in caplog.text and "line 2" in caplog.text


def test_extra_fields_elsewhere_make_a_counted_malformed_row(images, caplog):
    (images / "t.csv").write_text("caption,image\none, two,a.jpg\nfine,b.jpg\n")
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        src = TableSource(str(images / "t.csv"))
    assert src.images == ["b.jpg"] and src.repairs["malformed_row"] == 1
    assert "malformed row(s)" in caplog.text


def test_a_missing_header_is_named_with_the_options(images):
    (images / "t.csv").write_text("a.jpg,a small red circle\nb.jpg,two\n")
    with pytest.raises(DataError, match="header line seems to be missing.*data.image_column.*data.caption_column"):
        TableSource(str(images / "t.csv"))


def test_flip_word_pairs_are_configurable(images):
    vi = WordSwapper([["trái", "phải"], ["left", "right"]])
    assert vi("con mèo bên Trái, con chó bên phải; LEFT") == "con mèo bên Phải, con chó bên trái; RIGHT"
    (images / "t.csv").write_text("image,caption\na.jpg,bên trái on the left\n")
    cfg = DataConfig(source="table", urls=str(images / "t.csv"), hflip=1.0, flip_word_pairs=[["trái", "phải"]])
    assert build_dataset(cfg, 16)[0]["caption"] == "bên phải on the left"  # only the configured pairs
    assert build_dataset(DataConfig(source="table", urls=str(images / "t.csv"), hflip=1.0), 16)[0]["caption"] \
        == "bên trái on the right"  # the English default
    with pytest.raises(ValueError, match="two words"):
        WordSwapper([["only-one"]])


def test_loss_curve_of_an_image_only_run_has_no_flat_text_panels(tmp_path):
    from m3ae.visualize import plot_loss_curve

    def width(rows):
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return Image.open(plot_loss_curve(path, tmp_path / "c.png")).size[0]

    paired = [{"step": s, "loss": 1.0 / s, "image_loss": 0.5 / s, "text_loss": 0.3, "text_accuracy": 0.1}
              for s in (1, 2, 3)]
    image_only = [dict(r, text_loss=0.0, text_accuracy=0.0) for r in paired]
    assert width(image_only) * 2 == pytest.approx(width(paired), abs=4)  # 2 panels instead of 4


def test_the_repair_note_is_printed_once_per_run(images, tmp_path, caplog):
    """Issue 32: a pre-training run opens its table three times (dataset, caption scan,
    from-data tokenizer); the note came three times."""
    from m3ae.cli import main

    rows = "".join(f"{n}.jpg,a picture, {n} colours\n" for n in "abc") * 8
    (images / "t.csv").write_text("image,caption\n" + rows)
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        assert main(["pretrain", "--out", str(tmp_path / "run"), "--no-progress", "data.source=table",
                     f"data.urls={images / 't.csv'}", "data.tokenizer=from-data", "data.tokenizer_vocab_size=60",
                     "model.vocab_size=64", "model.depth=1", "model.emb_dim=32", "model.dec_emb_dim=32",
                     "model.dec_depth=1", "train.steps=1", "train.batch_size=2", "train.recon_every=0"]) == 0
    notes = [r.getMessage() for r in caplog.records if "more fields than the header" in r.getMessage()]
    assert len(notes) == 1 and "24 row(s)" in notes[0], notes
