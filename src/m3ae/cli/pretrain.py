"""m3ae pretrain: pre-train an M3AE (or an MAE, with no captions) from a config."""
from __future__ import annotations

from .common import add_config_args, config_from_args

EPILOG = """examples:
  m3ae pretrain --preset tiny --out runs/tiny train.steps=500
  m3ae pretrain --preset base --out runs/cc --config cc12m.yaml train.precision=bf16
  m3ae pretrain --out runs/tiny --resume latest          # continue an interrupted run (also after Ctrl-C)
  m3ae pretrain --preset tiny --out runs/tiny --overwrite  # start again, deleting the old run
  torchrun --nproc-per-node 8 -m m3ae pretrain --preset base --out runs/cc train.batch_size=64
  torchrun --nproc-per-node 8 --max-restarts 3 -m m3ae pretrain ...   # restarted workers resume
  m3ae pretrain --preset tiny --out runs/tin data.source=webdataset \\
      data.urls='../shared/data/tiny-imagenet-captions/train-{000000..000007}.tar.gz' data.tokenizer=tok.json
"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser("pretrain", help="pre-train an M3AE", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="tiny")
    p.add_argument("--out", required=True, help="run folder (config, metrics, checkpoints, pictures)")
    p.add_argument("--resume", default=None,
                   help="'latest' (newest checkpoint in --out; a new run when there is none) or a "
                        "checkpoint folder RUN/checkpoints/step_N")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (checkpoints, final/, metrics) and start again; "
                        "without it, pretrain refuses a folder that holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..config import Config
    from ..training import pretrain

    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file() and args.config is None and args.preset is None:
        # Resuming continues the run as it was configured; overrides still apply on top.
        from ..config import apply_overrides, read_config_file
        cfg = Config.from_dict(apply_overrides(read_config_file(saved), args.overrides))
    else:
        cfg = config_from_args(args)
    from ..training import TrainingDiverged
    from ..training.checkpoint import CheckpointWriteError
    from ..training.distributed import env_rank_info
    from ..training.loggers import MetricsWriteError
    from ..training.trainer import RankFailed

    main = env_rank_info()[0] == 0
    try:
        result = pretrain(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                          overwrite=args.overwrite)
    except TrainingDiverged as e:
        if args.debug:
            raise
        if main:
            print(f"m3ae pretrain: {e}", file=sys.stderr)
        return 3
    except (CheckpointWriteError, MetricsWriteError, RankFailed) as e:
        if args.debug:
            raise
        print(f"m3ae pretrain: error: {e}", file=sys.stderr)  # every rank: each log says why it stopped
        return 4
    if main and result.start_step and result.start_step >= result.steps:
        print(f"already finished: {result.run_dir} is at step {result.start_step} (train.steps={result.steps}); "
              f"nothing was trained. To continue it, resume with a larger train.steps=N")
    elif main:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, run folder {result.run_dir}; "
              f"data: {result.data_summary}")
    return 0
