"""The demo's page, ``summary.md``, rendered from ``summary.json`` alone: every number and every
comparison in it comes from the run's measurements (words from :mod:`m3ae.reports.stats`)."""
from __future__ import annotations

from pathlib import Path

from .stats import describe_gap, pct, versus_chance


def render_summary(s: dict) -> str:
    """``summary.md`` from ``summary.json``'s content: every number and every comparison in
    it comes from ``s``."""
    t, w, r, p = s["training"], s["words"], s["reconstruction"], s["probe"]
    tasks = [k for k, v in p.items() if isinstance(v, dict)]  # the probe tasks, in the order run
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
        f"first-named shape of held-out images ({p['n_train']} training and {p['n_test']} test images; "
        "raw pixels = the images average-pooled to 8 x 8, evaluation's pixel baseline):", "",
        "| task | trained encoder | same encoder at initialisation | raw pixels | chance |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        q = p[task]
        lines.append(f"| {task} ({q['classes']} classes) | {pct(q['trained'])} | {pct(q['random_init'])} | "
                     f"{pct(q['pixels'])} | {pct(q['chance'])} |")
    lines.append("")
    for task in tasks:
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


def next_steps(out_dir: Path, eval_seed: int, probe_seeds: tuple[int, int]) -> str:
    """The commands to try on a finished demo's model, on the demo's own held-out data seeds."""
    m = out_dir / "final"
    n, s = probe_seeds
    return "\n".join([
        "try next, on the demo's model:",
        f"  m3ae linear-probe {m} --train shapes:2000:{n} --val shapes:1000:{s}",
        f"  m3ae zero-shot {m} --data shapes:500:{s} --template 'a picture of a [MASK] {{}}'",
        f"  m3ae visualize {m} --data shapes:500:{eval_seed} --out {out_dir / 'pictures'} --word red",
        f"  m3ae finetune {m} --train shapes:2000:{n} --val shapes:1000:{s} --out {out_dir.parent / 'demo-finetune'} --epochs 3",
    ])
