"""m3ae finetune: fine-tune the whole encoder or its last k blocks for classification, with
layer-wise LR decay, label smoothing, crop/flip + RandAugment, Mixup/CutMix and drop path
(the official recipe's defaults); top-1/top-5 per epoch."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, write_results

EPILOG = """examples:
  m3ae finetune runs/demo/final --train shapes:5000:0 --val shapes:500:1 --out runs/ft --epochs 5
  m3ae finetune runs/demo/final --train shapes:5000:0 --val shapes:500:1 --out runs/ft2 --last-blocks 2
  # the supervised ceiling: the same encoder from random weights, 2,600 steps, plain crop + flip,
  # top-1 and the encoder saved at steps 650 and 1300 (resumable: run it again to continue)
  m3ae finetune runs/tin/final --random-init --train CACHE --val VALCACHE --out runs/sup --steps 2600 \\
      --save-at 650,1300 --lr 2e-3 --layer-decay 1 --label-smoothing 0 --mixup 0 --cutmix 0 \\
      --drop-path 0 --randaug 0 --crop-scale 0.2 1
"""


def register(sub) -> None:
    p = add_eval_command(sub, "finetune", "fine-tune the encoder (all or last k blocks) as a classifier",
                         __doc__, EPILOG, out="folder for the classifier and results.json")
    p.add_argument("--train", required=True, help="training split; " + DATA_HELP)
    p.add_argument("--val", required=True, help="evaluation split (same forms)")
    p.add_argument("--last-blocks", type=int, default=None, help="train only the last K blocks (default: all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--base-lr", type=float, default=5e-4, help="LR = base-lr * batch / 256 (AdamW)")
    p.add_argument("--lr", type=float, default=None, help="absolute LR (overrides --base-lr)")
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale range (default 0.08 1.0)")
    p.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha, 0 = off (default 0.8, the official recipe)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha, 0 = off (default 1.0)")
    p.add_argument("--switch-prob", type=float, default=0.5,
                   help="with both on, the chance a batch gets CutMix instead of Mixup (default 0.5)")
    p.add_argument("--drop-path", type=float, default=0.1,
                   help="stochastic depth of the encoder's last block, rising linearly from 0 (default 0.1)")
    p.add_argument("--randaug", default="2,9", metavar="N,M",
                   help="RandAugment: N ops at magnitude M (default 2,9); 0 = off")
    p.add_argument("--limit-train", type=int, default=None, help="needed for WebDataset shards (their size)")
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true",
                   help="train the model's architecture from random weights (seeded by --seed): the "
                        "supervised baseline of the same encoder")
    p.add_argument("--steps", type=int, default=None,
                   help="train this many steps instead of --epochs, measuring at --save-at steps and at the end")
    p.add_argument("--warmup-steps", type=int, default=None, help="with --steps (default: --warmup-epochs)")
    p.add_argument("--save-at", default="", metavar="N,N,...",
                   help="steps at which top-1 is measured and the encoder saved as OUT/step_N (a model folder)")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="write a resumable state to OUT/state every N steps (a rerun with the same --out "
                        "continues from it; image folders and caches only)")
    p.set_defaults(func=run)


def _randaug(text: str) -> tuple[int, int] | None:
    if text.strip() in ("0", "none", "off"):
        return None
    try:
        n, m = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--randaug takes N,M (ops, magnitude) or 0, got {text!r}") from None
    if n < 0 or not 0 <= m <= 30:
        raise ValueError(f"--randaug: N must be >= 0 and M in [0, 30], got {text!r}")
    return (n, m) if n else None


def run(args) -> int:
    from ..device import resolve_device
    from ..evaluation.data import load_labelled, make_loader
    from ..evaluation.finetune import finetune
    from ..factory import load_pretrained

    randaug = _randaug(args.randaug)
    model = load_pretrained(args.model, resolve_device(args.device), need_tokenizer=False)[0]
    if args.random_init:
        from ..evaluation.features import random_init_model

        model = random_init_model(model.config, args.seed).to(resolve_device(args.device))
    try:
        save_at = [int(x) for x in args.save_at.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--save-at takes step numbers separated by commas, got {args.save_at!r}") from None
    resumable = bool(save_at or args.ckpt_every)
    size = model.config.image_size
    train = load_labelled(args.train, size, train=True, limit=args.limit_train, crop_scale=tuple(args.crop_scale),
                          randaug=randaug)
    val = load_labelled(args.val, size, limit=args.limit_val)
    names = train.class_names or val.class_names
    if names is None:
        raise ValueError("cannot tell the number of classes: put a classes.txt beside the shards")
    res = finetune(model, make_loader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed),
                   make_loader(val, batch_size=args.batch_size), len(names), last_blocks=args.last_blocks,
                   epochs=args.epochs, base_lr=args.base_lr, lr=args.lr, layer_decay=args.layer_decay,
                   weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                   warmup_epochs=args.warmup_epochs, class_names=names, mixup=args.mixup, cutmix=args.cutmix,
                   switch_prob=args.switch_prob, drop_path=args.drop_path, progress=not args.no_progress,
                   seed=args.seed, steps=args.steps, warmup_steps=args.warmup_steps,
                   run_dir=args.out if resumable else None, save_at=save_at, ckpt_every=args.ckpt_every)
    def top5(d):  # hidden with 5 classes or fewer, where it is 100% by construction
        return f"  top-5 {d['top5']:.2%}" if d.get("top5") is not None else ""

    for h in res.history:
        where = f"epoch {h['epoch']}" if "epoch" in h else f"step {h['step']}"
        loss = f"train loss {h['train_loss']:.4f}  " if "train_loss" in h else ""
        print(f"{where}: {loss}top-1 {h['top1']:.2%}{top5(h)}")
    res.classifier.save(args.out)
    what = "all blocks" if args.last_blocks is None else f"last {args.last_blocks} block(s)"
    what += " from random weights" if args.random_init else ""
    write_results(args.out, "results.json", {**res.as_dict(), "model": str(args.model), "trained": what,
                                             "train": args.train, "val": args.val}, args)
    print(f"fine-tuned {what}: top-1 {res.top1:.2%}{top5(res.as_dict())} (chance {res.chance:.2%}); "
          f"classifier in {args.out}")
    return 0
