"""What README's "Use a trained model" section shows, measured: the public API on a trained
demo model and held-out built-in shapes (seed 1, never trained on).

    python docs/examples/use_a_trained_model.py runs/demo/final [--picture PNG] [--n 200]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import m3ae
from m3ae import tasks
from m3ae.data.synthetic import COLOURS, SHAPES, render_sample


def single_shapes(n: int, seed: int = 1):
    """The first ``n`` held-out samples that show one shape: (image, caption, colour, shape)."""
    i = 0
    while n:
        img, caption, _, objects = render_sample(seed, i, 32)
        i += 1
        if len(objects) == 1:
            n -= 1
            yield img, caption, objects[0]["colour"], objects[0]["shape"]


def hidden_error(r: tasks.Reconstruction) -> tuple[float, float]:
    """Mean squared pixel error (0-1 scale) on the hidden patches, without / with the caption."""
    orig, masked, without, with_cap = (np.asarray(x, dtype=np.float32) / 255 for x in r)
    hidden = (masked != orig).any(-1)
    return (float(((without - orig)[hidden] ** 2).mean()), float(((with_cap - orig)[hidden] ** 2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--picture", default=None, help="write original | masked | without caption | with caption")
    ap.add_argument("--n", type=int, default=200, help="held-out single-shape images for the accuracies")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tokenizer, transform = m3ae.load_pretrained(args.model, device="cpu")
    image, caption, colour, shape = next(single_shapes(1))
    print(f"caption: {caption!r}")

    x = transform(image)
    ids, pad = tokenizer(caption)
    with torch.no_grad():
        print("encode_image:", tuple(model.encode_image(x).shape), " encode_text:",
              tuple(model.encode_text(ids, pad).shape), " encode:", tuple(model.encode(x, ids, pad, pool="mean").shape))

    prompt = caption.replace(colour, "[MASK]", 1)
    fmt = lambda words: ", ".join(f"{w} {p:.2f}" for w, p in words)  # noqa: E731
    print(f"fill_mask({prompt!r})")
    print("  with the image:", fmt(tasks.fill_mask(model, tokenizer, image, prompt, top_k=3)[0]))
    print("  caption alone: ", fmt(tasks.fill_mask(model, tokenizer, None, prompt, top_k=3)[0]))

    template = "a picture of a [MASK] {}"  # the colour hidden too: the image must tell the shape
    ranked = tasks.zero_shot(model, tokenizer, image, SHAPES, template=template)
    print(f"zero_shot(template={template!r}):", ", ".join(f"{c} {s:.2f}" for c, s in ranked))

    r = tasks.reconstruct(model, tokenizer, image, caption, mask_ratio=0.75, seed=0)
    e0, e1 = hidden_error(r)
    print(f"reconstruct(mask_ratio=0.75): pixel MSE on hidden patches {e0:.4f} without the caption, "
          f"{e1:.4f} with it")
    if args.picture:
        from PIL import Image

        strip = np.concatenate([np.asarray(p) for p in r], axis=1)
        Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(args.picture)
        print(f"wrote {args.picture}")

    # Over many held-out images: the colour word from the image, the shape by zero-shot.
    hits = {"image": 0, "alone": 0, "shape": 0, "two_hidden": 0}
    errors = []
    g = torch.Generator().manual_seed(0)
    for image, caption, colour, shape in single_shapes(args.n):
        prompt = caption.replace(colour, "[MASK]", 1)
        hits["image"] += tasks.fill_mask(model, tokenizer, image, prompt, top_k=1)[0][0][0] == colour
        hits["alone"] += tasks.fill_mask(model, tokenizer, None, prompt, top_k=1)[0][0][0] == colour
        # Pre-training hid half of each caption, never a single word: hide one more, at random.
        words = prompt.split(" ")
        others = [i for i, w in enumerate(words) if w != "[MASK]" and w.isalpha()]
        words[others[int(torch.randint(len(others), (1,), generator=g))]] = "[MASK]"
        two = tasks.fill_mask(model, tokenizer, image, " ".join(words), top_k=1)
        hits["two_hidden"] += two[words.index("[MASK]") != prompt.split(" ").index("[MASK]")][0][0] == colour
        hits["shape"] += tasks.zero_shot(model, tokenizer, image, SHAPES, template=template)[0][0] == shape
        errors.append(hidden_error(tasks.reconstruct(model, tokenizer, image, caption, seed=len(errors))))
    n = args.n
    e = np.array(errors).mean(0)
    print(f"over {n} held-out single-shape images: colour word right {hits['image'] / n:.1%} with the image, "
          f"{hits['alone'] / n:.1%} from the caption alone (chance {1 / len(COLOURS):.1%}), "
          f"{hits['two_hidden'] / n:.1%} with the image and one more word hidden; zero-shot shape "
          f"{hits['shape'] / n:.1%} (chance {1 / len(SHAPES):.0%}); hidden-patch MSE {e[0]:.4f} without the "
          f"caption, {e[1]:.4f} with it")


if __name__ == "__main__":
    main()
