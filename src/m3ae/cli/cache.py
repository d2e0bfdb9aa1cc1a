"""m3ae cache: decode small images once into an in-memory dataset (``data.source=cache``)."""
from __future__ import annotations

import argparse

from .common import add_debug_arg

SOURCE_KINDS = ("webdataset", "table", "imagefolder", "hdf5")


def register(sub) -> None:
    p = sub.add_parser("cache", help="decode small images once into an in-memory dataset", description=__doc__)
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    b = csub.add_parser(
        "build", help="decode sources into a cache folder",
        description="Decode every image of the sources once, resize its shorter side to --image-size and keep "
                    "the centre square, and write one memory-mappable uint8 array with the raw captions, labels "
                    "and keys beside it. Train on it with data.source=cache data.urls=DIR; evaluation commands "
                    "take DIR as their data. Bad samples are skipped and counted per reason, as in streaming.")
    b.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="WebDataset shards (brace patterns, globs, '::'-joined), a table (.csv/.tsv/.jsonl/"
                        ".parquet), an HDF5 file or an image folder; several are concatenated")
    b.add_argument("-o", "--output", required=True, help="the cache folder to create (must not exist, or be empty)")
    b.add_argument("--image-size", type=int, required=True, help="side of the stored square images, in pixels")
    b.add_argument("--source", choices=SOURCE_KINDS, default=None,
                   help="what the sources are (default: guessed from each path)")
    b.add_argument("--limit", type=int, default=None, help="stop after this many images")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_arg(b)
    b.set_defaults(func=run_build)
    i = csub.add_parser("info", help="what a cache folder holds")
    i.add_argument("cache")
    add_debug_arg(i)
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def run_build(args: argparse.Namespace) -> int:
    import time

    from ..data.cache import ImageCache, build_cache, source_config

    if args.image_size < 1:
        raise ValueError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    sources = [source_config(s, args.source) for s in args.sources]
    t0 = time.perf_counter()
    build_cache(sources, args.output, args.image_size, progress=not args.no_progress, limit=args.limit)
    cache = ImageCache(args.output)
    print(f"{cache.describe()}; built in {time.perf_counter() - t0:.1f} s; "
          f"train with data.source=cache data.urls={args.output}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import json

    from ..data.cache import ImageCache

    cache = ImageCache(args.cache)
    print(cache.describe())
    m = cache.manifest
    print(json.dumps({k: m[k] for k in ("sources", "with_label", "files")}, indent=2))
    return 0
