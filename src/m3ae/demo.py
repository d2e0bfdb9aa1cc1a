"""The main job on built-in data: pre-train a tiny M3AE on the shapes and show what it learned.

Everything is measured on held-out samples (data seed 1; training uses seed 0; the probe
uses seeds 2 and 3) and written to ``summary.json``; ``summary.md`` is rendered from that
file alone (:func:`render_summary`), so every sentence states a number of this run.

1. Masked words: accuracy on masked colour and shape words with the image (the training
   mask ratio of its patches hidden at random) and with the image removed (a text-only forward hiding the
   same words), against chance.
2. Reconstruction: hidden parts of partly visible shapes, and shapes hidden completely
   while the caption names them (cross-modal: only the words can bring the colour back;
   an image-only MAE cannot). A reconstructed shape's colour is the palette colour (or the
   background) nearest to the mean of its reconstructed pixels.
3. Linear probes (colour and kind of the first-named shape) on the trained encoder, a
   randomly initialised one and raw pixels.

A finished run re-prints its summary; an interrupted one continues from its last checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, build_config
from .data import Collator, EvalTransform, model_inputs
from .data.transforms import denormalize
from .data.synthetic import COLOURS, SHAPES, ShapesDataset, render_sample
from .io import atomic_write, read_jsonl
from .model import M3AE
from .reports.stats import describe_gap, pct, versus_chance  # noqa: F401  (pct: tests format with it)
from .tokenizer import TextTokenizer, load_tokenizer
from .training import pretrain
from .training.checkpoint import checkpoint_step, list_checkpoints
from .visualize import reconstruction_images, save_figure, save_reconstruction_grid

DEMO_OVERRIDES = [
    # 8-px patches (16 per image): a visible patch holds a quarter of a shape, enough to tell
    # its kind, and the short sequence buys the steps that shape words need. Pilots (held-out
    # shape words from the image): 36 % at 1,000 steps; at 2,000 steps 66 % or 32 % depending
    # on the seed; at 2,500 steps 82, 69 and 86 % for seeds 0, 1, 2.
    "model.patch_size=8", "train.steps=2500",
    "data.text_len=24", "train.batch_size=64", "train.lr=2e-3", "train.warmup_steps=100",
    "train.log_every=25", "train.ckpt_every=100", "train.recon_every=500", "train.weight_decay=0.05",
    "train.keep_last=2", "train.grad_clip=1.0",
    # Half the patches hidden leaves enough of a visible shape to tell its kind; in half of
    # each batch a whole quarter (the place of one shape) is among them, so the caption
    # often is the only source of a shape's colour: text->image reconstruction gets learnt.
    "model.image_mask_ratio=0.5", "model.text_mask_ratio=0.5", "train.quarter_mask_fraction=0.5",
    # Positions are part of the captions, so keep crops mild; flips also swap left/right words.
    "data.crop_scale=[0.85,1.0]", "data.synthetic_size=100000",
]
EVAL_SEED, PROBE_SEEDS = 1, (2, 3)
PROGRESS_LEGEND = ("progress bar: loss = training loss (image + 0.5 x text), img = pixel error (MSE) on hidden "
                   "patches, txt = cross-entropy on hidden words, acc = hidden-word accuracy, sps = samples/s")


def demo_config(overrides: list[str] | None = None) -> Config:
    return build_config("tiny", overrides=DEMO_OVERRIDES + list(overrides or []))


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
    """(B, L) noise -> (B, H, W) bool: the pixels of the patches the model's mask ratio hides."""
    keep = int(cfg.num_patches * (1 - cfg.image_mask_ratio))
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
    from .evaluation.features import encode_batch

    return torch.cat([encode_batch(model, {"image": images[i:i + chunk]}, "image", "mean")
                      for i in range(0, len(images), chunk)]).numpy()


