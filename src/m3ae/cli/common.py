"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

from ..config import PRESETS, Config, build_config


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    """``--debug``, which every subcommand takes: errors show their full traceback instead of
    one line (see :func:`m3ae.cli.main`)."""
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "base") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides such as train.steps=200 model.emb_dim=256 data.source=webdataset")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"model preset (default: the config file's, else {default_preset})")
    p.add_argument("--config", default=None, help="YAML or JSON config file with model/data/train sections")
    add_debug_arg(p)
    p.set_defaults(default_preset=default_preset)


def config_from_args(args: argparse.Namespace) -> Config:
    preset = args.preset
    if preset is None and args.config is None:
        preset = args.default_preset
    return build_config(preset, args.config, args.overrides)
