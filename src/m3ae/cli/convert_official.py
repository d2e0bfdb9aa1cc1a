"""m3ae convert-official: an official JAX M3AE/MAE checkpoint -> a pretrained folder."""
from __future__ import annotations

import argparse

from .common import add_debug_arg


def register(sub) -> None:
    p = sub.add_parser(
        "convert-official", help="convert an official JAX M3AE/MAE checkpoint (no JAX needed)",
        description="Read a checkpoint written by the official JAX training scripts "
                    "(young-geng/m3ae_public) without jax/flax and without running code from the "
                    "file, infer the architecture, and write DST_DIR (config.json + "
                    "model.safetensors) for M3AE.from_pretrained. The official Colab's .pth files "
                    "hold the encoder only: the result is an encoder-only model (features, "
                    "fine-tuning; no reconstruction).")
    p.add_argument("src", metavar="SRC", help="official checkpoint: a pickle of {step, epoch, variant, state} "
                                             "from the JAX training scripts, or the official Colab's PyTorch "
                                             "encoder weights (m3ae_small/base/large.pth)")
    p.add_argument("dst", metavar="DST_DIR", help="output folder")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size the model was trained at (default: the checkpoint's recorded "
                        "data.image_size, else 256); it sets the position table")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads, if the checkpoint lacks them")
    p.add_argument("--dec-num-heads", type=int, default=None, help="decoder heads, if the checkpoint lacks them")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="longest caption (default: data.tokenizer_max_length, else 64)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to store beside the weights (vocab.txt / tokenizer.json / cached HF name)")
    add_debug_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop.official import convert_official
    from ..pretrained import TOKENIZER_NAME

    overrides = {k: v for k, v in dict(image_size=args.image_size, num_heads=args.num_heads,
                                       dec_num_heads=args.dec_num_heads,
                                       max_text_len=args.max_text_len).items() if v is not None}
    model, meta = convert_official(args.src, args.dst, **overrides)
    if args.tokenizer:
        from pathlib import Path

        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        if tok.get_vocab_size() != model.config.vocab_size and not meta["image_only"]:
            raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but the checkpoint's "
                             f"vocabulary has {model.config.vocab_size}")
        tok.save(str(Path(args.dst) / TOKENIZER_NAME))
    c = model.config
    kind = ("MAE (image only; the text side is unused)" if meta["image_only"] else
            "M3AE encoder only (the .pth has no decoder)" if c.encoder_only else "M3AE")
    print(f"converted {args.src} -> {args.dst}")
    print(f"  model:   {kind}, step {meta['step']}, epoch {meta['epoch']}")
    decoder = ("none" if c.encoder_only else
               f"{c.dec_depth} x {c.dec_emb_dim}, {c.dec_num_heads} heads")
    print(f"  encoder: {c.depth} blocks x {c.emb_dim} wide, {c.num_heads} heads; decoder: "
          f"{decoder}; mlp ratio {c.mlp_ratio:g}")
    print(f"  image:   {c.image_size} px ({meta['image_size_from']}), patch {c.patch_size}, "
          f"type embeddings {'on' if c.use_type_embedding else 'off'}")
    if not meta["image_only"]:
        print(f"  text:    vocabulary {c.vocab_size}, up to {c.max_text_len} tokens")
    if not c.encoder_only:
        text_ratio = "" if meta["image_only"] else f", text {c.text_mask_ratio:g}"
        print(f"  masking: image {c.image_mask_ratio:g}{text_ratio} (the run's ratios; pretrain defaults)")
    source = meta.get("flax_params", meta.get("source_params"))
    print(f"  params:  {source:,} from the checkpoint; model has {meta['num_params']:,}")
    return 0