def probe_comparison(model: M3AE, cfg: Config, n_train: int = 2000, n_test: int = 1000, epochs: int = 40) -> dict:
    """Linear probes (colour and kind of the first-named shape, held-out seeds) on mean-pooled
    image tokens of the trained encoder and of the same network at its initialisation, and
    on raw pixels. -> {task: {features: top-1, "chance": ...}} and the sizes."""
    from .evaluation.features import Features
    from .evaluation.linear_probe import linear_probe

    torch.manual_seed(cfg.train.seed)  # as the trainer seeds it: the trained model's starting point
    untrained = M3AE(cfg.model).eval()
    (x_tr, y_tr), (x_te, y_te) = (probe_images(s, n, cfg.model.image_size) for s, n in zip(PROBE_SEEDS, (n_train, n_test)))
    feats = {"trained": [_mean_pooled(model.eval(), x) for x in (x_tr, x_te)],
             "random_init": [_mean_pooled(untrained, x) for x in (x_tr, x_te)],
             "pixels": [x.flatten(1).numpy() for x in (x_tr, x_te)]}
    out = {}
    for task, (names, _) in PROBE_TASKS.items():
        out[task] = {name: linear_probe(Features(tr, y_tr[task], [], None), Features(te, y_te[task], [], None),
                                        epochs=epochs).top1 for name, (tr, te) in feats.items()}
        out[task] |= {"chance": 1 / len(names), "classes": len(names)}
    return out | {"n_train": n_train, "n_test": n_test}


# ----------------------------------------------------------------------------- summary

def render_summary(s: dict) -> str:
    """``summary.md`` from ``summary.json``'s content: every number and every comparison in
    it comes from ``s``."""
    t, w, r, p = s["training"], s["words"], s["reconstruction"], s["probe"]
    ch = w["chance"]
    k_col, k_shape = round(1 / ch["colour"]), round(1 / ch["shape"])
    q = s["model"].get("quarter_mask_fraction", 0.0)
    quarter = (f" (in {q:.0%} of each batch the hidden patches include one whole quarter of the image, "
               "so that shapes often vanish entirely and only the caption can say what they were)" if q else "")
    lines = [
        "# m3ae demo", "",
        f"A tiny M3AE ({s['model']['parameters'] / 1e6:.2f} M parameters) pre-trained for {t['steps']} steps "
        f"of batch {t['batch_size']} on the built-in shapes ({t['seconds'] / 60:.1f} min of training on "
        f"{t['threads']} CPU thread(s) here, in {t['sessions']} session(s)); "
        f"{s['model']['image_mask_ratio']:.0%} of the image patches and {s['model']['text_mask_ratio']:.0%} "
        f"of the caption words hidden{quarter}. Final training loss {t['final_loss']:.3f}.", "",
        "## 1. Hidden caption words, from the image", "",
        f"On {w['samples']} held-out samples, hiding {s['model']['text_mask_ratio']:.0%} of the caption "
        f"words ({w['count']['colour']} colour and {w['count']['shape']} shape words) and "
        f"{s['model']['image_mask_ratio']:.0%} of the patches at random:", "",
    ]
    for kind, k in (("colour", k_col), ("shape", k_shape)):
        a, b = w["image"][kind], w["no_image"][kind]
        lines.append(f"- {kind} words: {pct(a)} with the image ({versus_chance(a, ch[kind])}: 1 in {k} = "
                     f"{pct(ch[kind])}); {pct(b)} with the image removed ({versus_chance(b, ch[kind])}); "
                     f"{pct(w['full_image'][kind])} with every patch visible.")
    lines += [
        f"- all hidden words, template words included: {pct(w['image']['all'])} with the image, "
        f"{pct(w['no_image']['all'])} without.", "",
        "The same words are hidden in every condition, so the gap between the first two numbers is "
        "what the model reads from the pixels.", "",
        "## 2. Reconstruction", "",
        f"`reconstructions.png`: held-out samples with {s['model']['image_mask_ratio']:.0%} of the patches "
        "hidden (original / hidden / reconstructed; hidden words as [true→predicted]). Of "
        f"{r['partly_hidden']['n']} shapes that were partly hidden, {pct(r['partly_hidden']['caption'])} "
        f"came back in their own colour in the hidden part ({pct(r['partly_hidden']['no_caption'])} "
        "without the caption; a reconstruction's colour is the palette colour or background nearest "
        "to the mean of its pixels).", "",
        f"`cross_modal.png`: in {r['fully_hidden']['n']} images one shape is hidden completely, "
        "so only the caption can say what colour it was. With the caption it came back in the caption's "
        f"colour {pct(r['fully_hidden']['caption'])} of the time ({versus_chance(r['fully_hidden']['caption'], ch['colour'])}); "
        f"with the colour word changed, in the new colour {pct(r['fully_hidden']['swapped'])}; "
        f"without a caption (all an image-only MAE has), in its true colour {pct(r['fully_hidden']['no_caption'])} "
        f"({versus_chance(r['fully_hidden']['no_caption'], ch['colour'])}; 1 in {k_col} = {pct(ch['colour'])}).", "",
        "## 3. Linear probe of the encoder", "",
        "A linear classifier on frozen mean-pooled image features names the colour and the kind of the "
        f"first-named shape of held-out images ({p['n_train']} training and {p['n_test']} test images):", "",
        "| task | trained encoder | same encoder at initialisation | raw pixels | chance |",
        "|---|---|---|---|---|",
    ]
    for task in PROBE_TASKS:
        q = p[task]
        lines.append(f"| {task} ({q['classes']} classes) | {pct(q['trained'])} | {pct(q['random_init'])} | "
                     f"{pct(q['pixels'])} | {pct(q['chance'])} |")
    lines.append("")
    for task in PROBE_TASKS:
        q = p[task]
        lines.append(f"- {task}: the trained encoder is {describe_gap(q['trained'], q['random_init'])} its "
                     f"initialisation and {describe_gap(q['trained'], q['pixels'])} raw pixels.")
    lines += [
        "",
        "## Files", "",
        "- `summary.json`: every number above",
        "- `reconstructions.png`, `cross_modal.png`: the pictures described above",
        "- `loss_curve.png`, `metrics.jsonl`: training losses and hidden-word accuracy",
        "- `final/`: the model (with its tokenizer), for the commands below", "",
    ]
    return "\n".join(lines)


