"""m3ae linear-probe: frozen encoder, CLS and mean-pooled features, BatchNorm (no affine) + linear
layer; top-1/top-5 and a kNN check on the evaluation split, beside chance, a raw-pixel baseline
and (with --baselines random-init) the same encoder with random weights. With --blocks, the
same probe at every chosen layer, all layers' features from one encoder pass. Features are
cached on disk (model + data hash)."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, add_feature_args, features_for, write_results

EPILOG = """examples:
  m3ae linear-probe runs/demo/final --train shapes:2000:0 --val shapes:500:1
  m3ae linear-probe runs/tin/final --train '../shared/data/tiny-imagenet-captions/train-*.tar.gz' \\
      --val '../shared/data/tiny-imagenet-captions/val-*.tar.gz' --out runs/tin/probe --baselines pixels,random-init
  m3ae linear-probe runs/demo/final --train shapes:2000:0 --val shapes:500:1 --blocks all   # every layer
"""
BASELINES = ("pixels", "random-init")


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
    p.add_argument("--baselines", default="pixels",
                   help="comma-separated baselines probed the same way: pixels (8x8 average-pooled images; "
                        "free, default), random-init (the same architecture untrained: one more feature "
                        "pass, then cached), or none")
    p.add_argument("--out", default=None, help="folder for results.json and probe.safetensors")
    add_feature_args(p, both=True)
    p.add_argument("--blocks", default=None, metavar="all|LIST",
                   help="probe every layer ('all': each block's output, then the final normalised output) or "
                        "these (e.g. 0,2,final); all layers' features come from one encoder pass")
    p.set_defaults(func=run)


def _row(name: str, r, with_top5: bool) -> str:
    five = lambda v: f"{v:>7.2%}" if v is not None else f"{'':>7}"  # noqa: E731
    cells = f"{r.top1:>11.2%}" + (five(r.top5) if with_top5 else "") + f"{r.knn_top1:>11.2%}"
    return f"  {name:<26}{cells}" + (five(r.knn_top5) if with_top5 else "")


def run(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..evaluation.data import data_name
    from ..evaluation.features import random_init_folder
    from ..evaluation.linear_probe import linear_probe
    from ..io import save_safetensors

    baselines = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    bad = sorted(set(baselines) - set(BASELINES))
    if bad:
        raise ValueError(f"--baselines takes {', '.join(BASELINES)} or none; got {', '.join(bad)}")
    pools = ("cls", "mean") if args.pool == "both" else (args.pool,)
    layers = None
    if args.blocks:
        from ..ops import resolve_blocks
        from ..pretrained import read_model_config

        if args.block is not None:
            raise ValueError("--block and --blocks contradict each other: one layer or a sweep")
        layers = resolve_blocks(args.blocks, read_model_config(args.model).depth)
    train = features_for(args, args.train, args.limit_train, "train features", pool=pools, layers=layers)
    val = features_for(args, args.val, args.limit_val, "val features", pool=pools, layers=layers)
    progress = not args.no_progress

    def probe(tr, va, what):
        # Probe training is 90 epochs on cached features (seconds to minutes): say what runs.
        tqdm.write(f"{what}: linear probe ({args.epochs} epochs on {len(tr)} x {tr.features.shape[1]} "
                   f"features) and kNN (k={args.knn_k})")
        return linear_probe(tr, va, epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                            knn_k=args.knn_k, seed=args.seed, progress=progress, desc=what)

    if layers is not None:
        return _sweep(args, layers, pools, train, val, probe)
    results = {p: probe(train[p], val[p], f"{p} pooling") for p in pools}
    extra = {}
    if "pixels" in baselines:
        tr, va = train[pools[0]], val[pools[0]]
        if tr.pixels is None or va.pixels is None:
            tqdm.write("raw-pixel baseline skipped: cached features from an older m3ae hold no pixels")
        else:
            from ..evaluation.features import Features

            extra["raw pixels (8x8)"] = probe(Features(tr.pixels, tr.labels, tr.keys, tr.class_names),
                                              Features(va.pixels, va.labels, va.keys, va.class_names), "raw pixels")
    if "random-init" in baselines:
        rdir = random_init_folder(args.model, args.cache_dir, args.seed)
        rtr = features_for(args, args.train, args.limit_train, "random-init train features", rdir, pools[0])
        rva = features_for(args, args.val, args.limit_val, "random-init val features", rdir, pools[0])
        extra[f"random init ({pools[0]})"] = probe(rtr, rva, "random init")

    first = results[pools[0]]
    with_top5 = first.top5 is not None
    head = "probe top-1" + (" top-5" if with_top5 else "") + "  kNN top-1" + (" top-5" if with_top5 else "")
    print(f"linear probe on {data_name(args.val)} ({first.num_train} train / {first.num_eval} eval, "
          f"{first.num_classes} classes)")
    print(f"  {'':<26}{head}")
    for p, r in results.items():
        print(_row(f"{p} pooling", r, with_top5))
    for name, r in extra.items():
        print(_row(name, r, with_top5))
    print(f"  {'chance':<26}{first.chance:>11.2%}")
    if args.out:
        baseline_json = {"chance": first.chance, **{k: v.as_dict() for k, v in extra.items()}}
        write_results(args.out, "results.json", {
            **first.as_dict(), "pool": pools[0], "by_pool": {p: r.as_dict() for p, r in results.items()},
            "baselines": baseline_json, "model": str(args.model), "train": args.train, "val": args.val,
            "block": args.block}, args)
        for i, (p, r) in enumerate(results.items()):
            save_safetensors(r.probe.state_dict(), Path(args.out) / ("probe.safetensors" if i == 0 else
                                                                     f"probe_{p}.safetensors"))
        print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _sweep(args, layers, pools, train, val, probe) -> int:
    """``--blocks``: one probe per layer and pool, a table and (with --out) results.json plus
    a plot of top-1 against depth."""
    from pathlib import Path

    from ..evaluation.data import data_name
    from ..evaluation.features import layer_name

    results = {b: {p: probe(train[b][p], val[b][p], f"{layer_name(b)}, {p}") for p in pools} for b in layers}
    first = results[layers[0]][pools[0]]
    print(f"linear probe per layer on {data_name(args.val)} ({first.num_train} train / {first.num_eval} eval, "
          f"{first.num_classes} classes)")
    print(f"  {'':<26}probe top-1  kNN top-1")
    for b, by_pool in results.items():
        for p, r in by_pool.items():
            print(_row(f"{layer_name(b)}, {p}", r, False))
    print(f"  {'chance':<26}{first.chance:>11.2%}")
    if args.out:
        by_layer = {layer_name(b): {p: r.as_dict() for p, r in by_pool.items()} for b, by_pool in results.items()}
        write_results(args.out, "results.json", {
            "by_layer": by_layer, "layers": [layer_name(b) for b in layers], "pools": list(pools),
            "chance": first.chance, "model": str(args.model), "train": args.train, "val": args.val}, args)
        _plot_layers(results, Path(args.out) / "layers.png")
        print(f"wrote {Path(args.out) / 'results.json'} and layers.png")
    return 0


def _plot_layers(results: dict, path) -> None:
    """Probe and kNN top-1 against the layer, a line per pool."""
    from ..evaluation.features import layer_name
    from ..visualize import new_figure, save_figure

    names = [layer_name(b) for b in results]
    fig, ax = new_figure(figsize=(1.2 + 0.8 * len(names), 3.2))
    for p in next(iter(results.values())):
        ax.plot(names, [100 * r[p].top1 for r in results.values()], "o-", label=f"{p}, linear")
        ax.plot(names, [100 * r[p].knn_top1 for r in results.values()], "x--", label=f"{p}, kNN")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("probe at every layer")
    ax.legend(fontsize=8)
    save_figure(fig, path)
