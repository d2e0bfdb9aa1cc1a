"""What the demo measures on its trained model, on held-out built-in shapes: hidden caption
words (:func:`masked_word_accuracy`), the colour of reconstructed shapes, partly and wholly
hidden (:func:`partly_hidden_colours`, :func:`fully_hidden_colours`), and linear probes
against evaluation's random-init and raw-pixel baselines (:func:`probe_comparison`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import Collator, EvalTransform, model_inputs
from ..data.synthetic import COLOURS, SHAPES, render_sample
from ..data.transforms import denormalize
from ..evaluation.features import Features, encode_batch, pixel_features, random_init_model
from ..evaluation.linear_probe import linear_probe
from ..model import M3AE
from ..ops import num_kept
from ..tokenizer import TextTokenizer
from ..visualize import reconstruction_images, save_figure

EVAL_SEED, PROBE_SEEDS = 1, (2, 3)  # data seeds of the held-out samples; training draws seed 0


# ----------------------------------------------------------------------------- held-out data

def held_out(n: int, image_size: int, text_tokenizer: TextTokenizer, seed: int = EVAL_SEED):
    """-> (collated batch of the first ``n`` samples of ``seed``, their captions, their objects)."""
    tf = EvalTransform(image_size)
    samples, captions, objects = [], [], []
    for i in range(n):
        img, caption, label, objs = render_sample(seed, i, image_size)
        samples.append(tf(dict(key=f"shapes-{seed}-{i:08d}", image=img, caption=caption, label=label)))
        captions.append(caption)
        objects.append(objs)
    return Collator(text_tokenizer)(samples), captions, objects


def _batches(batch: dict, size: int):
    n = batch["image"].shape[0]
    for i in range(0, n, size):
        yield {k: (v[i:i + size] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- 1. masked words

@torch.no_grad()
def masked_word_accuracy(model: M3AE, batch: dict, word_sets: dict[str, set[int]], seed: int = 0,
                         chunk: int = 100) -> dict[str, dict[str, float]]:
    """Accuracy on masked caption tokens with the image (the training mask ratio), with every
    patch visible, and with the image removed; each condition hides the same tokens.
    -> {condition: {word set: accuracy}} plus {"count": {word set: masked tokens}}."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    modes = {"image": cfg.image_mask_ratio, "full_image": 0.0, "no_image": None}
    hits = {m: dict.fromkeys(word_sets, 0) for m in modes}
    count = dict.fromkeys(word_sets, 0)
    for b in _batches(batch, chunk):
        x = model_inputs(b, "cpu")
        text_noise = torch.rand(x["text"].shape, generator=g)
        image_noise = torch.rand(x["image"].shape[0], cfg.num_patches, generator=g)
        outs = {m: model(None if r is None else x["image"], x["text"], x["text_padding_mask"],
                         image_mask_ratio=r or 0.0, text_mask_ratio=cfg.text_mask_ratio,
                         text_noise=text_noise, image_noise=image_noise) for m, r in modes.items()}
        mask = outs["image"].text_mask
        for name, ids in word_sets.items():
            sel = mask & torch.isin(x["text"], torch.tensor(sorted(ids)))
            count[name] += int(sel.sum())
            for m, out in outs.items():
                hits[m][name] += int((sel & (out.text_logits.argmax(-1) == x["text"])).sum())
    acc = {m: {k: v / max(count[k], 1) for k, v in h.items()} for m, h in hits.items()}
    return {**acc, "count": count}


def word_sets(text_tokenizer: TextTokenizer) -> dict[str, set[int]]:
    vocab = text_tokenizer.tokenizer.get_vocab()
    return {"colour": {vocab[w] for w in COLOURS}, "shape": {vocab[w] for w in SHAPES},
            "all": set(vocab.values())}


# ----------------------------------------------------------------------------- 2. reconstruction

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
COLOUR_NAMES = list(COLOURS)
BACKGROUND = len(COLOURS)  # colour_class's answer when the background colour is nearest


def _distance_map(obj: dict, size: int) -> torch.Tensor:
    """(H, W) distance of each pixel centre to the shape's centre, in radii."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cx, cy = (c * size for c in obj["centre"])
    return ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() / (obj["radius"] * size)


def shape_pixels(image01: torch.Tensor, objects: list[dict], j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ((H, W) bool pixels of shape ``j`` of an original image (3, H, W) in [0, 1], the
    image's background colour (3,)): pixels near the shape's centre whose colour is nearer to
    the shape's palette colour than to the background (which is measured away from every shape)."""
    size = image01.shape[-1]
    far = torch.stack([_distance_map(o, size) > 1.4 for o in objects]).all(0)
    bg = image01[:, far].mean(1) if far.any() else image01.mean((1, 2))
    colour = PALETTE[COLOUR_NAMES.index(objects[j]["colour"])]
    nearer = (image01 - colour[:, None, None]).norm(dim=0) < (image01 - bg[:, None, None]).norm(dim=0)
    return nearer & (_distance_map(objects[j], size) < 1.25), bg


