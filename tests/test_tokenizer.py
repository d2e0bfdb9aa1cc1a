import json

import pytest

from m3ae.tokenizer import (SPECIAL_TOKENS, TextTokenizer, TokenizerNotFound, from_vocab_file, load_tokenizer,
                            train_wordpiece)


def test_vocab_txt_bert_uncased(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "the", "left", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(tmp_path)  # a folder with vocab.txt
    enc = TextTokenizer(tok, text_len=6)
    ids, pad = enc(["A RED circles on the left.", ""])
    assert ids[0].tolist() == [5, 6, 7, 11, 8, 9]  # lowercased, WordPiece '##s', truncated to 6
    assert not pad[0].any() and pad[1].all() and ids[1].tolist() == [0] * 6
    assert enc.decode_tokens([6, 7]) == ["red", "circle"]
    assert from_vocab_file(tmp_path / "vocab.txt").get_vocab_size() == len(vocab)


def test_train_save_load(tmp_path):
    tok = train_wordpiece(["a red circle on the left", "a blue square at the top"] * 20, vocab_size=100)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode("a blue circle", add_special_tokens=False).tokens == ["a", "blue", "circle"]
    assert again.token_to_id("[PAD]") == 0


def test_missing_tokenizer_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    with pytest.raises(TokenizerNotFound, match="m3ae tokenizer train"):
        load_tokenizer("no-such-model-xyz")


def test_cached_hf_name_is_found_offline(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--tok" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    train_wordpiece(["hello world"] * 5, vocab_size=50).save(str(snap / "tokenizer.json"))
    (tmp_path / "hub" / "models--org--tok" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tok" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = load_tokenizer("org/tok")
    assert tok.encode("hello", add_special_tokens=False).tokens == ["hello"]


def test_training_prints_nothing_off_terminal(capfd):
    """Issue 13, case 7: tokenizers' progress bars printed three blank lines into logs."""
    train_wordpiece(["a red circle on the left", "a blue square at the top"] * 20, vocab_size=60)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_old_name_text_encoder_still_imports_with_a_warning():
    import m3ae.tokenizer as tokenizer_module

    with pytest.warns(DeprecationWarning, match="TextTokenizer"):
        old = tokenizer_module.TextEncoder
    assert old is tokenizer_module.TextTokenizer


def test_caption_tokenizer_is_folded_into_text_tokenizer():
    import m3ae.tokenizer as tokenizer_module
    from m3ae.tokenizer import SPECIAL_TOKENS, from_vocab

    with pytest.warns(DeprecationWarning, match="CaptionTokenizer is now TextTokenizer"):
        assert tokenizer_module.CaptionTokenizer is tokenizer_module.TextTokenizer
    tok = tokenizer_module.TextTokenizer(from_vocab(SPECIAL_TOKENS + ["red", "circle"]), text_len=4)
    ids, pad = tok("red circle")  # one caption, as the user-facing tokenizer took it
    assert ids.tolist() == [[5, 6, 0, 0]] and pad.tolist() == [[False, False, True, True]]
    assert tok.decode(ids[0]) == "red circle"
    assert tok.word_mask(9).tolist() == [False] * 5 + [True, True] + [False] * 2  # words only, in vocabulary


# ------------------------------------------------------------------ deterministic training
# Vietnamese-like captions: accents tell words apart (cá fish, cà aubergine, cả all, ...).
VIETNAMESE = ["một con cá nhỏ bơi trong hồ nước xanh", "quả cà tím trên đĩa trắng", "cả gia đình ăn cơm ở Hà Nội",
              "con mèo đen ngủ trên ghế gỗ", "chiếc xe đạp đỏ dựng bên tường", "bầu trời xanh và mây trắng",
              "người đàn ông đội mũ đi trên phố", "hai đứa trẻ chơi bóng ở công viên",
              "bát phở bò nóng trên bàn", "cây cầu cũ bắc qua sông Hồng", "con chó vàng chạy trên bãi cỏ",
              "cô gái mặc áo dài trắng", "chợ nổi trên sông vào buổi sáng", "đèn lồng đỏ treo trước cửa nhà",
              "núi cao phủ sương mù", "thuyền nhỏ trên vịnh Hạ Long"]


def test_merges_go_by_count_then_lower_ids():
    from m3ae.tokenizer import SPECIAL_TOKENS, wordpiece_vocab

    # a b c = 5 6 7, ##b ##c = 8 9; pairs (a,##b) 3+2, (##b,##c) 2, (b,##c) 1.
    vocab = wordpiece_vocab({"ab": 3, "abc": 2, "bc": 1}, vocab_size=100)
    assert vocab == SPECIAL_TOKENS + ["a", "b", "c", "##b", "##c", "ab", "abc", "bc"]
    assert wordpiece_vocab({"ab": 3, "abc": 2, "bc": 1}, 100, min_frequency=2)[-2:] == ["ab", "abc"]
    # A tie (both pairs once): the pair of lower ids wins, whatever order the words came in.
    assert wordpiece_vocab({"cd": 1, "ab": 1}, vocab_size=12)[-1] == "ab"
    assert wordpiece_vocab({"ab": 1, "cd": 1}, vocab_size=12)[-1] == "ab"


def _train_in_fresh_process(tmp_path, hash_seed: int, *args) -> bytes:
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / f"tok-{hash_seed}.json"
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "m3ae", "tokenizer", "train", *map(str, args), "-o", str(out)],
                   env=env, check=True, capture_output=True)
    return out.read_bytes()


@pytest.mark.slow
def test_training_on_tiny_imagenet_is_byte_identical_in_two_processes(tmp_path, shared_data):
    """Issue 32: tokenizers' trainer gave another tokenizer.json in every process."""
    shard = shared_data / "tiny-imagenet-captions" / "train-000000.tar.gz"
    a, b = (_train_in_fresh_process(tmp_path, seed, shard, "--vocab-size", "1000", "--min-frequency", "1")
            for seed in (1, 2))
    assert a == b and len(json.loads(a)["model"]["vocab"]) == 1000


@pytest.mark.parametrize("options", [[], ["--keep-accents", "--cased"]])
def test_training_on_accented_text_is_byte_identical_in_two_processes(tmp_path, options):
    (tmp_path / "vi.txt").write_text("\n".join(VIETNAMESE * 3) + "\n", encoding="utf-8")
    a, b = (_train_in_fresh_process(tmp_path, seed, tmp_path / "vi.txt", "--vocab-size", "150",
                                    "--min-frequency", "1", *options) for seed in (3, 4))
    assert a == b
    vocab = json.loads(a)["model"]["vocab"]
    assert ("à" in vocab and "H" in vocab) == bool(options)


def test_a_trained_tokenizer_spells_known_words_whole_and_decodes_back():
    tok = train_wordpiece(VIETNAMESE * 3, vocab_size=400, keep_accents=True)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    enc = tok.encode("con cá nhỏ trên bàn", add_special_tokens=False)
    assert enc.tokens == ["con", "cá", "nhỏ", "trên", "bàn"] and enc.ids == [vocab[t] for t in enc.tokens]
    assert tok.decode(enc.ids) == "con cá nhỏ trên bàn"
    # An unseen word is spelt from pieces (no [UNK]) and decodes back whole.
    enc = tok.encode("cá nhà", add_special_tokens=False)
    assert "[UNK]" not in enc.tokens and tok.decode(enc.ids) == "cá nhà"
    # The vocabulary holds every character of the text, so [UNK] is only for new characters.
    assert tok.encode("ζ", add_special_tokens=False).tokens == ["[UNK]"]
    # A vocabulary target smaller than the alphabet: all characters are still kept.
    small = train_wordpiece(VIETNAMESE, vocab_size=10, keep_accents=True)
    letters = {c for line in VIETNAMESE for c in line.lower() if not c.isspace()}
    assert letters <= set(small.get_vocab()) and small.get_vocab_size() > 10
