"""BERT-uncased WordPiece tokenisation through HF ``tokenizers``; never downloads anything.

A tokenizer is found from a ``vocab.txt``, a ``tokenizer.json``, a folder holding either, or
a Hugging Face model name that is already in the local cache. ``train_wordpiece`` builds a
vocabulary from captions so that an offline machine always has a working tokenizer.

Captions are encoded without [CLS]/[SEP] (the model has its own CLS token), truncated to
``text_len`` and padded with [PAD]; the padding mask is True at padding.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerNotFound(FileNotFoundError):
    pass


def _bert_pipeline(tok: Tokenizer, lowercase: bool = True, strip_accents: bool = True) -> Tokenizer:
    # BERT-uncased lower-cases and strips accents, which merges e.g. Vietnamese "cá", "cà",
    # "cả" into "ca"; both are options of a trained tokenizer (recorded in tokenizer.json).
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def from_vocab(tokens: list[str]) -> Tokenizer:
    """A BERT-uncased WordPiece tokenizer over ``tokens`` (ids in list order)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))


def from_vocab_file(path: str | Path) -> Tokenizer:
    """A BERT-uncased WordPiece tokenizer from a ``vocab.txt``."""
    with open(path, encoding="utf-8") as f:
        return from_vocab([line.rstrip("\n") for line in f])


def _find_in_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # optional: fall back to the cache layout
        try_to_load_from_cache = None
    for filename in ("tokenizer.json", "vocab.txt"):
        if try_to_load_from_cache is not None:
            try:
                hit = try_to_load_from_cache(name, filename)
            except Exception:  # not a valid repo id (e.g. a path that does not exist)
                return None
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
        else:
            home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
            for hit in sorted((home / "hub").glob(f"models--{name.replace('/', '--')}/snapshots/*/{filename}")):
                return hit
    return None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a tokenizer from a file, a folder, or a cached Hugging Face name (offline)."""
    path = Path(spec)
    if path.is_dir():
        for filename in ("tokenizer.json", "vocab.txt"):
            if (path / filename).is_file():
                return load_tokenizer(path / filename)
        raise TokenizerNotFound(f"folder {path} holds neither tokenizer.json nor vocab.txt")
    if path.is_file():
        if path.suffix == ".json":
            return Tokenizer.from_file(str(path))
        return from_vocab_file(path)
    hit = _find_in_hf_cache(str(spec))
    if hit is not None:
        return load_tokenizer(hit)
    raise TokenizerNotFound(
        f"tokenizer {str(spec)!r} is neither a file, a folder, nor a model in the local Hugging Face "
        "cache, and m3ae never downloads at run time. Either pass the path of a BERT vocab.txt / "
        "tokenizer.json, fetch it once with `huggingface-cli download bert-base-uncased vocab.txt`, "
        "or build one from your captions with `m3ae tokenizer train CAPTIONS.txt -o tokenizer.json`.")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1, *,
                    cased: bool = False, keep_accents: bool = False) -> Tokenizer:
    """Train a WordPiece vocabulary (BERT's normaliser and pre-tokeniser) on captions.

    By default it is uncased with accents stripped, as BERT-uncased; ``cased`` keeps upper
    case and ``keep_accents`` keeps accents (for languages where they tell words apart).
    Token ids can differ between two trainings on the same text (the trainer breaks ties in
    parallel), so a run saves its tokenizer beside every checkpoint; reuse that file.
    """
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase=not cased,
                         strip_accents=not keep_accents)
    # The trainer's progress bars print only blank lines when stderr is not a terminal (logs).
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, continuing_subword_prefix="##",
                                        show_progress=sys.stderr.isatty())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class TextTokenizer:
    """Captions -> fixed-length id tensors and padding masks: a WordPiece ``tokenizers.Tokenizer``
    cut or padded to ``text_len`` (the model's text input; not a network).

    The one tokenizer class: the data path's collator and :func:`m3ae.load_pretrained` /
    :func:`m3ae.get_tokenizer` both hand out this. ``tokenizer("a red circle")`` or
    ``tokenizer([...])`` -> ``(ids, padding_mask)``, both (B, text_len), True at padding;
    ``decode(ids)`` -> text. With ``warn_truncation`` (what ``get_tokenizer`` sets) a caption
    cut to ``text_len`` is said with a warning; the data path cuts silently, as documented.
    """

    def __init__(self, tokenizer: Tokenizer, text_len: int = 64, warn_truncation: bool = False):
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.warn_truncation = warn_truncation
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        self.mask_id = tokenizer.token_to_id("[MASK]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def ids(self, caption: str) -> list[int]:
        return self.tokenizer.encode(caption, add_special_tokens=False).ids[: self.text_len]

    def __call__(self, texts: str | list[str], warn: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, text_len) long, padding mask (B, text_len) bool (True = padding);
        ``warn`` overrides ``warn_truncation`` (the collator passes False)."""
        warn = self.warn_truncation if warn is None else warn
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenizer takes a str or a list of str, got {type(texts).__name__}"
                            + ("" if not isinstance(texts, (list, tuple)) else " holding non-strings"))
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        pad = torch.ones(len(texts), self.text_len, dtype=torch.bool)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            if warn and len(enc.ids) > self.text_len:
                import warnings

                warnings.warn(f"caption truncated to the model's {self.text_len} tokens (it has "
                              f"{len(enc.ids)}): {texts[i][:60]!r}", stacklevel=2)
            row = enc.ids[: self.text_len]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            pad[i, : len(row)] = False
        return ids, pad

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) or "[UNK]" for i in ids]

    def decode(self, ids: Iterable[int], skip_padding: bool = True) -> str:
        """Token ids -> text (WordPiece pieces joined), padding left out."""
        ids = [int(i) for i in ids if not (skip_padding and int(i) == self.pad_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write the WordPiece tokenizer as ``tokenizer.json`` (what ``save_pretrained`` stores)."""
        self.tokenizer.save(str(path))

    def word_mask(self, size: int) -> torch.Tensor:
        """(size,) bool, True at the ids this tokenizer produces for words: below its
        vocabulary size (a model's vocabulary may be larger) and not a special token."""
        mask = torch.zeros(size, dtype=torch.bool)
        mask[: min(size, self.vocab_size)] = True
        for tok in SPECIAL_TOKENS:
            i = self.tokenizer.token_to_id(tok)
            if i is not None and i < size:
                mask[i] = False
        return mask


def __getattr__(name: str):
    # Earlier names of TextTokenizer: TextEncoder ("text encoder" means a network in multimodal
    # code), and CaptionTokenizer, the user-facing subclass it now folds in.
    if name in ("TextEncoder", "CaptionTokenizer"):
        import warnings

        warnings.warn(f"m3ae.tokenizer.{name} is now TextTokenizer", DeprecationWarning, stacklevel=2)
        return TextTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
