"""The main job on built-in data: pre-train a tiny M3AE on the shapes and show what it learned.

Everything is measured on held-out samples (data seed 1; training uses seed 0; the probe
uses seeds 2 and 3) and written to ``summary.json``; ``summary.md`` is rendered from that
file alone (:func:`m3ae.reports.demo.render_summary`), so every sentence states a number of
this run.

The layout: ``demo.yaml`` (the settings, on the tiny preset), :mod:`.measure` (the
measurements), :mod:`m3ae.reports.demo` (the page) and this driver (train, measure, write).

1. Masked words: accuracy on masked colour and shape words with the image (the training
   mask ratio of its patches hidden at random) and with the image removed (a text-only forward hiding the
   same words), against chance.
2. Reconstruction: hidden parts of partly visible shapes, and shapes hidden completely
   while the caption names them (cross-modal: only the words can bring the colour back;
   an image-only MAE cannot). A reconstructed shape's colour is the palette colour (or the
   background) nearest to the mean of its reconstructed pixels.
3. Linear probes (colour and kind of the first-named shape) on the trained encoder and on
   evaluation's baselines: the same network at initialisation and raw pixels (8 x 8 pooled).

A finished run re-prints its summary; an interrupted one continues from its last checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import Config, build_config
from ..data.synthetic import COLOURS, SHAPES
from ..io import atomic_write, read_jsonl
from ..factory import get_tokenizer, load_pretrained
from ..reports.demo import next_steps, render_summary
from ..reports.stats import pct  # noqa: F401  (the demo's tests format numbers with it)
from ..training import pretrain
from ..training.checkpoint import checkpoint_step, list_checkpoints
from ..visualize import save_reconstruction_grid
from .measure import (EVAL_SEED, PROBE_SEEDS, PROBE_TASKS, colour_class, fully_hidden_colours,  # noqa: F401
                      held_out, masked_word_accuracy, partly_hidden_colours, probe_comparison, save_cross_modal_grid,
                      shape_pixels, word_sets)

CONFIG_FILE = Path(__file__).with_name("demo.yaml")  # the demo's settings, on the tiny preset
PROGRESS_LEGEND = ("progress bar: loss = training loss (image + 0.5 x text), img = pixel error (MSE) on hidden "
                   "patches, txt = cross-entropy on hidden words, acc = hidden-word accuracy, sps = samples/s")


def demo_config(overrides: list[str] | None = None) -> Config:
    """The demo's configuration: ``demo.yaml`` (tiny preset), then ``overrides`` (KEY=VALUE)."""
    return build_config(config_file=str(CONFIG_FILE), overrides=list(overrides or []))


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
    model = load_pretrained(out_dir / "final", device="cpu", need_tokenizer=True)[0]
    te = get_tokenizer(out_dir / "final", cfg.data.text_len)  # the training caption length, not the model's longest
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
    say(next_steps(out_dir, EVAL_SEED, PROBE_SEEDS))
    return s | {"rerun": rerun}
