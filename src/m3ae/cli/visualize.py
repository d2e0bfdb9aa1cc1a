"""m3ae visualize: pictures for a paper -- reconstructions (with and without captions, masked
words predicted), cross-modal attention (a word over the image, a patch over the caption;
attention rollout by default) and a t-SNE of encoder features coloured by class (two models
side by side with --compare)."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, write_settings

WHAT = ("recon", "attention", "tsne")
EPILOG = """examples:
  m3ae visualize runs/demo/final --data shapes:1000:1 --out pics --word red --patch 27
  m3ae visualize runs/m3ae/final --data shapes:1000:1 --out pics --what tsne --compare runs/mae/final
"""


def register(sub) -> None:
    p = add_eval_command(sub, "visualize", "reconstructions, cross-modal attention maps, t-SNE", __doc__, EPILOG)
    p.add_argument("--data", required=True, help=DATA_HELP + " (captions needed for text pictures)")
    p.add_argument("--out", required=True, help="folder for the PNGs and settings.json")
    p.add_argument("--what", default=",".join(WHAT), help="comma-separated subset of recon,attention,tsne")
    p.add_argument("-n", "--num-images", type=int, default=6, help="rows in the reconstruction/attention pictures")
    p.add_argument("--word", default=None, help="caption word whose attention over the image is shown "
                                                "(default: each caption's last content word, e.g. the noun)")
    p.add_argument("--patch", type=int, default=None, help="patch index (row-major) whose attention over the "
                                                           "caption is shown (default: the centre)")
    p.add_argument("--layer", default="rollout", help="'rollout' (default) or an encoder layer index")
    p.add_argument("--tsne-samples", type=int, default=1000)
    p.add_argument("--compare", default=None, help="a second pretrained folder (e.g. an MAE) for the t-SNE")
    p.add_argument("--names", default="M3AE,MAE", help="panel titles for the model and --compare")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..device import resolve_device
    from ..evaluation.attention import save_attention_figure
    from ..evaluation.data import data_name, load_labelled, make_loader
    from ..evaluation.features import extract_features
    from ..evaluation.tsne import save_tsne
    from ..factory import load_pretrained
    from ..visualize import save_reconstruction_grid

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = sorted(set(what) - set(WHAT))
    if bad:
        raise ValueError(f"--what takes {', '.join(WHAT)}; got {', '.join(bad)}")
    layer = args.layer if args.layer == "rollout" else int(args.layer)
    device = resolve_device(args.device)
    model, te, _ = load_pretrained(args.model, device, need_tokenizer="attention" in what)
    out = Path(args.out)
    written = []
    if "recon" in what or "attention" in what:
        data = load_labelled(args.data, model.config.image_size, limit=args.num_images)
        batch = next(iter(make_loader(data, te, args.num_images)))
        if "recon" in what:
            g = torch.Generator(device=device).manual_seed(args.seed)
            if batch.get("text") is not None:
                written.append(save_reconstruction_grid(model, batch, out / "reconstruction_with_caption.png", te,
                                                        n=args.num_images, generator=g))
            g = torch.Generator(device=device).manual_seed(args.seed)
            image_only = {**batch, "text": None, "text_padding_mask": None}
            written.append(save_reconstruction_grid(model, image_only, out / "reconstruction_image_only.png",
                                                    n=args.num_images, generator=g))
        if "attention" in what:
            written.append(save_attention_figure(model, te, batch, out / "attention.png", word=args.word,
                                                 patch=args.patch, layer=layer, n=args.num_images))
    if "tsne" in what:
        names = [s.strip() for s in args.names.split(",")]
        panels = []
        for i, path in enumerate([args.model] + ([args.compare] if args.compare else [])):
            m = model if i == 0 else load_pretrained(path, device, need_tokenizer=False)[0]
            data = load_labelled(args.data, m.config.image_size, limit=args.tsne_samples)
            feats = extract_features(m, make_loader(data, batch_size=args.batch_size), progress=not args.no_progress,
                                     class_names=data.class_names, desc=f"features {i + 1}")
            panels.append((names[i] if i < len(names) else Path(path).name, feats))
        title = f"t-SNE of encoder features: {data_name(args.data)}, {len(panels[0][1])} samples"
        written.append(save_tsne(panels, out / "tsne.png", seed=args.seed, title=title))
    written.append(write_settings(out / "settings.json", args))
    for w in written:
        print(f"wrote {w}")
    return 0
