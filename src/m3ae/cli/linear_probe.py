"""m3ae linear-probe: frozen encoder, CLS feature, BatchNorm (no affine) + linear layer; top-1/top-5
and a kNN check on the evaluation split. Features are cached on disk (model + data hash)."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, add_feature_args, write_results

EPILOG = """examples:
  m3ae linear-probe runs/demo/final --train shapes:2000:0 --val shapes:500:1
  m3ae linear-probe runs/tin/final --train '../shared/data/tiny-imagenet-captions/train-*.tar.gz' \\
      --val '../shared/data/tiny-imagenet-captions/val-*.tar.gz' --out runs/tin/probe
"""


def register(sub) -> None:
    p = add_eval_command(sub, "linear-probe", "linear probe + kNN on frozen encoder features", __doc__, EPILOG)
    p.add_argument("--train", required=True, help="training split; " + DATA_HELP)
    p.add_argument("--val", required=True, help="evaluation split (same forms)")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default 0.1 * probe batch / 256 (SGD, cosine)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and probe.safetensors")
    add_feature_args(p)
    p.set_defaults(func=run)


def features_for(args, spec: str, limit, desc: str):
    from ..evaluation.data import load_labelled
    from ..evaluation.features import cached_features, resolve_device
    from ..pretrained import read_model_config

    size = read_model_config(args.model).image_size
    return cached_features(args.model, load_labelled(spec, size, limit=limit), pool=args.pool, block=args.block,
                           batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.no_progress,
                           device=resolve_device(args.device), desc=desc)


def run(args) -> int:
    from pathlib import Path

    from safetensors.torch import save_file

    from ..evaluation.linear_probe import linear_probe

    train = features_for(args, args.train, args.limit_train, "train features")
    val = features_for(args, args.val, args.limit_val, "val features")
    res = linear_probe(train, val, epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                       knn_k=args.knn_k, seed=args.seed)
    print(f"linear probe: top-1 {res.top1:.2%}  top-5 {res.top5:.2%}   kNN (k={args.knn_k}): top-1 "
          f"{res.knn_top1:.2%}  top-5 {res.knn_top5:.2%}   ({res.num_train} train / {res.num_eval} eval, "
          f"{res.num_classes} classes, chance {res.chance:.2%})")
    if args.out:
        write_results(args.out, "results.json", {**res.as_dict(), "model": str(args.model), "train": args.train,
                                                 "val": args.val, "pool": args.pool, "block": args.block}, args)
        save_file(res.probe.state_dict(), str(Path(args.out) / "probe.safetensors"))
        print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
