"""m3ae zero-shot: classify images by how well the text head reconstructs each class name in
a prompt ("a photo of a {}."), with only the class-name tokens masked; accuracy vs chance."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, write_results

EPILOG = """examples:
  m3ae zero-shot runs/demo/final --data shapes:500:1 --template 'a picture of a [MASK] {}'
  m3ae zero-shot runs/x/final --data '../shared/data/cifar10/test-000000.tar.gz' --limit 1000
[MASK] in the template hides a caption word that is not scored (one the prompt cannot know).
"""


def register(sub) -> None:
    p = add_eval_command(sub, "zero-shot", "zero-shot classification by reconstructing class names", __doc__, EPILOG)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--template", default="a photo of a {}.", help="prompt with one {} for the class name")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: the data's)")
    p.add_argument("--normalize", default="mean", choices=["mean", "sum"],
                   help="mean (default) or sum of the class tokens' log-likelihoods")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for results.json and confusion.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..device import resolve_device
    from ..evaluation.data import load_labelled, make_loader
    from ..factory import load_pretrained
    import sys
    from pathlib import Path

    from ..evaluation.data import data_name
    from ..evaluation.zero_shot import class_name_warnings, plot_confusion, zero_shot_classify

    model, te, _ = load_pretrained(args.model, resolve_device(args.device), need_tokenizer=True)
    data = load_labelled(args.data, model.config.image_size, limit=args.limit)
    names = [c.strip() for c in args.classes.split(",")] if args.classes else data.class_names
    if not names:
        raise ValueError("no class names: pass --classes or put a classes.txt beside the shards")
    for w in class_name_warnings(te, names):  # before the long part: the user may want to stop
        print(f"warning: {w}", file=sys.stderr)
    res = zero_shot_classify(model, te, make_loader(data, batch_size=args.batch_size), names, args.template,
                             args.normalize, progress=not args.no_progress)
    print(f"zero-shot accuracy {res.accuracy:.2%} (calibrated by the no-image prior: "
          f"{res.accuracy_calibrated:.2%}); chance {res.chance:.2%}, majority class {res.majority:.2%}; "
          f"{res.num_samples} samples")
    print("predicted:", ", ".join(f"{k} {v}" for k, v in res.per_class_predictions.items()))
    if args.out:
        write_results(args.out, "results.json", {**res.as_dict(), "model": str(args.model), "data": args.data,
                                                 "template": args.template, "normalize": args.normalize}, args)
        png = plot_confusion(res, names, Path(args.out) / "confusion.png",
                             title=f"zero-shot on {data_name(args.data)}: {res.accuracy:.1%} (chance {res.chance:.1%})")
        print(f"wrote {Path(args.out) / 'results.json'} and {png}")
    return 0
