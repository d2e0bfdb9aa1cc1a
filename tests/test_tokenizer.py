import pytest

from m3ae.tokenizer import TextTokenizer, TokenizerNotFound, from_vocab_file, load_tokenizer, train_wordpiece


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
