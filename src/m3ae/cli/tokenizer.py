"""m3ae tokenizer: build a WordPiece vocabulary offline, or inspect one."""
from __future__ import annotations

import argparse

from .common import add_debug_arg


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a WordPiece tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a WordPiece vocabulary from captions",
                        description="Train a BERT-style WordPiece tokenizer from text files (one caption "
                                    "per line) or from the built-in data, and save it as tokenizer.json. "
                                    "Like BERT-uncased it lower-cases and strips accents unless told "
                                    "otherwise; the choice is recorded in tokenizer.json.")
    t.add_argument("inputs", nargs="*", help="text files, one caption per line (none: the built-in data)")
    t.add_argument("-o", "--output", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--min-frequency", type=int, default=2)
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


def _lines(paths):
    from pathlib import Path

    for path in paths:
        with open(Path(path), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.synthetic import ShapesDataset
    from ..tokenizer import train_wordpiece

    for path in args.inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"caption file {path} does not exist")
    texts = _lines(args.inputs) if args.inputs else ShapesDataset().captions(limit=5000)
    tok = train_wordpiece(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          cased=args.cased, keep_accents=args.keep_accents)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    how = ", ".join(["cased" if args.cased else "lower-cased",
                     "accents kept" if args.keep_accents else "accents stripped"])
    print(f"wrote {out} ({tok.get_vocab_size()} tokens; {how})")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer

    enc = load_tokenizer(args.tokenizer).encode(args.text, add_special_tokens=False)
    print(" ".join(enc.tokens))
    print(" ".join(map(str, enc.ids)))
    return 0
