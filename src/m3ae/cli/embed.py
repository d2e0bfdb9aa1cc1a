"""m3ae embed: encoder features of a data set, written to .npy or .safetensors with labels and keys."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, write_settings


def register(sub) -> None:
    p = add_eval_command(sub, "embed", "write encoder features (image, text or both) to a file",
                         __doc__ + " With .npy, labels and keys go to <stem>.labels.npy and <stem>.keys.json "
                                   "beside it; the settings always go to <stem>.settings.json.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("-o", "--output", required=True, help="features.npy or features.safetensors")
    p.add_argument("--modality", default="image", choices=["image", "text", "both"])
    p.add_argument("--pool", default="cls", choices=["cls", "mean"])
    p.add_argument("--block", type=int, default=None, help="encoder block (0-based, -1 = last) instead of the output")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..device import resolve_device
    from ..evaluation.data import load_labelled, make_loader
    from ..evaluation.features import extract_features
    from ..factory import load_pretrained

    if Path(args.output).suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--output must end in .npy or .safetensors, got {args.output}")
    model, te, _ = load_pretrained(args.model, resolve_device(args.device), need_tokenizer=args.modality != "image")
    data = load_labelled(args.data, model.config.image_size, limit=args.limit)
    loader = make_loader(data, te if args.modality != "image" else None, args.batch_size)
    feats = extract_features(model, loader, args.modality, args.pool, args.block, not args.no_progress,
                             data.class_names, desc="embed")
    path = feats.save(args.output)
    write_settings(Path(args.output).with_suffix(".settings.json"), args)
    print(f"wrote {path}: {feats.features.shape[0]} x {feats.features.shape[1]} features "
          f"({args.modality}, {args.pool}{'' if args.block is None else f', block {args.block}'})")
    return 0
