"""m3ae demo: the main job on built-in data, end to end in minutes on a laptop CPU."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="pre-train a tiny M3AE on built-in data and report what it learned",
                       description=__doc__ + " Re-running continues from the last checkpoint in --out.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=300")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    res = run_demo(args.out, args.overrides, args.eval_samples, progress=not args.no_progress)
    acc = res["accuracy"]
    print(f"masked-token accuracy: {acc['image_masked']['all']:.1%} with the image, "
          f"{acc['no_image']['all']:.1%} with the image removed")
    print(f"summary: {res['summary']}")
    return 0
