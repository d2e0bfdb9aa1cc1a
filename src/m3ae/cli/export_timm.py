"""m3ae export-timm: the image encoder of a pretrained folder as a timm VisionTransformer."""
from __future__ import annotations

import argparse

from .common import add_debug_arg


def register(sub) -> None:
    p = sub.add_parser(
        "export-timm", help="export the image encoder as a timm VisionTransformer state dict",
        description="Write the image side of the encoder as a timm VisionTransformer state dict "
                    "(safetensors). The file's metadata holds the VisionTransformer arguments "
                    "under 'timm_kwargs'; see docs/interop.md for loading it in timm.")
    p.add_argument("pretrained", metavar="PRETRAINED_DIR", help="pretrained folder (or cached Hub repo id)")
    p.add_argument("out", metavar="OUT.safetensors", help="where to write the timm state dict")
    add_debug_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..factory import load_pretrained
    from ..interop.timm import to_timm
    from ..io import save_safetensors

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    model = load_pretrained(args.pretrained, "cpu", need_tokenizer=False)[0]
    sd, kwargs = to_timm(model)
    save_safetensors(sd, out, metadata={"format": "pt", "timm_kwargs": json.dumps(kwargs)})
    print(f"wrote {out}: timm VisionTransformer, {sum(v.numel() for v in sd.values()):,} parameters")
    print(f"  kwargs: {json.dumps(kwargs)}")
    return 0