def next_steps(out_dir: Path) -> str:
    m = out_dir / "final"
    n, s = PROBE_SEEDS
    return "\n".join([
        "try next, on the demo's model:",
        f"  m3ae linear-probe {m} --train shapes:2000:{n} --val shapes:1000:{s}",
        f"  m3ae zero-shot {m} --data shapes:500:{s} --template 'a picture of a [MASK] {{}}'",
        f"  m3ae visualize {m} --data shapes:500:{EVAL_SEED} --out {out_dir / 'pictures'} --word red",
        f"  m3ae finetune {m} --train shapes:2000:{n} --val shapes:1000:{s} --out {out_dir.parent / 'demo-finetune'} --epochs 3",
    ])


# ----------------------------------------------------------------------------- the run

def _comparable(cfg: Config) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as read back from JSON/YAML


def _check_same_run(out_dir: Path, cfg: Config) -> None:
    """A demo folder holds one configuration: refuse to mix another one into it."""
    saved = out_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = _comparable(Config.load(saved)), _comparable(cfg)
    diff = [f"{sec}.{k}" for sec in ("model", "data", "train") for k in new[sec] if old[sec].get(k) != new[sec][k]]
    if diff:
        raise ValueError(f"{out_dir} holds a demo run with a different configuration ({', '.join(diff[:5])}); "
                         "pass another --out, or delete the folder to start over")


