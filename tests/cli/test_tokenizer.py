"""`m3ae tokenizer train` reads every pre-training source through the library's caption reader
and refuses inputs that are not captions with one line (issue 32). In-process through
``m3ae.cli.main``; what the terminal shows is stdout/stderr and the exit code."""
import json
import sys
from pathlib import Path

import pytest

from m3ae.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from helpers import image_bytes, pair_shards  # noqa: E402


@pytest.fixture
def train(capfd, tmp_path):  # file descriptors: HF tokenizers (Rust) write to fd 2 directly
    def run(*args):
        capfd.readouterr()
        code = main(["tokenizer", "train", *map(str, args), "-o", str(tmp_path / "tok.json")])
        out, err = capfd.readouterr()
        return code, out, err
    return run


def vocab(tmp_path) -> dict:
    return json.loads((tmp_path / "tok.json").read_text())["model"]["vocab"]


def test_every_source_gives_the_tokenizer_of_its_captions(train, tmp_path):
    from m3ae.data.cache import build_cache, source_config
    from m3ae.tokenizer import train_wordpiece

    shards = pair_shards(tmp_path / "shards", 2, 12)  # captions "caption {shard} {i}"
    code, out, err = train(shards, "--vocab-size", "60", "--min-frequency", "1")
    assert code == 0 and "from 24 captions" in out, err
    from_shards = (tmp_path / "tok.json").read_bytes()
    expected = train_wordpiece([f"caption {s} {i}" for s in range(2) for i in range(12)], vocab_size=60)
    assert vocab(tmp_path) == expected.get_vocab() and "caption" in vocab(tmp_path)
    build_cache([source_config(shards)], tmp_path / "cache", 16, progress=False)
    assert train(tmp_path / "cache", "--vocab-size", "60", "--min-frequency", "1")[0] == 0
    assert (tmp_path / "tok.json").read_bytes() == from_shards  # the same captions, the same file
    (tmp_path / "img.jpg").write_bytes(image_bytes())
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"img.jpg,caption {s} {i}\n" for s in range(2)
                                                               for i in range(12)))
    assert train(tmp_path / "t.csv", "--vocab-size", "60", "--min-frequency", "1")[0] == 0
    assert (tmp_path / "tok.json").read_bytes() == from_shards
    folder = tmp_path / "folder"  # img2dataset's "files" layout: xxx.jpg + xxx.txt
    folder.mkdir()
    for s in range(2):
        for i in range(12):
            (folder / f"{s}{i:02d}.jpg").write_bytes(image_bytes())
            (folder / f"{s}{i:02d}.txt").write_text(f"caption {s} {i}")
    assert train(folder, "--vocab-size", "60", "--min-frequency", "1")[0] == 0
    assert (tmp_path / "tok.json").read_bytes() == from_shards
    text = "".join(f"caption {s} {i}\n" for s in range(2) for i in range(12))
    (tmp_path / "caps.txt").write_text(text)
    assert train(tmp_path / "caps.txt", "--vocab-size", "60", "--min-frequency", "1")[0] == 0
    assert (tmp_path / "tok.json").read_bytes() == from_shards
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "caps.h5", "w") as f:
        f.create_dataset("text", data=text.splitlines(), dtype=h5py.string_dtype())
    assert train(tmp_path / "caps.h5", "--vocab-size", "60", "--min-frequency", "1")[0] == 0
    assert (tmp_path / "tok.json").read_bytes() == from_shards


def one_line_error(result, *needles):
    code, out, err = result
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_are_one_clear_line(train, tmp_path):
    jpg = tmp_path / "photo.jpg"
    jpg.write_bytes(image_bytes())
    one_line_error(train(jpg), "cannot tell what", "photo.jpg", "--source")
    one_line_error(train(jpg, "--source", "text"), "photo.jpg is not a text file (it holds binary data")
    gz = tmp_path / "captions.txt"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))  # a gzip file named like text
    one_line_error(train(gz), "captions.txt is not a text file")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(train(tmp_path / "empty.txt"), "empty.txt holds no non-empty lines of text")
    (tmp_path / "few.txt").write_text("a cat\na dog on a mat\n")
    one_line_error(train(tmp_path / "few.txt"), "only 2 caption(s) in", "a vocabulary needs at least 20")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a cat\n" * 30)
    one_line_error(train(tmp_path / "texts"), "folder", "holds no image files")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.jpg").write_bytes(image_bytes())
    one_line_error(train(tmp_path / "images"), "holds no captions to train a tokenizer on",
                   "no xxx.txt beside its images")
    assert not (tmp_path / "tok.json").exists()


def test_a_vocabulary_smaller_than_the_alphabet_says_why_it_is_larger(train, tmp_path):
    (tmp_path / "caps.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 25)
    code, out, err = train(tmp_path / "caps.txt", "--vocab-size", "20")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2, out + err
    # 26 letters, 19 of them also inside a word (all but t q b f j l d, which only start words),
    # and the 5 special tokens: 50, and no merge fits in 20.
    assert len(vocab(tmp_path)) == 50
    assert lines[1] == ("note: 50 tokens, more than --vocab-size 20: the captions hold 26 distinct characters, "
                        "19 of them also inside words ('##' forms); these and the 5 special tokens are always "
                        "kept, so that every word can be spelt")
