"""The ``m3ae`` command. Each subcommand lives in its own module of this package and
registers itself with ``register(subparsers)``; ``main`` turns expected failures (bad paths,
bad configs) into a one-line message and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `m3ae --help` lists them.
COMMANDS = ["demo", "pretrain", "cache", "tokenizer", "embed", "linear-probe", "finetune", "ood", "zero-shot",
            "visualize", "convert-official", "export-timm"]


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="m3ae", description="Multimodal Masked Autoencoders: pre-train, evaluate, convert.")
    parser.add_argument("--version", action="version", version=f"m3ae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is noticed inside the try
        return code
    except (UserError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        if getattr(args, "debug", False):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"m3ae {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`m3ae ... | head -1`): not an error. Point stdout at devnull so
        # that the interpreter's last flush does not complain either.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except KeyboardInterrupt as e:
        # A training run says where it saved and how to continue; anything else just stops.
        print(f"\n{e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
