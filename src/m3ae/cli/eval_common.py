"""Arguments and helpers shared by the evaluation subcommands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import atomic_write, write_json_atomic
from .common import add_debug_arg

DATA_HELP = ("labelled data: 'shapes[:N[:SEED]]' (built-in), an image folder root/CLASS/x.jpg, or "
             "WebDataset shards with .cls (globs/brace patterns, several joined by '::')")


def add_eval_command(sub, name: str, help: str, description: str, epilog: str = "",
                     out: str | None = None) -> argparse.ArgumentParser:
    """An evaluation subcommand's parser with the arguments every one of them takes
    (pretrained model, --device, --batch-size, --no-progress, --debug); ``out`` makes
    ``--out`` a required argument with that help. Each command writes its settings
    (:func:`write_settings`) beside what it writes."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    if out:
        p.add_argument("--out", required=True, help=out)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pretrained folder (config.json + model.safetensors [+ tokenizer.json]), "
                                 "e.g. RUN/final")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_arg(p)


def add_feature_args(p: argparse.ArgumentParser, both: bool = False) -> None:
    if both:
        p.add_argument("--pool", default="both", choices=["both", "cls", "mean"],
                       help="CLS token, mean of tokens, or both (default: both, from one pass; after short "
                            "training the mean is often the better feature)")
    else:
        p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token (default) or mean of tokens")
    p.add_argument("--block", type=int, default=None,
                   help="take this encoder block's output (0-based, -1 = last) instead of the final output")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $M3AE_CACHE/features or ~/.cache/m3ae/features)")


def features_for(args, spec: str, limit, desc: str, model_dir=None, pool=None, layers=None):
    """Cached features of the labelled data ``spec`` for the command's model (or ``model_dir``),
    with its --pool (or ``pool``), --block (or the sweep ``layers``), --cache-dir and device."""
    from ..device import resolve_device
    from ..evaluation.data import load_labelled
    from ..evaluation.features import cached_features
    from ..pretrained import read_model_config

    model_dir = model_dir or args.model
    size = read_model_config(model_dir).image_size
    return cached_features(model_dir, load_labelled(spec, size, limit=limit), pool=pool or args.pool,
                           block=args.block if layers is None else list(layers), batch_size=args.batch_size,
                           cache_dir=args.cache_dir, progress=not args.no_progress,
                           device=resolve_device(args.device), desc=desc)


def write_settings(path: str | Path, args: argparse.Namespace) -> Path:
    """The command's resolved settings (every argument, defaults included) as JSON at ``path``,
    so that a result can be re-made as it was."""
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    return atomic_write(path, json.dumps(settings, indent=2, default=str))


def write_results(out: str | Path | None, name: str, results: dict, args: argparse.Namespace | None = None):
    """Write ``results`` as JSON into ``out``; with ``args``, :func:`write_settings` beside it
    as ``settings.json``."""
    if not out:
        return None
    path = write_json_atomic(Path(out) / name, results)
    if args is not None:
        write_settings(path.parent / "settings.json", args)
    return path

