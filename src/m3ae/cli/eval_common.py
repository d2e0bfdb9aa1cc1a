"""Arguments and helpers shared by the evaluation subcommands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA_HELP = ("labelled data: 'shapes[:N[:SEED]]' (built-in), an image folder root/CLASS/x.jpg, or "
             "WebDataset shards with .cls (globs/brace patterns, several joined by '::')")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pretrained folder (config.json + model.safetensors [+ tokenizer.json]), "
                                 "e.g. RUN/final")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token (default) or mean of tokens")
    p.add_argument("--block", type=int, default=None,
                   help="take this encoder block's output (0-based, -1 = last) instead of the final output")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $M3AE_CACHE/features or ~/.cache/m3ae/features)")


def write_results(out: str | Path | None, name: str, results: dict) -> Path | None:
    if not out:
        return None
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path