def _train(cfg: Config, out_dir: Path, progress: bool, say) -> dict:
    """Pre-train (continuing from the newest checkpoint if any) and account the time spent."""
    ckpts = list_checkpoints(out_dir) if out_dir.is_dir() else []
    done = checkpoint_step(ckpts[-1]) if ckpts else 0
    if 0 < done < cfg.train.steps:
        say(f"continuing the interrupted demo run in {out_dir} from its checkpoint at step {done} of {cfg.train.steps}")
    elif done >= cfg.train.steps:
        say(f"training in {out_dir} finished earlier ({done} steps); evaluating")
    if done < cfg.train.steps:
        say(PROGRESS_LEGEND)
    state_path = out_dir / "demo_time.json"
    fresh = {"seconds": 0.0, "sessions": 0}
    state = json.loads(state_path.read_text()) if done and state_path.is_file() else fresh
    t0 = time.perf_counter()
    try:
        # Without a checkpoint nothing can be continued: start afresh (what an interrupted
        # start left behind is replaced) instead of asking the trainer to resume.
        pretrain(cfg, out_dir, resume="latest" if done else None, overwrite=not done, progress=progress)
    finally:
        if done < cfg.train.steps:  # also when interrupted: the time was spent
            state = {"seconds": state["seconds"] + time.perf_counter() - t0, "sessions": state["sessions"] + 1}
            atomic_write(state_path, json.dumps(state))
    rows = read_jsonl(out_dir / "metrics.jsonl")
    final_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), float("nan"))
    return {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "final_loss": final_loss,
            "threads": torch.get_num_threads(), **state}


def evaluate(out_dir: Path, cfg: Config, eval_samples: int, probe_sizes: tuple[int, int] = (2000, 1000)) -> dict:
    """Every measurement of the summary, on the trained model in ``out_dir/final``; writes the pictures."""
    model = M3AE.from_pretrained(out_dir / "final").eval()
    te = TextTokenizer(load_tokenizer(out_dir / "final"), cfg.data.text_len)
    batch, captions, objects = held_out(eval_samples, cfg.model.image_size, te)
    words = masked_word_accuracy(model, batch, word_sets(te))
    words |= {"samples": eval_samples, "chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}}
    n_pic = min(6, eval_samples)
    save_reconstruction_grid(model, {k: (v[:n_pic] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()},
                             out_dir / "reconstructions.png", te, n=n_pic, generator=torch.Generator().manual_seed(0))
    fully, pics = fully_hidden_colours(model, te, batch, captions, objects)
    if pics:
        save_cross_modal_grid(pics, out_dir / "cross_modal.png")
    recon = {"partly_hidden": partly_hidden_colours(model, batch, objects), "fully_hidden": fully}
    probe = probe_comparison(model, cfg, *probe_sizes)
    return {"model": {"parameters": sum(p.numel() for p in model.parameters()),
                      "image_mask_ratio": cfg.model.image_mask_ratio, "text_mask_ratio": cfg.model.text_mask_ratio,
                      "quarter_mask_fraction": cfg.train.quarter_mask_fraction},
            "words": words, "reconstruction": recon, "probe": probe}


def run_demo(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None, eval_samples: int = 1000,
             progress: bool = True, probe_sizes: tuple[int, int] = (2000, 1000), say=print) -> dict:
    """Pre-train, measure, write ``summary.json`` and ``summary.md``; returns the summary dict
    (``"rerun": True`` when the folder already held a finished demo of the same configuration)."""
    out_dir = Path(out_dir)
    cfg = demo_config(overrides)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    _check_same_run(out_dir, cfg)
    rerun = json_path.is_file()
    if rerun:
        s = json.loads(json_path.read_text())
        say(f"{out_dir} holds a finished demo run; its summary (delete the folder to train again):")
    else:
        s = {"training": _train(cfg, out_dir, progress, say)}
        s |= evaluate(out_dir, cfg, eval_samples, probe_sizes)
        s["config"] = _comparable(cfg)
        atomic_write(md_path, render_summary(s))
        atomic_write(json_path, json.dumps(s, indent=1))  # last: its presence means "finished"
    if not md_path.is_file() or md_path.read_text() != render_summary(s):
        atomic_write(md_path, render_summary(s))
    say("")
    say(md_path.read_text())
    say(f"summary: {md_path}")
    say(next_steps(out_dir))
    return s | {"rerun": rerun}
