"""m3ae demo: the main job on built-in data, end to end in minutes on a laptop CPU: pre-train a
tiny M3AE on procedurally drawn shapes with captions, then measure on held-out samples what it
learned (hidden colour and shape words from the image, cross-modal reconstruction, a linear
probe against a random-init encoder and raw pixels) and write summary.md / summary.json."""
from __future__ import annotations

from .common import add_debug_arg


def register(sub) -> None:
    p = sub.add_parser("demo", help="pre-train a tiny M3AE on built-in data and report what it learned",
                       description=__doc__ + " Re-running a finished run prints its summary; re-running an "
                       "interrupted one continues from its last checkpoint.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=300")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out samples for words and pictures")
    p.add_argument("--probe-samples", type=int, default=2000,
                   help="training images of the linear probe (half as many are held out)")
    p.add_argument("--no-progress", action="store_true")
    add_debug_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..demo import run_demo
    from ..training.checkpoint import list_checkpoints

    try:
        run_demo(args.out, args.overrides, args.eval_samples, progress=not args.no_progress,
                 probe_sizes=(args.probe_samples, max(args.probe_samples // 2, 2)))
    except KeyboardInterrupt:
        out = Path(args.out)
        ckpts = list_checkpoints(out) if out.is_dir() else []
        where = f"its last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        print(f"\ninterrupted; {where}. Run the same command again to continue.")
        return 130
    return 0
