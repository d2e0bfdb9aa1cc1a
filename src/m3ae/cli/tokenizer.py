"""m3ae tokenizer: build a WordPiece vocabulary offline, or inspect one."""
from __future__ import annotations

import argparse

from .common import add_debug_arg

SOURCE_KINDS = ("webdataset", "table", "hdf5", "text", "imagefolder", "cache", "synthetic")
# Fewer captions than this is a wrong input (a file of a few lines), not a corpus.
MIN_CAPTIONS = 20


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a WordPiece tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a WordPiece vocabulary from captions",
                        description="Train a BERT-style WordPiece tokenizer on the captions of any pre-training "
                                    "source, read as data.tokenizer=from-data reads them, and save it as "
                                    "tokenizer.json. Like BERT-uncased it lower-cases and strips accents unless "
                                    "told otherwise; the choice is recorded in tokenizer.json. The same captions "
                                    "and options give the same file, byte for byte.")
    t.add_argument("inputs", nargs="*", metavar="SOURCE",
                   help="WebDataset shards (brace patterns, '::'-joined), a table (.csv/.tsv/.jsonl/.parquet), "
                        "an HDF5 file, a text file (.txt, one caption per line), an image folder with xxx.txt "
                        "captions, a cache folder (m3ae cache build); several are read in turn (none: the "
                        "built-in data)")
    t.add_argument("--source", choices=SOURCE_KINDS, default=None,
                   help="what the inputs are (default: guessed from each path)")
    t.add_argument("-o", "--output", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-captions", type=int, default=20000,
                   help="read at most this many captions, in the sources' order (default: 20000, as from-data)")
    t.add_argument("--cased", action="store_true", help="keep upper case (default: lower-case everything)")
    t.add_argument("--keep-accents", action="store_true",
                   help="keep accents (default: strip them, which merges e.g. Vietnamese 'cá', 'cà', 'ca')")
    add_debug_arg(t)
    t.set_defaults(func=run_train)
    e = tsub.add_parser("encode", help="show how a tokenizer splits a caption")
    e.add_argument("tokenizer", help="vocab.txt, tokenizer.json, folder, or cached HF name")
    e.add_argument("text")
    add_debug_arg(e)
    e.set_defaults(func=run_encode)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def _captions(args: argparse.Namespace) -> list[str]:
    """The captions of the inputs through the library's reader (what from-data reads)."""
    from ..config import DataConfig
    from ..data import DataError, source_captions
    from ..data.cache import source_kind

    configs = [DataConfig(source=args.source or source_kind(s), urls=s) for s in args.inputs]
    if not configs:
        configs = [DataConfig(source=args.source or "synthetic")]
    captions: list[str] = []
    for cfg in configs:
        found = list(source_captions(cfg, limit=args.max_captions - len(captions)))
        if not found:
            what = f"{cfg.source} {cfg.urls!r}" if cfg.urls else cfg.source
            raise DataError(f"{what} holds no captions to train a tokenizer on"
                            + (" (no xxx.txt beside its images)" if cfg.source == "imagefolder" else ""))
        captions += found
    if len(captions) < MIN_CAPTIONS:
        raise DataError(f"only {len(captions)} caption(s) in {' '.join(args.inputs)}: a vocabulary needs at least "
                        f"{MIN_CAPTIONS}; is this the caption file you meant?")
    return captions


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tokenizer import SPECIAL_TOKENS, train_wordpiece

    if args.max_captions < 1 or args.vocab_size < 1:
        raise ValueError("--max-captions and --vocab-size must be positive")
    captions = _captions(args)
    tok = train_wordpiece(captions, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          cased=args.cased, keep_accents=args.keep_accents)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    how = ", ".join(["cased" if args.cased else "lower-cased",
                     "accents kept" if args.keep_accents else "accents stripped"])
    n = tok.get_vocab_size()
    print(f"wrote {out} ({n} tokens from {len(captions)} captions; {how})")
    if n > args.vocab_size:
        # Every character and its '##' form stay, so that any word of the captions can be spelt.
        vocab = [t for t in tok.get_vocab() if t not in SPECIAL_TOKENS]
        chars = sum(1 for t in vocab if len(t) == 1)
        cont = sum(1 for t in vocab if len(t) == 3 and t.startswith("##"))
        print(f"note: {n} tokens, more than --vocab-size {args.vocab_size}: the captions hold {chars} distinct "
              f"characters, {cont} of them also inside words ('##' forms); these and the {len(SPECIAL_TOKENS)} "
              "special tokens are always kept, so that every word can be spelt")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer

    enc = load_tokenizer(args.tokenizer).encode(args.text, add_special_tokens=False)
    print(" ".join(enc.tokens))
    print(" ".join(map(str, enc.ids)))
    return 0