def colour_class(mean_rgb: torch.Tensor, bg: torch.Tensor) -> int:
    """Index of the palette colour nearest to ``mean_rgb``, or BACKGROUND when the background is nearer."""
    return int((torch.cat([PALETTE, bg[None]]) - mean_rgb).norm(dim=1).argmin())


def _patch_hidden(noise: torch.Tensor, cfg) -> torch.Tensor:
    """(B, L) noise -> (B, H, W) bool: the pixels of the patches the model's mask ratio hides
    (the lowest-noise patches are kept, as many as the model's masking keeps)."""
    keep = num_kept(cfg.num_patches, cfg.image_mask_ratio)
    hidden = torch.ones_like(noise, dtype=torch.bool)
    hidden.scatter_(1, noise.argsort(1)[:, :keep], False)
    g, p = cfg.grid_size, cfg.patch_size
    return hidden.reshape(-1, g, 1, g, 1).expand(-1, g, p, g, p).reshape(-1, g * p, g * p)


@torch.no_grad()
def _reconstruct(model: M3AE, image, text, pad, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (masked, reconstruction) pictures in [0, 1] for the hiding that ``noise`` gives;
    every caption token stays visible (``text`` None: the image alone, as in MAE)."""
    out = model.reconstruct(image, text, pad, image_mask_ratio=model.config.image_mask_ratio,
                            text_mask_ratio=0.0, image_noise=noise)
    return reconstruction_images(model, image, out)[1:]


def partly_hidden_colours(model: M3AE, batch: dict, objects: list[list[dict]], seed: int = 0) -> dict:
    """Shapes with some patches hidden and some visible (the training mask): the fraction
    whose hidden pixels come back in the shape's colour, with the caption and without it."""
    cfg = model.config
    x = model_inputs(batch, "cpu")
    noise = torch.rand(x["image"].shape[0], cfg.num_patches, generator=torch.Generator().manual_seed(seed))
    hidden = _patch_hidden(noise, cfg)
    orig = denormalize(x["image"])
    recon = {"caption": _reconstruct(model, x["image"], x["text"], x["text_padding_mask"], noise)[1],
             "no_caption": _reconstruct(model, x["image"], None, None, noise)[1]}
    hits, n = dict.fromkeys(recon, 0), 0
    for i, objs in enumerate(objects):
        for j, o in enumerate(objs):
            px, bg = shape_pixels(orig[i], objs, j)
            if not (px & hidden[i]).any() or not (px & ~hidden[i]).any():
                continue
            n += 1
            for k, r in recon.items():
                hits[k] += colour_class(r[i][:, px & hidden[i]].mean(1), bg) == COLOUR_NAMES.index(o["colour"])
    return {k: v / max(n, 1) for k, v in hits.items()} | {"n": n}


def _hide_one_shape(orig01: torch.Tensor, captions: list[str], objects: list[list[dict]], cfg,
                    g: torch.Generator) -> list[dict]:
    """For every sample: one shape to hide completely (noise > 1 on each patch that holds a
    pixel of it: masked first; random noise elsewhere, so the mask ratio holds) and its
    caption with that shape's colour word changed to another colour."""
    cases = []
    for i, objs in enumerate(objects):
        j = int(torch.randint(len(objs), (), generator=g))
        px, bg = shape_pixels(orig01[i], objs, j)
        p, gs = cfg.patch_size, cfg.grid_size
        noise = torch.rand(cfg.num_patches, generator=g)
        noise[px.reshape(gs, p, gs, p).any(3).any(1).reshape(-1)] += 2.0
        want = COLOUR_NAMES.index(objs[j]["colour"])
        other = (want + 1 + int(torch.randint(len(COLOURS) - 1, (), generator=g))) % len(COLOURS)
        o = objs[j]
        phrase = f"{o['colour']} {o['shape']} "
        swapped = captions[i].replace(phrase, f"{COLOUR_NAMES[other]} {o['shape']} ", 1)
        cases.append(dict(i=i, pixels=px, bg=bg, noise=noise, want=want, other=other, swapped=swapped))
    return cases


@torch.no_grad()
def fully_hidden_colours(model: M3AE, text_tokenizer: TextTokenizer, batch: dict, captions: list[str],
                         objects: list[list[dict]], seed: int = 0) -> tuple[dict, dict]:
    """Cross-modal reconstruction: in every image one shape is hidden completely.
    -> (fractions that come back in the caption's colour (``caption``), in the changed
    caption's colour (``swapped``), in the true colour without a caption (``no_caption``);
    the pictures of every case, for :func:`save_cross_modal_grid`)."""
    x = model_inputs(batch, "cpu")
    orig = denormalize(x["image"])
    cases = _hide_one_shape(orig, captions, objects, model.config, torch.Generator().manual_seed(seed))
    if not cases:
        return {"caption": 0.0, "swapped": 0.0, "no_caption": 0.0, "n": 0}, {}
    idx = [c["i"] for c in cases]
    image, noise = x["image"][idx], torch.stack([c["noise"] for c in cases])
    true_ids, true_pad = text_tokenizer([captions[i] for i in idx])
    swap_ids, swap_pad = text_tokenizer([c["swapped"] for c in cases])
    masked, with_caption = _reconstruct(model, image, true_ids, true_pad, noise)
    pics = {"original": orig[idx], "masked": masked, "caption": with_caption,
            "swapped": _reconstruct(model, image, swap_ids, swap_pad, noise)[1],
            "no_caption": _reconstruct(model, image, None, None, noise)[1]}
    targets = {"caption": "want", "swapped": "other", "no_caption": "want"}
    scores = {}
    for key, target in targets.items():
        hits = [colour_class(pics[key][k][:, c["pixels"]].mean(1), c["bg"]) == c[target] for k, c in enumerate(cases)]
        scores[key] = sum(hits) / len(hits)
    pics["labels"] = [(COLOUR_NAMES[c["want"]], COLOUR_NAMES[c["other"]]) for c in cases]
    return scores | {"n": len(cases)}, pics


def save_cross_modal_grid(pics: dict, path: str | Path, n: int = 6) -> Path:
    """One row per case: original, one shape hidden, reconstructed with the caption, with the
    caption's colour word changed, and without a caption (what an image-only MAE sees)."""
    import matplotlib.pyplot as plt

    n = min(n, len(pics["labels"]))
    fig, axes = plt.subplots(n, 5, figsize=(10, 2.1 * n + 0.4), squeeze=False)
    for r in range(n):
        true, other = pics["labels"][r]
        cols = [("original", "original"), ("masked", "hidden shape"), ("caption", f'caption: "{true} ..."'),
                ("swapped", f'caption: "{other} ..."'), ("no_caption", "no caption (MAE)")]
        for c, (key, title) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(pics[key][r].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- 3. linear probe

PROBE_TASKS = {"colour": (list(COLOURS), "colour"), "shape": (SHAPES, "shape")}


def probe_images(seed: int, n: int, image_size: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """-> (normalised images (n, 3, H, W) of data seed ``seed``, {task: labels of the first-named
    shape}) for the probe tasks of :data:`PROBE_TASKS`."""
    tf = EvalTransform(image_size)
    images, labels = [], {t: [] for t in PROBE_TASKS}
    for i in range(n):
        img, caption, label, objs = render_sample(seed, i, image_size)
        images.append(tf(dict(key=str(i), image=img, caption=caption, label=label))["image"])
        for task, (names, field) in PROBE_TASKS.items():
            labels[task].append(names.index(objs[0][field]))
    return torch.stack(images), {t: np.array(v) for t, v in labels.items()}


@torch.no_grad()
def _mean_pooled(model: M3AE, images: torch.Tensor, chunk: int = 250) -> np.ndarray:
    return torch.cat([encode_batch(model, {"image": images[i:i + chunk]}, "image", "mean")
                      for i in range(0, len(images), chunk)]).numpy()


def probe_comparison(model: M3AE, cfg: Config, n_train: int = 2000, n_test: int = 1000, epochs: int = 40) -> dict:
    """Linear probes (colour and kind of the first-named shape, held-out seeds) on mean-pooled
    image tokens of the trained encoder and of the same network at its initialisation, and
    on raw pixels (evaluation's baseline: 8 x 8 average-pooled, :func:`pixel_features`).
    -> {task: {features: top-1, "chance": ...}} and the sizes."""
    # The trainer seeds with train.seed before building the model: the trained model's start.
    untrained = random_init_model(cfg.model, cfg.train.seed)
    (x_tr, y_tr), (x_te, y_te) = (probe_images(s, n, cfg.model.image_size) for s, n in zip(PROBE_SEEDS, (n_train, n_test)))
    feats = {"trained": [_mean_pooled(model.eval(), x) for x in (x_tr, x_te)],
             "random_init": [_mean_pooled(untrained, x) for x in (x_tr, x_te)],
             "pixels": [pixel_features(x, len(x)).numpy() for x in (x_tr, x_te)]}
    out = {}
    for task, (names, _) in PROBE_TASKS.items():
        out[task] = {name: linear_probe(Features(tr, y_tr[task], [], None), Features(te, y_te[task], [], None),
                                        epochs=epochs).top1 for name, (tr, te) in feats.items()}
        out[task] |= {"chance": 1 / len(names), "classes": len(names)}
    return out | {"n_train": n_train, "n_test": n_test}
