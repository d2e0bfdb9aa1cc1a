"""BERT-uncased WordPiece tokenisation through HF ``tokenizers``; never downloads anything.

A tokenizer is found from a ``vocab.txt``, a ``tokenizer.json``, a folder holding either, or
a Hugging Face model name that is already in the local cache. ``train_wordpiece`` builds a
vocabulary from captions so that an offline machine always has a working tokenizer.

Captions are encoded without [CLS]/[SEP] (the model has its own CLS token), truncated to
``text_len`` and padded with [PAD]; the padding mask is True at padding.
"""
from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

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
    The same captions and settings give the same ``tokenizer.json``, byte for byte, in any
    process: see :func:`wordpiece_vocab` for why this does not use ``tokenizers``' trainer.
    ``vocab_size`` is a target: every character of the captions (and its ``##`` form) is
    kept, so a text with a larger alphabet gives a larger vocabulary.
    """
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase=not cased,
                         strip_accents=not keep_accents)
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    vocab = wordpiece_vocab(words, vocab_size, min_frequency)
    tok = _bert_pipeline(Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")),
                         lowercase=not cased, strip_accents=not keep_accents)
    tok.add_special_tokens(SPECIAL_TOKENS)  # as the trainer did: never split, skipped when decoding
    return tok


def wordpiece_vocab(words: Mapping[str, int], vocab_size: int, min_frequency: int = 1,
                    prefix: str = "##") -> list[str]:
    """The tokens of a WordPiece vocabulary learnt from word counts, in id order.

    The algorithm of ``tokenizers``' WordPieceTrainer (a BPE merge loop over characters, a
    non-initial piece marked with ``prefix``), with every choice made in a fixed order. Its
    trainer numbers the ``##`` characters in hash-map order, which differs between processes,
    and breaks ties between equally frequent merges by those numbers, so the same text gives
    other ids and even other tokens each time (huggingface/tokenizers#1794, fix proposed in
    PR #2066). Here: the special tokens, the characters and then the ``##`` characters in
    code-point order, then merges, the most frequent pair first and, between equal counts,
    the pair of lower ids (the trainer's own rule), until ``vocab_size`` tokens or no pair
    occurs ``min_frequency`` times.
    """
    vocab = list(SPECIAL_TOKENS)
    chars = sorted({c for w in words for c in w})
    inner = sorted({c for w in words for c in w[1:]})
    vocab += [c for c in chars if c not in vocab] + [prefix + c for c in inner if prefix + c not in vocab]
    ids = {t: i for i, t in enumerate(vocab)}
    # Each distinct word as a list of token ids, with its count.
    spelt = [[ids[w[0]]] + [ids[prefix + c] for c in w[1:]] for w in words]
    counts = list(words.values())
    pairs: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i, (syms, n) in enumerate(zip(spelt, counts)):
        for pair in zip(syms, syms[1:]):
            pairs[pair] = pairs.get(pair, 0) + n
            where.setdefault(pair, set()).add(i)
    # Max-heap on (count, then lower ids first); an entry whose count is out of date is dropped
    # (every change pushed a fresh one).
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pairs.get((a, b)) != -neg:
            continue
        if -neg < max(min_frequency, 1):
            break
        piece_b = vocab[b][len(prefix):] if vocab[b].startswith(prefix) else vocab[b]
        token = vocab[a] + piece_b
        if token not in ids:  # another pair may have spelt it already
            ids[token] = len(vocab)
            vocab.append(token)
        new = ids[token]
        changed: dict[tuple[int, int], int] = {}
        for i in sorted(where.pop((a, b))):
            old, n = spelt[i], counts[i]
            merged, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(old[j])
                    j += 1
            if len(merged) == len(old):
                continue
            for pair in zip(old, old[1:]):
                changed[pair] = changed.get(pair, 0) - n
            for pair in zip(merged, merged[1:]):
                changed[pair] = changed.get(pair, 0) + n
                where.setdefault(pair, set()).add(i)
            spelt[i] = merged
        for pair, delta in changed.items():
            if delta:
                pairs[pair] = pairs.get(pair, 0) + delta
                if pairs[pair] > 0:
                    heapq.heappush(heap, (-pairs[pair], *pair))
        pairs.pop((a, b), None)
    return vocab


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
