#!/usr/bin/env python
"""Reproduce the M3AE paper's four claims at small scale, with one command.

    python experiments/reproduce.py --mode standard --processes 2 &   # twice: ~90 min on 2 CPU cores
    python experiments/reproduce.py --mode standard --processes 2
    python experiments/reproduce.py --mode gpu --budget-s 330 --device cuda
    python experiments/reproduce.py --mode gpu --smoke --device cpu   # the gpu mode's code in seconds
    python experiments/reproduce.py --mode standard --report          # tables and plots from the JSON only

Claims (Geng et al. 2022) and how each is tested here, on Tiny-ImageNet with WordNet captions
(pre-training, linear probe) and CIFAR-10 (OOD):

1. M3AE's image encoder transfers better than MAE's: linear probe on Tiny-ImageNet val.
2. A small fraction of paired captions already helps: M3AE with paired_fraction 0.1/0.3/1.0.
3. A high text mask ratio (50-90 %) beats BERT's 15 %: text_mask_ratio 0.15/0.5/0.75/0.9.
4. M3AE detects OOD data better: Mahalanobis and max-softmax AUROC, Tiny-ImageNet val vs
   CIFAR-10 test (far OOD) and CIFAR-10 classes 0-4 vs 5-9 (near OOD).

The MAE baseline is the same model, config, seed (so the same data order, augmentation and
image masks) and number of steps with ``data.paired_fraction=0``: every caption is dropped,
every batch is image-only, and the loss is MAE's pixel loss alone.

Everything lands in ``--out`` (default ``runs/reproduce/<mode>``): one folder per run with
its pre-training output and a ``result.json``. A run whose ``result.json`` exists is skipped;
an interrupted pre-training resumes from its latest checkpoint. Starting the same command
in a second terminal shares out the runs (a run being worked on holds ``running.pid``), which
is how to use more than one core or GPU. ``--report`` turns the JSON
into ``docs/results.md`` (the standard mode; other modes into ``docs/results/<mode>.md``),
``docs/results/<mode>.json`` and the PNG plots; no number in the report is typed by hand.

Modes with ``steps="plan"`` (standard, gpu) size themselves: before training, the first
process times a few steps of each model kind and one checkpoint's evaluation on this machine,
then picks the largest step count (a multiple of 100) at which every run of the mode and its
evaluation fit ``--budget-s`` with ``--processes`` processes sharing them out, dropping the
ablations before any seed when even the smallest budget does not fit. It prints the plan and
writes ``plan.json``, which every later process reads. Modes with ``cache=True`` decode each
dataset once into an image cache (``m3ae cache build``) and pre-train with ``data.source=cache``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3ae.config import PRESETS
from m3ae.io import atomic_write
from m3ae.io import write_json_atomic
from m3ae.reports.stats import (compare, compare_noise, compare_strict, gap_stats, mean, ordinal,  # noqa: F401
                                seeds_cell)

ROOT = Path(__file__).resolve().parents[1]
TIN = "tiny-imagenet-captions"

# ----------------------------------------------------------------------------- settings
# Each mode sets the model, the pre-training budget and the evaluation subsets. ``quick`` is
# sized for ~20 min on 2 contended CPU cores and is the one whose results docs/results.md
# shows; ``full`` is the real small-scale experiment (GPU, or a long CPU run).
MODES: dict[str, dict] = {
    # For the test: seconds, on a slice; the numbers mean nothing.
    "smoke": dict(preset="tiny", model=dict(image_size=32, patch_size=4), text_len=16, vocab=256,
                  caption_limit=300, train_shards=1, steps=3, batch_size=8, lr=1e-3, warmup=1,
                  probe_train=96, val=48, cifar_test=48, cifar_train=48, probe_epochs=3,
                  seeds=(0,), ablations=False, pictures=True, attention_rows=1),
    # The tiny preset at 32 px (Tiny-ImageNet resized from 64), 2 shards (10k pairs), 100 steps.
    "quick": dict(preset="tiny", model=dict(image_size=32, patch_size=4), text_len=32, vocab=4096,
                  caption_limit=None, train_shards=2, steps=100, batch_size=64, lr=1.5e-3, warmup=10,
                  probe_train=4000, val=2000, cifar_test=2000, cifar_train=2000, probe_epochs=50,
                  seeds=(0, 1), ablations=True, pictures=True, attention_rows=4),
    # Sized so that claim 1 can separate on 2 CPU cores in <= 90 min (see docs/results.md).
    "standard": dict(preset="tiny", model=dict(image_size=32, patch_size=4), text_len=64, vocab=4096,
                     classes=100, caption_limit=None, train_shards=None, steps=600, batch_size=128, lr=2e-3,
                     warmup=40, probe_train=10000, val=5000, cifar_test=2000, cifar_train=2000, probe_epochs=50,
                     seeds=(0, 1, 2), ablations=True, paired_fractions=(0.1,), text_mask_ratios=(0.15,),
                     pool="cls", pictures=True, attention_rows=4),
    # The 32-px design of 2026-11-30 (inconclusive), kept for its report: docs/results/standard32.md.
    "standard32": dict(preset="tiny", model=dict(image_size=32, patch_size=4), text_len=64, vocab=4096,
                       classes=100, caption_limit=None, train_shards=None, steps=600, batch_size=128, lr=2e-3,
                       warmup=40, probe_train=10000, val=5000, cifar_test=2000, cifar_train=2000, probe_epochs=50,
                       seeds=(0, 1, 2), ablations=True, paired_fractions=(0.1,), text_mask_ratios=(0.15,),
                       pool="cls", pictures=True, attention_rows=4),
    # 64 px with 8 px patches (the same 8x8 token grid as standard32, so the same transformer
    # cost), images from a cache, the step count planned to fit 90 min on 2 CPU cores.
    "standard": dict(preset="tiny", model=dict(image_size=64, patch_size=8), text_len=64, vocab=4096,
                     classes=100, caption_limit=None, train_shards=None, steps="plan", budget_s=5400,
                     step_range=(600, 2400), batch_size=128, lr=2e-3, warmup_fraction=1 / 15, probe_train=10000,
                     val=5000, cifar_test=2000, cifar_train=2000, probe_epochs=50, fewshot=10, seeds=(0, 1, 2),
                     ablations=True, paired_fractions=(0.1,), text_mask_ratios=(0.15,), pool="cls",
                     pictures=True, attention_rows=4, cache=True),
    # A GPU: ViT-S/8 at 64 px on every Tiny-ImageNet caption pair in --data (all 200 classes),
    # bf16, the steps planned to fit --budget-s. The LR is not tuned (1e-3 at batch 256).
    "gpu": dict(preset="small", model=dict(image_size=64, patch_size=8), text_len=64, vocab=8192,
                caption_limit=None, train_shards=None, steps="plan", budget_s=330, step_range=(200, 20000),
                batch_size=256, lr=1e-3, warmup_fraction=0.05, probe_train=20000, val=10000, cifar_test=5000,
                cifar_train=10000, probe_epochs=50, fewshot=10, seeds=(0, 1, 2), ablations=True,
                paired_fractions=(0.1,), text_mask_ratios=(0.15,), pool="cls", pictures=True, attention_rows=4,
                cache=True, precision="bf16"),
    # 64 px with 8 px patches (the same 8x8 token grid), all 40k pairs, ~20 epochs, full eval sets.
    "full": dict(preset="tiny", model=dict(image_size=64, patch_size=8), text_len=32, vocab=8192,
                 caption_limit=None, train_shards=8, steps=6000, batch_size=128, lr=1.5e-3, warmup=300,
                 probe_train=40000, val=10000, cifar_test=10000, cifar_train=25000, probe_epochs=90,
                 seeds=(0, 1, 2), ablations=True, pictures=True, attention_rows=4),
}

# --smoke: a planned, cached mode's code path at the smoke mode's sizes, in seconds on a CPU.
SMOKE = dict(preset="tiny", text_len=16, vocab=256, caption_limit=300, train_shards=1, classes=None, budget_s=60,
             step_range=(3, 3), batch_size=8, lr=1e-3, probe_train=96, val=48, cifar_test=48, cifar_train=48,
             probe_epochs=3, fewshot=2, seeds=(0,), ablations=False, precision="fp32", plan_steps=2,
             caption_check=32)


def smoke_of(mode: dict) -> dict:
    """``mode`` at smoke size: the same structure (cache, plan, readouts), tiny numbers."""
    return {**mode, **SMOKE, "model": {**mode["model"], "image_size": 32, "patch_size": 4}}


# The paper's numbers (ViT-B/16, 50 epochs on CC12M; ImageNet linear probe; CIFAR OOD).
PAPER = {
    "claim1": {"mae": 44.6, "m3ae": 61.3},
    "claim2": {0.1: 53.3, 0.2: 54.0, 0.3: 54.5, 1.0: 58.8},
    "claim3": "text mask ratios of 50-90% beat 15% (BERT's); 75% is best",
    "claim4": {"mahalanobis": {"mae": 69.0, "m3ae": 71.4}, "msp": {"mae": 77.2, "m3ae": 78.5}},
}
PAIRED_FRACTIONS = (0.1, 0.3)
TEXT_MASK_RATIOS = (0.15, 0.5, 0.9)  # 0.75 is the default M3AE run


@dataclass
class RunSpec:
    name: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    ood: bool = False  # OOD evaluation (the main comparison only)
    kind: str = "m3ae"  # "mae" or "m3ae"
    paired_fraction: float = 1.0
    text_mask_ratio: float = 0.75


def run_specs(mode: dict) -> list[RunSpec]:
    specs = []
    for seed in mode["seeds"]:
        specs.append(RunSpec(f"mae_s{seed}", seed, ["data.paired_fraction=0.0"], ood=True, kind="mae",
                             paired_fraction=0.0))
        specs.append(RunSpec(f"m3ae_s{seed}", seed, [], ood=True))
    if mode["ablations"]:
        seed = mode["seeds"][0]
        for p in mode.get("paired_fractions", PAIRED_FRACTIONS):
            specs.append(RunSpec(f"m3ae_paired{p}_s{seed}", seed, [f"data.paired_fraction={p}"],
                                 paired_fraction=p))
        for r in mode.get("text_mask_ratios", TEXT_MASK_RATIOS):
            specs.append(RunSpec(f"m3ae_textmask{r}_s{seed}", seed, [f"model.text_mask_ratio={r}"],
                                 text_mask_ratio=r))
    return specs


# ------------------------------------------------------------------------------ helpers
def shards(data: Path, name: str, split: str, n: int | None = None) -> str:
    files = sorted((data / name).glob(f"{split}-*.tar.gz")) or sorted((data / name).glob(f"{split}-*.tar"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {data / name}; pass --data (the shared data folder)")
    return "::".join(str(f) for f in files[:n])


def class_subset(data: Path, out: Path, n_classes: int) -> Path:
    """A data folder whose Tiny-ImageNet holds every (200 / n_classes)-th class, relabelled
    0..n_classes-1 (train and val shards, classes.txt), and links to the other datasets.

    Fewer classes with the same 200 images each mean more passes over every class for the
    same number of steps, so a short CPU run gets further into learning what the captions
    name; the probe's task shrinks with it. Built once; a finished folder is reused."""
    import io

    root = out / "data"
    done = root / TIN / "classes.txt"
    if done.is_file():
        return root
    stride = 200 // n_classes
    src = data / TIN
    dst = root / f".{TIN}.{os.getpid()}.tmp"
    dst.mkdir(parents=True, exist_ok=True)
    names = [line.split("\t")[2] for line in (src / "classes.tsv").read_text().splitlines() if line.strip()]
    (dst / "classes.txt").write_text("\n".join(names[i] for i in range(0, stride * n_classes, stride)) + "\n")
    for split in ("train", "val"):
        samples: dict[str, dict[str, bytes]] = {}
        for shard in sorted(src.glob(f"{split}-*.tar.gz")):
            with tarfile.open(shard, "r|*") as tf:
                for m in tf:
                    if m.isfile():
                        key, ext = m.name.split(".", 1)
                        samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        kept = [(k, v) for k, v in samples.items()
                if int(v["cls"]) % stride == 0 and int(v["cls"]) < stride * n_classes]
        for i in range(0, len(kept), 5000):
            with tarfile.open(dst / f"{split}-{i // 5000:06d}.tar", "w") as tf:
                for key, files in kept[i:i + 5000]:
                    files = dict(files, cls=str(int(files["cls"]) // stride).encode())
                    for ext, data_ in files.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data_)
                        tf.addfile(info, io.BytesIO(data_))
    for other in data.iterdir():
        if other.is_dir() and other.name != TIN and not (root / other.name).exists():
            (root / other.name).symlink_to(other.resolve())
    try:
        dst.rename(root / TIN)
    except OSError:  # another process finished first
        shutil.rmtree(dst, ignore_errors=True)
    return root


def train_tokenizer(out: Path, data: Path, mode: dict) -> Path:
    """One WordPiece vocabulary from the pre-training captions, shared by every run (so all
    M3AE runs see the same token ids); trained once, since retraining can reorder ids."""
    from m3ae.tokenizer import train_wordpiece

    path = out / "tokenizer.json"
    if path.is_file():
        return path
    if mode.get("cache"):  # the library's reader: captions cleaned as pre-training sees them
        from m3ae.config import DataConfig
        from m3ae.data import source_captions

        cfg = DataConfig(source="cache", urls=str(cache_path(out, "tin-train", mode)))
        captions = list(source_captions(cfg, limit=mode["caption_limit"] or 10**9))
        return _save_once(train_wordpiece(captions, vocab_size=mode["vocab"]), path)
    captions = []
    for shard in shards(data, TIN, "train", mode["train_shards"]).split("::"):
        with tarfile.open(shard, "r|*") as tf:
            for m in tf:
                if m.name.endswith(".txt"):
                    captions.append(tf.extractfile(m).read().decode("utf-8").strip())
                    if mode["caption_limit"] and len(captions) >= mode["caption_limit"]:
                        break
        if mode["caption_limit"] and len(captions) >= mode["caption_limit"]:
            break
    return _save_once(train_wordpiece(captions, vocab_size=mode["vocab"]), path)


def _save_once(tok, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    try:
        os.link(tmp, path)  # never replaces: a second process started alongside keeps the first file
    except FileExistsError:
        pass
    tmp.unlink()
    return path


# Every set a mode reads: (folder, split, how many; None = all). The probe's training images
# are the first ``probe_train`` of the pre-training set, as in the streaming modes.
CACHE_SETS = {"tin-train": (TIN, "train", None), "tin-val": (TIN, "val", "val"),
              "cifar-test": ("cifar10", "test", "cifar_test"), "cifar-train": ("cifar10", "train", "cifar_train")}


def cache_path(out: Path, name: str, mode: dict) -> Path:
    return out / "caches" / f"{name}-{mode['model']['image_size']}px"


def build_caches(data: Path, out: Path, mode: dict, progress: bool) -> None:
    """Each dataset decoded once, at the model's image size, into ``out/caches`` (reused by
    every run and every later call)."""
    from m3ae.data.cache import build_cache, is_cache, source_config

    for name, (folder, split, size_key) in CACHE_SETS.items():
        path = cache_path(out, name, mode)
        if is_cache(path):
            continue
        n = mode["train_shards"] if split == "train" and folder == TIN else None
        limit = mode[size_key] if size_key else None
        build_cache([source_config(shards(data, folder, split, n))], path, mode["model"]["image_size"],
                    progress=progress, limit=limit)


def build_run_config(spec: RunSpec, mode: dict, data: Path, tokenizer: Path, device: str, out: Path | None = None):
    from m3ae.config import build_config
    from m3ae.tokenizer import load_tokenizer

    m, steps = mode, mode["steps"]
    overrides = [f"model.{k}={v}" for k, v in m["model"].items()] + [
        f"model.vocab_size={load_tokenizer(tokenizer).get_vocab_size()}",
        *(["data.source=cache", f"data.urls={cache_path(out or tokenizer.parent, 'tin-train', m)}"]
          if m.get("cache") else
          ["data.source=webdataset", f"data.urls={shards(data, TIN, 'train', m['train_shards'])}"]),
        f"data.tokenizer={tokenizer}", f"data.text_len={m['text_len']}",
        # The shards were shuffled when built: read in order, no shuffle buffer is needed, and
        # the order is a function of the seed alone for every run (MAE and M3AE alike).
        "data.shuffle_buffer=0",
        f"train.steps={steps}", f"train.batch_size={m['batch_size']}", f"train.lr={m['lr']}",
        f"train.warmup_steps={m['warmup']}", f"train.seed={spec.seed}", f"train.device={device}",
        f"train.log_every={max(1, min(10, steps // 10))}", "train.recon_every=0",
        # Checkpoints at every quarter are kept: the probe curve is measured on them.
        f"train.ckpt_every={max(1, steps // 4)}", "train.keep_last=1", f"train.keep_every={max(1, steps // 4)}",
        f"train.precision={m.get('precision', 'fp32')}",
    ] + spec.overrides
    return build_config(m["preset"], None, overrides)


def _subset(f, keep: np.ndarray):
    from m3ae.evaluation import Features

    return Features(f.features[keep], f.labels[keep], [k for k, ok in zip(f.keys, keep) if ok], f.class_names)


# ---------------------------------------------------------------------------- one run
POOLS = ("cls", "mean")  # the paper probes CLS; the mean of the image tokens is reported beside it


def eval_images(data: Path, out: Path, mode: dict, size: int) -> dict:
    """The evaluation images of every run, decoded and normalised once (by the library's
    evaluation path) and kept as float16 tensors in ``out/eval_cache``: every checkpoint of
    every run is then one encoder pass over tensors, not a fresh JPEG decode."""
    import torch

    from m3ae.evaluation import load_labelled, make_loader

    sets = {"tin-train": (TIN, "train", mode["probe_train"]), "tin-val": (TIN, "val", mode["val"]),
            "cifar-test": ("cifar10", "test", mode["cifar_test"]),
            "cifar-train": ("cifar10", "train", mode["cifar_train"])}
    where = {name: str(cache_path(out, name, mode)) if mode.get("cache") else shards(data, folder, split)
             for name, (folder, split, _) in sets.items()}
    cache = out / "eval_cache"
    cache.mkdir(parents=True, exist_ok=True)
    loaded = {}
    for name, (folder, split, limit) in sets.items():
        path = cache / f"{name}-{size}px-{limit}.pt"
        if not path.is_file():
            labelled = load_labelled(where[name], size, limit=limit)
            images, labels = [], []
            for batch in make_loader(labelled, None, 256):
                images.append(batch["image"].half())
                labels.append(batch["label"])
            blob = {"images": torch.cat(images), "labels": torch.cat(labels), "classes": labelled.class_names}
            atomic_write(path, lambda tmp: torch.save(blob, tmp))
        loaded[name] = torch.load(path, weights_only=False)
    return loaded


def encode(model, blob: dict, batch_size: int = 500) -> dict:
    """Image-only encoder features of a cached set, every pool from one forward."""
    import torch

    from m3ae.evaluation import Features
    from m3ae.evaluation.features import pool_tokens

    model.eval()
    feats = {p: [] for p in POOLS}
    with torch.no_grad():
        for i in range(0, len(blob["images"]), batch_size):
            latent = model.forward_features(blob["images"][i:i + batch_size].float())
            for p in POOLS:
                feats[p].append(pool_tokens(latent, None, p))
    labels = blob["labels"].numpy()
    keys = [str(i) for i in range(len(labels))]
    return {p: Features(torch.cat(f).numpy(), labels, keys, blob["classes"]) for p, f in feats.items()}


def few_shot(f, k: int, seed: int):
    """``k`` labelled examples per class of ``f`` (drawn with ``seed``, the same for every model)."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(f.labels), dtype=bool)
    for c in np.unique(f.labels):
        idx = np.flatnonzero(f.labels == c)
        keep[rng.choice(idx, size=min(k, len(idx)), replace=False)] = True
    return _subset(f, keep)


def probe_checkpoint(model, sets: dict, mode: dict, seed: int) -> tuple[dict, dict]:
    """Linear probe (+ kNN) of every pool on Tiny-ImageNet val, and with ``mode["fewshot"]``
    a linear probe trained on that many images per class -> (results, features)."""
    from m3ae.evaluation import linear_probe

    train, val = encode(model, sets["tin-train"]), encode(model, sets["tin-val"])
    probes = {p: linear_probe(train[p], val[p], epochs=mode["probe_epochs"], seed=seed) for p in POOLS}
    if mode.get("fewshot"):
        for p in POOLS:  # the same images for every model and checkpoint (seed 0)
            probes[f"{p}/fewshot"] = linear_probe(few_shot(train[p], mode["fewshot"], 0), val[p],
                                                  epochs=mode["probe_epochs"], seed=seed)
    return probes, {"train": train, "val": val}


def ood_eval(model, sets: dict, feats: dict, probe, mode: dict, seed: int) -> dict:
    """Far OOD (Tiny-ImageNet val vs CIFAR-10 test) and near OOD (CIFAR-10 classes 0-4 vs 5-9)."""
    from m3ae.evaluation import ood_scores

    pool = mode.get("pool", "cls")
    c = {k: encode(model, sets[k])[pool] for k in ("cifar-test", "cifar-train")}
    far = ood_scores(feats["train"][pool], feats["val"][pool], c["cifar-test"], probe=probe)
    near = ood_scores(_subset(c["cifar-train"], c["cifar-train"].labels < 5),
                      _subset(c["cifar-test"], c["cifar-test"].labels < 5),
                      _subset(c["cifar-test"], c["cifar-test"].labels >= 5),
                      probe_epochs=mode["probe_epochs"], seed=seed)
    return {"ood_far": {"metrics": far.metrics, "id_accuracy": far.id_accuracy,
                        "n_id": len(feats["val"][pool]), "n_ood": len(c["cifar-test"])},
            "ood_near": {"metrics": near.metrics, "id_accuracy": near.id_accuracy,
                         "n_id": int((c["cifar-test"].labels < 5).sum()),
                         "n_ood": int((c["cifar-test"].labels >= 5).sum())}}


def evaluate_run(spec: RunSpec, mode: dict, data: Path, run_dir: Path, device: str, progress: bool,
                 out: Path | None = None) -> dict:
    """Linear probe on Tiny-ImageNet val of the final model (every pool) and of the kept
    checkpoints (the probe curve); for the main runs also OOD AUROCs."""
    from m3ae.evaluation import load_model

    model, _ = load_model(run_dir / "final", device)
    sets = eval_images(data, out or run_dir.parent, mode, model.config.image_size)
    pool = mode.get("pool", "cls")
    probes, feats = probe_checkpoint(model, sets, mode, spec.seed)
    res = {"probe": probes[pool].as_dict(), "probes": {p: r.as_dict() for p, r in probes.items()}, "pool": pool}
    final_step = mode["steps"]
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        step = int(ckpt.name.split("_")[1])
        if step == final_step:
            ps = probes  # the final checkpoint holds the same weights as final/
        else:
            ps, _ = probe_checkpoint(load_model(ckpt, device)[0], sets, mode, spec.seed)
        curve.append({"step": step, **{p: {"top1": r.top1, "knn_top1": r.knn_top1} for p, r in ps.items()}})
    res["curve"] = curve
    n_images = (len(sets["tin-train"]["labels"]) + len(sets["tin-val"]["labels"])) * max(1, len(curve))
    if spec.ood:
        res.update(ood_eval(model, sets, feats, probes[pool].probe, mode, spec.seed))
        n_images += len(sets["cifar-test"]["labels"]) + len(sets["cifar-train"]["labels"])
    res["eval_images"] = n_images
    return res


def save_pictures(spec: RunSpec, mode: dict, data: Path, run_dir: Path, device: str) -> list[str]:
    """Reconstructions of validation images (no captions there) and, for M3AE, of captioned
    training images plus cross-modal attention."""
    import torch

    from m3ae.evaluation import load_labelled, load_model, make_loader
    from m3ae.visualize import save_reconstruction_grid

    model, text_tokenizer = load_model(run_dir / "final", device)
    size = model.config.image_size
    pics = run_dir / "pictures"
    made = []
    g = torch.Generator(device=device).manual_seed(1234)  # the same masks for every model
    val = next(iter(make_loader(load_labelled(shards(data, TIN, "val"), size, limit=6), None, 6)))
    made.append(str(save_reconstruction_grid(model, val, pics / "recon_val.png", text_tokenizer, generator=g)))
    if spec.kind == "m3ae" and text_tokenizer is not None:
        from m3ae.evaluation.attention import save_attention_figure

        train = load_labelled(shards(data, TIN, "train", 1), size, limit=6)
        batch = next(iter(make_loader(train, text_tokenizer, 6)))
        g = torch.Generator(device=device).manual_seed(1234)
        made.append(str(save_reconstruction_grid(model, batch, pics / "recon_train_captions.png", text_tokenizer,
                                                 generator=g)))
        made.append(str(save_attention_figure(model, text_tokenizer, batch, pics / "attention.png",
                                             n=mode["attention_rows"])))
    return made


def caption_diagnostic(run_dir: Path, data: Path, device: str, n: int = 2000) -> dict:
    """Masked caption words predicted with the image and with it removed (same captions, same
    text masks), on captioned training images: how much of what the text head knows comes
    through the image tokens, i.e. whether cross-modal learning happened at all."""
    import torch

    from m3ae import M3AELoss
    from m3ae.evaluation import load_labelled, load_model, make_loader

    model, text_tokenizer = load_model(run_dir / "final", device)
    model.eval()
    loss = M3AELoss(text_norm="text")
    sums = {"with_image": [0.0, 0.0], "without_image": [0.0, 0.0]}
    count = 0
    g = torch.Generator().manual_seed(0)
    labelled = load_labelled(shards(data, TIN, "train"), model.config.image_size, limit=n)
    with torch.no_grad():
        for batch in make_loader(labelled, text_tokenizer, 250):
            image, text, pad = batch["image"].to(device), batch["text"].to(device), batch["text_padding_mask"].to(device)
            inoise = torch.rand(len(image), model.config.num_patches, generator=g).to(device)
            tnoise = torch.rand(text.shape, generator=g).to(device)
            for key, img in (("with_image", image), ("without_image", None)):
                out = loss(model(img, text, pad, image_noise=inoise if img is not None else None, text_noise=tnoise))
                sums[key][0] += float(out.text_accuracy) * len(text)
                sums[key][1] += float(out.text_loss) * len(text)
            count += len(text)
    return {k: {"accuracy": a / count, "loss": l_ / count} for k, (a, l_) in sums.items()} | {"n": count}


def _take(run_dir: Path) -> bool:
    """Mark ``run_dir`` as being worked on by this process; False when another live process
    on this machine has it. So the same command started twice shares out the runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return _take_file(run_dir / "running.pid")


def do_run(spec: RunSpec, mode: dict, data: Path, out: Path, tokenizer: Path, device: str,
           progress: bool) -> dict | None:
    """Pre-train and evaluate one run, or read its result; None when another process has it."""
    run_dir = out / spec.name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if spec.kind == "m3ae" and "caption_diag" not in result and _take(run_dir):
            try:  # a result written before the diagnostic existed is completed, not redone
                result["caption_diag"] = caption_diagnostic(run_dir, data, device)
                write_json_atomic(result_path, result)  # a result file is complete or absent
            finally:
                (run_dir / "running.pid").unlink(missing_ok=True)
        return result
    if not _take(run_dir):
        return None
    try:
        return _do_run(spec, mode, data, run_dir, tokenizer, device, progress)
    finally:
        (run_dir / "running.pid").unlink(missing_ok=True)


def _do_run(spec: RunSpec, mode: dict, data: Path, run_dir: Path, tokenizer: Path, device: str,
            progress: bool) -> dict:
    from m3ae.training import pretrain

    result_path = run_dir / "result.json"
    cfg = build_run_config(spec, mode, data, tokenizer, device, run_dir.parent)
    started = time.time()
    t0 = time.perf_counter()
    # Re-running after an interruption continues from the newest checkpoint.
    res = pretrain(cfg, run_dir, resume="latest", progress=progress)
    t_pre = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    t0 = time.perf_counter()
    ev = evaluate_run(spec, mode, data, run_dir, device, progress, out=run_dir.parent)
    t_eval = time.perf_counter() - t0
    if spec.kind == "m3ae":
        ev["caption_diag"] = caption_diagnostic(run_dir, data, device, mode.get("caption_check", 2000))
    pictures = save_pictures(spec, mode, data, run_dir, device) if mode["pictures"] and spec.ood and \
        spec.seed == mode["seeds"][0] else []
    result = {
        "name": spec.name, "kind": spec.kind, "seed": spec.seed, "paired_fraction": spec.paired_fraction,
        "text_mask_ratio": spec.text_mask_ratio, "steps": res.steps,
        "samples_seen": res.steps * cfg.train.batch_size,
        "final": {k: metrics[-1].get(k) for k in ("loss", "image_loss", "text_loss", "text_accuracy")},
        "pretrain_seconds": t_pre, "eval_seconds": t_eval, **ev, "pictures": pictures,
        "config": cfg.to_dict(), "device": device, "started_at": started, "finished_at": time.time(),
    }
    write_json_atomic(result_path, result)  # a result file is complete or absent
    return result


# ------------------------------------------------------------------------------- planning
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(mode: dict, data: Path, out: Path, tokenizer: Path, device: str) -> dict:
    """What one process spends here: samples/s of each model kind's pre-training (``m3ae
    pretrain`` itself on the mode's data, after its first log window), one checkpoint's probe
    evaluation, one OOD evaluation and one caption diagnostic."""
    import tempfile

    from m3ae.evaluation import load_model
    from m3ae.training import pretrain

    n = mode.get("plan_steps", 15)
    every = max(1, n // 3)
    rates, cost = {}, {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for spec in (RunSpec("m3ae", 0), RunSpec("mae", 0, ["data.paired_fraction=0.0"], kind="mae",
                                                 paired_fraction=0.0)):
            cfg = build_run_config(spec, dict(mode, steps=n, warmup=1), data, tokenizer, device, out)
            cfg.train.log_every, cfg.train.ckpt_every, cfg.train.keep_every = every, 0, 0
            run = Path(tmp) / spec.name
            res = pretrain(cfg, run, progress=False)
            windows = [r["samples_per_s"] for r in res.history[1:]] or [res.history[-1]["samples_per_s"]]
            rates[spec.kind] = float(np.median(windows))
        model, _ = load_model(Path(tmp) / "m3ae" / "final", device)
        sets = eval_images(data, out, mode, model.config.image_size)
        (probes, feats), cost["probe_checkpoint_s"] = _timed(lambda: probe_checkpoint(model, sets, mode, 0))
        pool = mode.get("pool", "cls")
        _, cost["ood_s"] = _timed(lambda: ood_eval(model, sets, feats, probes[pool].probe, mode, 0))
        _, cost["caption_diag_s"] = _timed(lambda: caption_diagnostic(Path(tmp) / "m3ae", data, device,
                                                                      mode.get("caption_check", 2000)))
    return {"samples_per_s": rates, **cost, "timed_steps": n}


def plan(mode: dict, specs: list, measured: dict, budget_s: float, processes: int, spent_s: float) -> dict:
    """The largest step count (a multiple of 100 within ``mode["step_range"]``) at which every
    run and its evaluation fit ``budget_s`` of wall time with ``processes`` processes, from the
    measured costs; without the ablations when even the smallest does not fit."""
    lo, hi = mode["step_range"]
    n_curve = 4  # the probe curve: a checkpoint at every quarter, the last one the final model

    def costs(runs):
        per_step = sum(mode["batch_size"] / measured["samples_per_s"][r.kind] for r in runs)
        evals = sum(n_curve * measured["probe_checkpoint_s"] + (measured["ood_s"] if r.ood else 0)
                    + (measured["caption_diag_s"] if r.kind == "m3ae" else 0) for r in runs)
        return per_step, evals

    left = (budget_s - spent_s) * processes
    dropped: list[str] = []
    runs = list(specs)
    while True:
        per_step, evals = costs(runs)
        # A multiple of 100, so that the quarter checkpoints (the probe curve) divide it evenly.
        steps = int((left - evals) / per_step) // 100 * 100 if left > evals else 0
        ablations = [r for r in runs if not r.ood]
        if steps >= lo or not ablations:
            break
        dropped.append(ablations[-1].name)  # ablations go before any seed
        runs.remove(ablations[-1])
    fits = steps >= lo
    steps = min(max(steps, lo), hi)
    per_step, evals = costs(runs)
    return {"steps": steps, "warmup": max(1, round(steps * mode.get("warmup_fraction", 0.05))),
            "runs": [r.name for r in runs], "dropped": dropped, "fits": fits, "budget_s": budget_s,
            "processes": processes, "planning_s": spent_s,
            "estimated_wall_s": spent_s + (evals + steps * per_step) / processes, "measured": measured}


def plan_text(p: dict, mode: dict) -> str:
    m = p["measured"]
    rate = ", ".join(f"{k} {v:.0f} samples/s" for k, v in m["samples_per_s"].items())
    dropped = f"; left out to fit: {', '.join(p['dropped'])}" if p["dropped"] else ""
    over = "" if p["fits"] else f" (the smallest budget, {p['steps']} steps, does not fit: expect longer)"
    return (f"plan: {p['steps']} steps of batch {mode['batch_size']} for {len(p['runs'])} runs "
            f"({', '.join(p['runs'])}){dropped}{over}; measured per process: {rate}, one checkpoint's probes "
            f"{m['probe_checkpoint_s']:.0f} s, OOD {m['ood_s']:.0f} s, caption check {m['caption_diag_s']:.0f} s; "
            f"estimated wall {p['estimated_wall_s'] / 60:.1f} min of the {p['budget_s'] / 60:.1f} min budget with "
            f"{p['processes']} process(es)")


def prepare(mode: dict, data: Path, out: Path, device: str, args) -> tuple[dict, Path, list]:
    """Caches, tokenizer and (planned modes) the plan, made by the first process while later
    ones wait for its ``plan.json``. -> (the mode with its steps, tokenizer, run specs)."""
    t_start = time.perf_counter()
    lock = out / "prepare.lock"
    done = out / "plan.json"
    specs = run_specs(mode)
    mine = not done.is_file() and _take_file(lock)
    if not done.is_file() and not mine:
        print(f"waiting for the process preparing {out} (caches, tokenizer, plan)", flush=True)
        while not done.is_file():
            if not _take_file(lock):
                time.sleep(2)
                continue
            mine = True
            break
    if mine and not done.is_file():
        try:
            if mode.get("cache"):
                build_caches(data, out, mode, progress=not args.no_progress)
            tokenizer = train_tokenizer(out, data, mode)
            if mode["steps"] == "plan":
                budget = args.budget_s or mode["budget_s"]
                measured = measure(mode, data, out, tokenizer, device)
                p = plan(mode, specs, measured, budget, args.processes, time.perf_counter() - t_start)
            else:
                p = {"steps": mode["steps"], "warmup": mode["warmup"], "runs": [r.name for r in specs]}
            write_json_atomic(done, p)
        finally:
            lock.unlink(missing_ok=True)
    p = json.loads(done.read_text())
    if "measured" in p:
        print(plan_text(p, mode), flush=True)
    mode = dict(mode, steps=p["steps"], warmup=p["warmup"])
    return mode, out / "tokenizer.json", [r for r in specs if r.name in p["runs"]]


def _take_file(lock: Path) -> bool:
    """Create ``lock`` holding our pid; False when another live process holds it (a dead one's
    is taken over)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)  # raises when no such process: the lock is stale
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return _take_file(lock)
        except PermissionError:
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


# ------------------------------------------------------------------------------ report
# Every readout of a run's encoder: (key in result["probes"] and in its curve points, field).
READOUTS = {"linear probe, CLS": ("cls", "top1"), "linear probe, mean": ("mean", "top1"),
            "kNN, CLS": ("cls", "knn_top1"), "kNN, mean": ("mean", "knn_top1"),
            "few-shot probe, CLS": ("cls/fewshot", "top1"), "few-shot probe, mean": ("mean/fewshot", "top1")}


def readout_summary(m3ae: list[dict], mae: list[dict]) -> tuple[dict, dict]:
    """Claim 1 on every readout of the final models (top-1 %, gap statistics, the strict
    verdict) and along training: {readout: {step: {"m3ae": [...], "mae": [...]}}}."""
    final, curve = {}, {}
    for label, (key, field_) in READOUTS.items():
        vals = {kind: [100 * r["probes"][key][field_] for r in rs if key in r.get("probes", {})]
                for kind, rs in (("m3ae", m3ae), ("mae", mae))}
        if vals["m3ae"] or vals["mae"]:
            final[label] = {**vals, **gap_stats(vals["m3ae"], vals["mae"]),
                            "verdict": compare_strict(vals["m3ae"], vals["mae"])}
        for kind, rs in (("m3ae", m3ae), ("mae", mae)):
            for r in rs:
                for point in r.get("curve", []):
                    if key in point:
                        curve.setdefault(label, {}).setdefault(str(point["step"]), {"m3ae": [], "mae": []})[
                            kind].append(100 * point[key][field_])
    return final, curve


def summarize(results: dict[str, dict], mode_name: str, mode: dict) -> dict:
    """The numbers the report shows, from the per-run results."""
    def by(kind=None, pf=None, tm=None, seed=None):
        return [r for r in results.values() if (kind is None or r["kind"] == kind)
                and (pf is None or abs(r["paired_fraction"] - pf) < 1e-9)
                and (tm is None or abs(r["text_mask_ratio"] - tm) < 1e-9)
                and (seed is None or r["seed"] == seed)]

    def top1(rs):
        return [100 * r["probe"]["top1"] for r in rs]

    paired_fractions = tuple(mode.get("paired_fractions", PAIRED_FRACTIONS))
    text_mask_ratios = tuple(mode.get("text_mask_ratios", TEXT_MASK_RATIOS))
    mae, m3ae = by("mae"), by("m3ae", pf=1.0, tm=0.75)
    mae, m3ae = sorted(mae, key=lambda r: r["seed"]), sorted(m3ae, key=lambda r: r["seed"])
    mae_acc, m3ae_acc = top1(mae), top1(m3ae)
    spread = max([max(x) - min(x) for x in (mae_acc, m3ae_acc) if len(x) > 1] or [float("nan")])
    s0 = mode["seeds"][0]
    s = {"mode": mode_name, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in mode.items()},
         "seed_spread_top1": spread}
    s["claim1"] = {
        "mae_top1": mae_acc, "m3ae_top1": m3ae_acc, "mae_top5": [100 * r["probe"]["top5"] for r in mae],
        "m3ae_top5": [100 * r["probe"]["top5"] for r in m3ae],
        "mae_knn": [100 * r["probe"]["knn_top1"] for r in mae], "m3ae_knn": [100 * r["probe"]["knn_top1"] for r in m3ae],
        "chance": 100 * (mae or m3ae)[0]["probe"]["chance"] if (mae or m3ae) else None,
        "pool": mode.get("pool", "cls"), **gap_stats(m3ae_acc, mae_acc),
        "seed_gaps": {str(a["seed"]): 100 * (a["probe"]["top1"] - b["probe"]["top1"])
                      for a in m3ae for b in mae if a["seed"] == b["seed"]},
        "verdict": compare_strict(m3ae_acc, mae_acc)}
    # Every pool the runs were probed with (CLS, mean of the image tokens), and the curves.
    s["caption_diag"] = {r["name"]: r["caption_diag"] for r in by("m3ae") if "caption_diag" in r}
    s["claim1_pools"], s["curve"] = {}, {}
    for pool in POOLS:
        a = [100 * r["probes"][pool]["top1"] for r in m3ae if pool in r.get("probes", {})]
        b = [100 * r["probes"][pool]["top1"] for r in mae if pool in r.get("probes", {})]
        if a or b:
            s["claim1_pools"][pool] = {
                "m3ae_top1": a, "mae_top1": b, **gap_stats(a, b), "verdict": compare_strict(a, b),
                "m3ae_knn": [100 * r["probes"][pool]["knn_top1"] for r in m3ae if pool in r.get("probes", {})],
                "mae_knn": [100 * r["probes"][pool]["knn_top1"] for r in mae if pool in r.get("probes", {})]}
    s["readouts"], s["readout_curve"] = readout_summary(m3ae, mae)
    for kind, rs in (("mae", mae), ("m3ae", m3ae)):
        for r in rs:
            for point in r.get("curve", []):
                for pool in POOLS:
                    if pool in point:
                        s["curve"].setdefault(kind, {}).setdefault(pool, {}).setdefault(
                            str(point["step"]), []).append(100 * point[pool]["top1"])
    curve2 = {0.0: mean(top1(by("mae", seed=s0)))}
    for p in paired_fractions + (1.0,):
        curve2[p] = mean(top1(by("m3ae", pf=p, tm=0.75, seed=s0)))
    noise = 0.0 if spread != spread else spread
    small = [curve2[p] - curve2[0.0] for p in paired_fractions]
    if any(d != d for d in small):
        verdict2 = "not run"
    elif min(small) > 0 or max(small) < 0:  # both fractions on the same side of MAE
        verdict2 = compare_noise(min(small) if min(small) > 0 else max(small), noise)
    else:
        verdict2 = "inconclusive (the small fractions fall on different sides of MAE)"
    s["claim2"] = {"top1": {str(k): v for k, v in curve2.items()}, "verdict": verdict2}
    curve3 = {r: mean(top1(by("m3ae", pf=1.0, tm=r, seed=s0))) for r in sorted(text_mask_ratios + (0.75,))}
    high = [curve3[r] for r in curve3 if r >= 0.5 and curve3[r] == curve3[r]]
    best = max(curve3, key=lambda r: -1e9 if curve3[r] != curve3[r] else curve3[r])
    s["claim3"] = {"top1": {str(k): v for k, v in curve3.items()}, "best_ratio": best,
                   "verdict": compare_noise(mean(high) - curve3[0.15], noise)}
    c4 = {}
    for setting in ("ood_far", "ood_near"):
        for metric in ("mahalanobis", "msp"):
            a = [100 * r[setting]["metrics"][metric]["auroc"] for r in m3ae if setting in r]
            b = [100 * r[setting]["metrics"][metric]["auroc"] for r in mae if setting in r]
            c4[f"{setting}/{metric}"] = {"m3ae": a, "mae": b, "verdict": compare(a, b)}
        c4[f"{setting}/id_accuracy"] = {"m3ae": [100 * r[setting]["id_accuracy"] for r in m3ae if setting in r],
                                        "mae": [100 * r[setting]["id_accuracy"] for r in mae if setting in r]}
    s["claim4"] = c4
    s["runs"] = {n: {k: r[k] for k in ("kind", "seed", "paired_fraction", "text_mask_ratio", "steps",
                                        "samples_seen", "final", "pretrain_seconds", "eval_seconds",
                                        "eval_images", "device")}
                 for n, r in sorted(results.items())}
    pre = sum(r["pretrain_seconds"] for r in results.values())
    ev = sum(r["eval_seconds"] for r in results.values())
    seen = sum(r["samples_seen"] for r in results.values())
    imgs = sum(r["eval_images"] for r in results.values())
    wall = max(r["finished_at"] for r in results.values()) - min(r["started_at"] for r in results.values())
    # How many runs overlapped at most (the command may have been started more than once).
    spans = [(r["started_at"], r["finished_at"]) for r in results.values()]
    parallel = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    s["timing"] = {"pretrain_seconds": pre, "eval_seconds": ev, "pretrain_samples_per_s": seen / max(pre, 1e-9),
                   "eval_images_per_s": imgs / max(ev, 1e-9), "wall_seconds": wall,
                   "max_parallel_runs": parallel, "devices": sorted({r["device"] for r in results.values()})}
    # Full mode's wall time at the throughput measured here (the same 8x8 token grid, so
    # about the same cost per sample; decoding 64 px instead of resizing to 32 is a wash).
    full = MODES["full"]
    n_runs = len(run_specs(full))
    full_seen = n_runs * full["steps"] * full["batch_size"]
    n_main = 2 * len(full["seeds"])
    full_imgs = n_runs * (full["probe_train"] + full["val"]) + n_main * (full["cifar_test"] + full["cifar_train"])
    s["full_estimate_hours"] = (full_seen / s["timing"]["pretrain_samples_per_s"]
                                + full_imgs / s["timing"]["eval_images_per_s"]) / 3600
    return s


def make_plots(s: dict, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = docs / "results"
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    c1 = s["claim1"]
    ax = axes[0]
    for i, (k, lab) in enumerate((("mae_top1", "MAE"), ("m3ae_top1", "M3AE"))):
        ax.bar(i, np.mean(c1[k]) if c1[k] else 0, color=("tab:gray", "tab:blue")[i], alpha=0.6)
        ax.scatter([i] * len(c1[k]), c1[k], color="k", s=12, zorder=3)
    if c1["chance"]:
        ax.axhline(c1["chance"], ls=":", color="r", lw=1, label="chance")
        ax.legend(fontsize=7)
    ax.set_xticks([0, 1], ["MAE", "M3AE"])
    ax.set_ylabel("Tiny-ImageNet val top-1 (%)")
    ax.set_title("1: linear probe (dots = seeds)", fontsize=9)
    for ax, key, xlabel, title in ((axes[1], "claim2", "paired fraction (0 = MAE)", "2: paired fraction"),
                                   (axes[2], "claim3", "text mask ratio", "3: text mask ratio")):
        pts = sorted((float(k), v) for k, v in s[key]["top1"].items() if v == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{title} (seed {s['settings']['seeds'][0]})", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[3]
    keys = [k for k in s["claim4"] if not k.endswith("id_accuracy")]
    for j, (model, color) in enumerate((("mae", "tab:gray"), ("m3ae", "tab:blue"))):
        vals = [s["claim4"][k][model] for k in keys]
        xs = np.arange(len(keys)) + (j - 0.5) * 0.38
        ax.bar(xs, [np.mean(v) if v else 0 for v in vals], 0.38, color=color, alpha=0.6, label=model.upper())
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(keys)), [k.replace("ood_", "").replace("/", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("AUROC (%)")
    ax.axhline(50, ls=":", color="r", lw=1)
    ax.set_title("4: OOD detection", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"m3ae reproduction, {s['mode']} mode", fontsize=10)
    fig.tight_layout()
    path = out / f"{s['mode']}_claims.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths = [str(path)]
    if s.get("curve"):
        paths.append(plot_curve(s, out / f"{s['mode']}_curve.png"))
    if s.get("readout_curve"):
        paths.append(plot_readouts(s, out / f"{s['mode']}_readouts.png"))
    return paths


def plot_curve(s: dict, path: Path) -> str:
    """Probe top-1 against pre-training steps, one line per run, for every pool."""
    pools = [p for p in POOLS if any(p in s["curve"].get(k, {}) for k in ("mae", "m3ae"))]
    series = {f"linear probe on the {'CLS token' if pool == 'cls' else 'mean of image tokens'}":
              {kind: s["curve"].get(kind, {}).get(pool, {}) for kind in ("mae", "m3ae")} for pool in pools}
    return _plot_series(series, s["claim1"].get("chance"), path)


def plot_readouts(s: dict, path: Path) -> str:
    """Every readout against pre-training steps (MAE vs M3AE, one line per seed)."""
    series = {label: {kind: {step: v[kind] for step, v in c.items()} for kind in ("mae", "m3ae")}
              for label, c in s["readout_curve"].items()}
    return _plot_series(series, s["claim1"].get("chance"), path, columns=2)


def _plot_series(series: dict, chance, path: Path, columns: int = 0) -> str:
    """One panel per entry of ``series`` ({title: {kind: {step: [value per seed]}}})."""
    import matplotlib.pyplot as plt

    n = len(series)
    cols = columns or n
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, by_kind) in zip(axes.flat, series.items()):
        for kind, color, label in (("mae", "tab:gray", "MAE"), ("m3ae", "tab:blue", "M3AE")):
            pts = by_kind.get(kind, {})
            steps = sorted(pts, key=int)
            if not steps:
                continue
            runs = np.array([pts[k] for k in steps], dtype=float)  # (steps, seeds)
            x = [int(k) for k in steps]
            for j in range(runs.shape[1]):
                ax.plot(x, runs[:, j], "o-", color=color, alpha=0.35, lw=1, ms=3)
            ax.plot(x, runs.mean(1), "-", color=color, lw=2.2, label=f"{label} (mean of {runs.shape[1]} seeds)")
        if chance:
            ax.axhline(chance, ls=":", color="r", lw=1, label="chance")
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("Tiny-ImageNet val top-1 (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _data_text(m: dict) -> str:
    if m.get("classes"):
        return (f"{m['classes']} of the 200 Tiny-ImageNet classes (every {ordinal(200 // m['classes'])}, relabelled), "
                f"all {200 * m['classes']:,} of their captioned train images and {50 * m['classes']:,} val images")
    n = m["train_shards"] or 8
    return f"the first {n} of 8 Tiny-ImageNet-captions train shards ({5000 * n:,} image–caption pairs)"


def _pool_table(s: dict) -> list[str]:
    pools = s.get("claim1_pools", {})
    if not pools:
        return []
    L = ["| probe on | MAE top-1 (seeds) | M3AE top-1 (seeds) | gap | larger seed std | gap / std | "
         "MAE kNN | M3AE kNN | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for pool, v in pools.items():
        L.append(f"| {pool} | {seeds_cell(v['mae_top1'], 2)} | {seeds_cell(v['m3ae_top1'], 2)} | {v['gap']:+.2f} | "
                 f"{v['max_std']:.2f} | {v['gap_over_std']:.1f} | {seeds_cell(v['mae_knn'], 2)} | "
                 f"{seeds_cell(v['m3ae_knn'], 2)} | {v['verdict']} |")
    gaps = s["claim1"].get("seed_gaps", {})
    if gaps:
        L += ["", f"Gap per seed (M3AE − MAE, same seed, `{s['claim1'].get('pool', 'cls')}` probe): "
              + ", ".join(f"seed {k}: {v:+.2f}" for k, v in sorted(gaps.items())) + " points."]
    return L


def _curve_text(s: dict, rel) -> list[str]:
    if not s.get("curve"):
        return []
    L = ["", "Probe top-1 on the checkpoints kept during pre-training (mean over seeds):", "",
         "| step | " + " | ".join(f"MAE {p} | M3AE {p}" for p in POOLS) + " |",
         "|---|" + "---|---|" * len(POOLS)]
    steps = sorted({int(k) for kind in s["curve"].values() for pool in kind.values() for k in pool})
    for step in steps:
        cells = []
        for p in POOLS:
            for kind in ("mae", "m3ae"):
                cells.append(seeds_cell([mean(s["curve"].get(kind, {}).get(p, {}).get(str(step), []))], 2))
        L.append(f"| {step} | " + " | ".join(cells) + " |")
    L += ["", f"![probe curve]({rel(Path(s['_docs']) / 'results' / (s['mode'] + '_curve.png'))})"]
    return L


def _design_text(s: dict, docs: Path) -> list[str]:
    """Why the 32-px standard mode (now standard32) was built as it was, with its pilot's numbers."""
    if s["mode"] != "standard32":
        return []
    m = s["settings"]
    L = ["## How the standard mode was designed", "",
         "The quick mode (100 steps, 200 classes) and an earlier 1,500-step calibration on all 200 classes "
         "left the M3AE − MAE gap within the seed spread. The standard mode changes four things, each "
         "chosen to make the effect visible on 2 CPU cores within 90 minutes:",
         "",
         f"- **A {m['classes']}-class subset** (every {ordinal(200 // m['classes'])} Tiny-ImageNet class, all 200 images "
         "each): the same number of steps gives twice the passes over every class, so each class word in the "
         "captions is seen twice as often, and the probe's task shrinks with it. The probe is still trained "
         "and measured on Tiny-ImageNet images (train images of those classes; val images never seen).",
         f"- **Defaults of the official code** (issue 12): caption embedding N(0, 1), text loss averaged over "
         "the batch, no gradient clipping, 64-token captions (padding trimmed per batch).",
         f"- **A short, hot schedule**: LR {m['lr']} (batch {m['batch_size']}) with {m['warmup']} warm-up steps "
         f"and cosine decay over {m['steps']} steps, fp32 (this CPU has no bf16 units; bf16 autocast measured "
         "about 10x slower here).",
         "- **Both probes reported**: the CLS token (the paper's readout, the verdict) and the mean of the "
         "image tokens.", ""]
    pilot = docs / "results" / "standard32_pilot.json"
    if pilot.is_file():
        pj = json.loads(pilot.read_text())
        t = pj["probe_top1"]
        steps = sorted(t["mae"], key=int)
        L += ["A one-seed pilot with a 1,200-step schedule (`docs/results/standard32_pilot.json`) fixed the "
              "budget and the readout: probe top-1 (%) at its checkpoints:", "",
              "| step | MAE CLS | M3AE CLS | MAE mean | M3AE mean |", "|---|---|---|---|---|"]
        for k in steps:
            L.append(f"| {k} | {t['mae'][k]['cls']:.2f} | {t['m3ae'][k]['cls']:.2f} | {t['mae'][k]['mean']:.2f} | "
                     f"{t['m3ae'][k]['mean']:.2f} |")
        L += ["", pj["conclusion"], ""]
    return L


def _caption_text(s: dict) -> list[str]:
    diag = s.get("caption_diag")
    if not diag:
        return []
    L = ["", "Did cross-modal learning happen? Masked caption words (75 % of each caption hidden) on "
         "captioned training images, predicted by each M3AE run with the image and with the image removed "
         "(same captions, same masks):", "",
         "| run | accuracy with image | without image | difference | loss with | loss without |",
         "|---|---|---|---|---|---|"]
    for name, d in sorted(diag.items()):
        w, wo = d["with_image"], d["without_image"]
        L.append(f"| {name} | {100 * w['accuracy']:.1f} % | {100 * wo['accuracy']:.1f} % | "
                 f"{100 * (w['accuracy'] - wo['accuracy']):+.1f} points | {w['loss']:.3f} | {wo['loss']:.3f} |")
    return L


def _headline(s: dict) -> list[str]:
    """One sentence per probed pool, every number from the summary."""
    c1, pools = s["claim1"], s.get("claim1_pools", {})
    if not pools:
        return []
    out = []
    for pool, v in pools.items():
        name = "CLS token (the paper's probe)" if pool == "cls" else "mean of the image tokens"
        n = min(len(v["m3ae_top1"]), len(v["mae_top1"]))
        out.append(f"- **{name}**: M3AE {seeds_cell([mean(v['m3ae_top1'])], 2)} % vs MAE {seeds_cell([mean(v['mae_top1'])], 2)} % "
                   f"top-1 ({n} seeds each, chance {seeds_cell([c1['chance']], 2)} %): gap {v['gap']:+.2f} points, "
                   f"{v['gap_over_std']:.1f}x the larger seed std ({v['max_std']:.2f}) — {v['verdict']}.")
    return ["## Result in one paragraph", ""] + out + [""] + (_readout_reading(s) if s.get("readouts") else _reading(s))


def readout_verdicts(s: dict) -> dict[str, list[str]]:
    """The readouts grouped by claim 1's verdict on them: "separates" (every M3AE seed above
    every MAE seed and a gap of at least 3x the seed std), "in direction" (every seed above,
    gap too small), "inconclusive", "opposite"."""
    groups: dict[str, list[str]] = {"separates": [], "in direction": [], "inconclusive": [], "opposite": []}
    for label, v in s.get("readouts", {}).items():
        verdict = v["verdict"]
        key = ("separates" if verdict.startswith("reproduced") else "in direction" if verdict.startswith("in direction")
               else "opposite" if verdict.startswith("not reproduced") else "inconclusive")
        groups[key].append(label)
    return groups


def readout_sentence(s: dict) -> str:
    """Claim 1's verdict over every readout in one sentence, from the summary."""
    g = readout_verdicts(s)
    n = min(len(s["claim1"]["m3ae_top1"]), len(s["claim1"]["mae_top1"]))
    parts = []
    for key, words in (("separates", "M3AE's image encoder beats MAE's beyond the seed spread"),
                       ("in direction", "every M3AE seed is above every MAE seed but the gap is under 3x the seed std"),
                       ("inconclusive", "the seed ranges overlap"), ("opposite", "MAE is ahead in every seed")):
        if g[key]:
            which = "every readout" if len(g[key]) == len(s["readouts"]) else "; ".join(g[key])
            parts.append(f"{words} on {which}")
    return f"With {n} seeds each: " + "; ".join(parts) + "."


def _readout_reading(s: dict) -> list[str]:
    L = [readout_sentence(s)]
    curve = s.get("readout_curve", {}).get("linear probe, CLS", {})
    steps = sorted(curve, key=int)
    if len(steps) > 1:
        gaps = [mean(curve[k]["m3ae"]) - mean(curve[k]["mae"]) for k in steps]
        L.append("Along training the CLS probe's gap (mean M3AE − mean MAE) went "
                 + ", ".join(f"{g:+.2f} at step {k}" for k, g in zip(steps, gaps)) + " points.")
    diag = [d for n, d in s.get("caption_diag", {}).items() if n.startswith("m3ae_s")]
    if diag:
        diffs = [100 * (d["with_image"]["accuracy"] - d["without_image"]["accuracy"]) for d in diag]
        L.append(f"The M3AE runs predict {min(diffs):.0f}–{max(diffs):.0f} points more of the hidden caption words "
                 "with the image than without it.")
    return ["**Reading.** " + " ".join(L), ""]


def _reading(s: dict) -> list[str]:
    """What the numbers say about claim 1, each statement computed from the summary."""
    pools, c1 = s.get("claim1_pools", {}), s["claim1"]
    if not pools or c1["verdict"].startswith("reproduced"):
        return []
    L = []
    cls = pools.get("cls")
    if cls and len(cls["mae_top1"]) > 1:
        spread = max(cls["mae_top1"]) - min(cls["mae_top1"])
        L.append(f"Claim 1 does not separate at this scale. The CLS probe of MAE alone spans {spread:.1f} points "
                 f"across seeds ({min(cls['mae_top1']):.2f} to {max(cls['mae_top1']):.2f} %): an MAE's CLS token "
                 "gets no loss of its own, so what it holds varies with the seed, and a one-seed gap "
                 f"(seed gaps here: {', '.join(f'{v:+.2f}' for _, v in sorted(c1.get('seed_gaps', {}).items()))}) "
                 "says little.")
    mean = pools.get("mean")
    if mean:
        L.append(f"The mean of the image tokens is stable across seeds (larger std {mean['max_std']:.2f}) and "
                 f"shows no gap ({mean['gap']:+.2f} points).")
    diag = s.get("caption_diag", {})
    main_runs = [d for n, d in diag.items() if n.startswith("m3ae_s")]
    if main_runs:
        diffs = [100 * (d["with_image"]["accuracy"] - d["without_image"]["accuracy"]) for d in main_runs]
        L.append(f"Yet cross-modal learning did happen: the M3AE runs predict {min(diffs):.0f}–{max(diffs):.0f} "
                 "points more of the hidden caption words when they see the image (table under claim 1; "
                 "text-only input is also unlike their training batches, so part of the drop may be that). "
                 "What the image tokens carry for the caption is not yet linearly readable from image-only "
                 "features after this little training.")
    if s.get("full_estimate_hours"):
        L.append(f"Scale: each run here saw {s['runs'][next(iter(s['runs']))]['samples_seen']:,} samples; the "
                 "paper's saw about 600 million (50 epochs of CC12M) with a ViT-B. The next step that could "
                 "settle the claim is the `full` mode (64 px, 6,000 steps, 3 seeds) on a GPU; at this "
                 f"machine's measured rates it would take about {s['full_estimate_hours']:.0f} hours on one core.")
    return ["**Reading.** " + " ".join(L), ""] if L else []


def page_path(docs: Path, mode_name: str) -> Path:
    """docs/results.md for the standard mode, docs/results/<mode>.md for the others."""
    return docs / "results.md" if mode_name == "standard" else docs / "results" / f"{mode_name}.md"


def _readouts_text(s: dict, rel) -> list[str]:
    """Claim 1 on every readout, and how the gap moved along training."""
    r = s.get("readouts")
    if not r:
        return []
    L = ["", "Every readout of the final encoders (top-1 %, Tiny-ImageNet val; the few-shot probe trains on "
         f"{s['settings'].get('fewshot', '–')} images per class, the same images for every model):", "",
         "| readout | MAE (seeds) | M3AE (seeds) | gap | larger seed std | gap / std | verdict |",
         "|---|---|---|---|---|---|---|"]
    for label, v in r.items():
        L.append(f"| {label} | {seeds_cell(v['mae'], 2)} | {seeds_cell(v['m3ae'], 2)} | {v['gap']:+.2f} | {v['max_std']:.2f} | "
                 f"{v['gap_over_std']:.1f} | {v['verdict']} |")
    curve = s.get("readout_curve", {})
    steps = sorted({int(k) for c in curve.values() for k in c})
    if steps:
        labels = [x for x in r if x in curve]
        L += ["", "The gap along training (mean M3AE − mean MAE, points; every kept checkpoint):", "",
              "| step | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for step in steps:
            cells = []
            for label in labels:
                v = curve[label].get(str(step))
                cells.append(f"{mean(v['m3ae']) - mean(v['mae']):+.2f}" if v and v["m3ae"] and v["mae"] else "–")
            L.append(f"| {step} | " + " | ".join(cells) + " |")
        L += ["", f"![readouts along training]({rel(Path(s['_docs']) / 'results' / (s['mode'] + '_readouts.png'))})"]
    return L


def _plan_section(s: dict) -> list[str]:
    p = s.get("plan")
    if not p or "measured" not in p:
        return []
    m = p["measured"]
    return ["## How the step count was chosen", "",
            f"Measured on this machine before training (`plan.json`; {m['timed_steps']} timed steps of each model "
            "kind, one checkpoint's evaluation): pre-training "
            + ", ".join(f"{k.upper()} {v:.0f} samples/s" for k, v in m["samples_per_s"].items())
            + f" per process; one checkpoint's probes {m['probe_checkpoint_s']:.0f} s, OOD {m['ood_s']:.0f} s, "
            f"caption check {m['caption_diag_s']:.0f} s. With {p['processes']} process(es) and a budget of "
            f"{p['budget_s'] / 60:.0f} min, the largest step count that fits every run is **{p['steps']}** "
            f"(estimated wall {p['estimated_wall_s'] / 60:.1f} min)"
            + (f"; left out to fit: {', '.join(p['dropped'])}" if p["dropped"] else "")
            + ("" if p["fits"] else "; even the smallest budget did not fit, so the run took longer") + "."
            + (f" Afterwards {', '.join(p['extended']['runs'])} were run as well: {p['extended']['why']}."
               if p.get("extended") else ""), ""]


def write_markdown(s: dict, docs: Path, pictures: list[str]) -> Path:
    m = s["settings"]
    c1, c2, c3, c4 = s["claim1"], s["claim2"], s["claim3"], s["claim4"]
    small = [k for k in c2["top1"] if 0 < float(k) < 1]  # the paired fractions below 100 %
    path = page_path(docs, s["mode"])
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    s = dict(s, _docs=str(docs))
    seeds = ", ".join(str(x) for x in m["seeds"])
    arch = PRESETS[m["preset"]]
    L = []
    L += ["# Reproducing the M3AE paper's claims at small scale", "",
          "Generated by `experiments/reproduce.py --report` from the JSON results "
          f"(`docs/results/{s['mode']}.json`); do not edit by hand.", "",
          f"**Mode: `{s['mode']}`.** Numbers are Tiny-ImageNet / CIFAR-10 measurements of a "
          f"{m['preset']}-preset model after {m['steps']} steps; the paper's are ViT-B/16 after "
          "50 epochs on CC12M, so only the *direction* of each claim is comparable. "
          "Values with several seeds are shown as mean (seed values).", ""] + _headline(s) + _design_text(s, docs) + \
        _plan_section(s) + [
          "## Verdicts", "",
          "| claim | paper | here | verdict |", "|---|---|---|---|",
          f"| 1. M3AE transfers better than MAE (linear probe top-1) | 61.3 vs 44.6 | "
          f"{seeds_cell(c1['m3ae_top1'])} vs {seeds_cell(c1['mae_top1'])} | {c1['verdict']} |",
          f"| 2. a small paired fraction helps ({', '.join(f'{float(k):.0%}' for k in small)} vs MAE) | "
          f"{', '.join(str(PAPER['claim2'][float(k)]) for k in small)} vs 44.6 | "
          f"{', '.join(seeds_cell([c2['top1'][k]]) for k in small)} vs {seeds_cell([c2['top1']['0.0']])} | {c2['verdict']} |",
          f"| 3. high text mask ratio (50–90 %) beats 15 % | 75 % best | best {c3['best_ratio']:.0%}; "
          f"15 %: {seeds_cell([c3['top1']['0.15']])}, mean of ≥50 %: "
          f"{seeds_cell([np.mean([v for k, v in c3['top1'].items() if float(k) >= 0.5])])} | {c3['verdict']} |"]
    for metric, paper in (("mahalanobis", PAPER["claim4"]["mahalanobis"]), ("msp", PAPER["claim4"]["msp"])):
        for setting, what in (("ood_near", "near OOD, CIFAR-10 0–4 vs 5–9"), ("ood_far", "Tiny-ImageNet vs CIFAR-10")):
            v = c4[f"{setting}/{metric}"]
            L.append(f"| 4. M3AE detects OOD better ({metric}, {what}) | {paper['m3ae']} vs {paper['mae']} "
                     f"(CIFAR-100 vs CIFAR-10) | {seeds_cell(v['m3ae'])} vs {seeds_cell(v['mae'])} | {v['verdict']} |")
    L += ["", "How a verdict is decided (in `experiments/reproduce.py`): for claim 1, *reproduced* needs every "
          "M3AE seed above every MAE seed and a mean gap of at least 3x the larger seed standard deviation; "
          "for the others, with several seeds, *reproduced in "
          "direction* when every seed of the claimed-better model beats every seed of the other, "
          "*not reproduced* when every one is below, otherwise *inconclusive*. The ablations "
          "(claims 2, 3) have one seed; their difference counts only when it exceeds the seed-to-seed "
          f"spread of the main comparison ({seeds_cell([s['seed_spread_top1']], 2)} top-1 points).", ""]
    L += ["## Setup", "",
          f"- Pre-training data: {_data_text(m)}, images resized to "
          f"{m['model']['image_size']} px, patch {m['model']['patch_size']}, caption length {m['text_len']} tokens.",
          f"- Model: preset `{m['preset']}` (ViT encoder {arch['emb_dim']} wide, {arch['depth']} blocks; decoder "
          f"{arch['dec_emb_dim']} wide, {arch['dec_depth']} blocks), "
          f"image mask ratio 0.75, text mask ratio 0.75 unless varied; {m['steps']} steps of batch "
          f"{m['batch_size']}, AdamW, LR {m['lr']} with {m['warmup']} warm-up steps; seeds {seeds}.",
          f"- Tokenizer: WordPiece (vocabulary ≤ {m['vocab']}) trained once on the pre-training captions, "
          "shared by all runs.",
          "- **MAE baseline** = the same config and seed with `data.paired_fraction=0`: every caption is "
          "dropped, batches are image-only, the loss is the pixel loss alone. Same encoder, image mask "
          "ratio, number of steps, data order and augmentation "
          + ("(the image cache is read in the order drawn from (seed, epoch); crops and flips come from "
             "(seed, epoch, position))" if m.get("cache") else
             "(the shards are read in order; the crops and flips come from per-sample seeds)")
          + ", and the same image masks: the trainer draws image and "
          "text masking noise from separate streams seeded by (seed, step).",
          f"- Linear probe: BatchNorm (no affine) + linear layer on frozen CLS features, trained "
          f"{m['probe_epochs']} epochs on the labels of {m['probe_train']:,} Tiny-ImageNet train images, "
          f"evaluated on {m['val']:,} val images ({m.get('classes') or 200} classes; chance {seeds_cell([c1['chance']], 2)} %). kNN (k=20) beside it.",
          f"- OOD: Mahalanobis (class means + shared covariance, fitted on the probe's training "
          "features) and max-softmax of the probe. *Far*: Tiny-ImageNet val (in) vs "
          f"{m['cifar_test']:,} CIFAR-10 test images (out). *Near*: probe and Mahalanobis fitted on "
          f"CIFAR-10 train classes 0–4 (of the first {m['cifar_train']:,}), in = test classes 0–4, "
          "out = test classes 5–9. The paper's near-OOD case is CIFAR-100 vs CIFAR-10, which needs data "
          "we do not have.", "",
          "## Claim 1: linear probe, M3AE vs MAE", "",
          "| model | paper (ImageNet, ViT-B, CC12M) | top-1 here | top-5 here | kNN top-1 here |",
          "|---|---|---|---|---|",
          f"| MAE | {PAPER['claim1']['mae']} | {seeds_cell(c1['mae_top1'])} | {seeds_cell(c1['mae_top5'])} | {seeds_cell(c1['mae_knn'])} |",
          f"| M3AE | {PAPER['claim1']['m3ae']} | {seeds_cell(c1['m3ae_top1'])} | {seeds_cell(c1['m3ae_top5'])} | {seeds_cell(c1['m3ae_knn'])} |",
          "", f"Rows above: the `{c1.get('pool', 'cls')}` probe. Every pool, with the bar the verdict applies "
          "(every M3AE seed above every MAE seed, and a mean gap of at least 3x the larger seed standard "
          "deviation):", ""] + _pool_table(s) + _readouts_text(s, rel) + _curve_text(s, rel) + _caption_text(s) + [
          "", "## Claim 2: fraction of paired captions", "",
          "| paired fraction | paper top-1 | top-1 here |", "|---|---|---|"]
    for k, v in c2["top1"].items():
        paper = PAPER["claim2"].get(float(k), PAPER["claim1"]["mae"] if float(k) == 0 else None)
        L.append(f"| {float(k):.0%}{' (MAE)' if float(k) == 0 else ''} | {paper if paper else '–'} | {seeds_cell([v])} |")
    L += ["", "## Claim 3: text mask ratio", "", "| text mask ratio | top-1 here |", "|---|---|"]
    for k, v in c3["top1"].items():
        L.append(f"| {float(k):.0%} | {seeds_cell([v])} |")
    L += ["", f"Paper: {PAPER['claim3']}.", "", "## Claim 4: OOD detection (AUROC %)", "",
          "| setting | score | paper MAE | paper M3AE | MAE here | M3AE here |", "|---|---|---|---|---|---|"]
    for setting, what in (("ood_near", "near: CIFAR-10 0–4 vs 5–9"), ("ood_far", "far: Tiny-ImageNet vs CIFAR-10")):
        for metric in ("mahalanobis", "msp"):
            v = c4[f"{setting}/{metric}"]
            p = PAPER["claim4"][metric]
            L.append(f"| {what} | {metric} | {p['mae']} | {p['m3ae']} | {seeds_cell(v['mae'])} | {seeds_cell(v['m3ae'])} |")
        acc = c4[f"{setting}/id_accuracy"]
        L.append(f"| {what} | (probe accuracy on in-dist. test) | | | {seeds_cell(acc['mae'])} | {seeds_cell(acc['m3ae'])} |")
    L += ["", "## Plots and pictures", "", f"![claims]({rel(pictures[0])})", ""]
    for p in pictures[1:]:
        if p.endswith(("_curve.png", "_readouts.png")):
            continue
        L.append(f"![{Path(p).stem}]({rel(p)})")
    t = s["timing"]
    L += ["", "## Runs and wall times", "",
          f"Devices: {', '.join(t['devices'])}. Times on a CPU shared with other jobs depend on their load; "
          "take them as rough.", "",
          "| run | steps | samples | final loss | image loss | text loss | pre-train s | eval s | device |",
          "|---|---|---|---|---|---|---|---|---|"]
    for n, r in s["runs"].items():
        f = r["final"]
        L.append(f"| {n} | {r['steps']} | {r['samples_seen']:,} | {f['loss']:.3f} | {f['image_loss']:.3f} | "
                 f"{f['text_loss']:.3f} | {r['pretrain_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['device']} |")
    L += ["", f"Wall clock from the first run's start to the last run's end: {t['wall_seconds'] / 60:.1f} min, "
          f"with up to {t['max_parallel_runs']} runs at a time (tokenizer training not included). "
          f"Summed over runs: pre-training {t['pretrain_seconds'] / 60:.1f} min "
          f"({t['pretrain_samples_per_s']:.0f} samples/s), evaluation {t['eval_seconds'] / 60:.1f} min "
          f"({t['eval_images_per_s']:.0f} images/s), per process. At these rates one process would need about "
          f"{s['full_estimate_hours']:.0f} hours on the same CPUs for the full mode "
          f"({len(run_specs(MODES['full']))} runs × {MODES['full']['steps']} steps × batch "
          f"{MODES['full']['batch_size']}, full evaluation sets); that is an estimate, not a measurement, "
          "and the GPU command below is the practical way to run it.", "",
          "## Commands", "", "```bash",
          *([f"python experiments/reproduce.py --mode {s['mode']} --processes 2 --threads 1 &   # twice, to use 2 cores",
             f"python experiments/reproduce.py --mode {s['mode']} --processes 2 --threads 1     # what produced this page"]
            if s.get("plan") else
            [f"python experiments/reproduce.py --mode {s['mode']} --threads 1   # what produced this page"]),
          f"python experiments/reproduce.py --mode {s['mode']} --report      # tables and plots again, from the JSON",
          "python experiments/reproduce.py --mode full --device cuda   # when a GPU is available",
          "```", "",
          "Re-running a command skips finished runs (their `result.json` exists) and resumes an "
          "interrupted pre-training from its newest checkpoint. Run folders live under "
          "`runs/reproduce/<mode>/` (ignored by git).", "",
          "## Caveats", "",
          "- The quick mode trains a tiny encoder for a few minutes on a CPU; its features are far from "
          "converged, so differences of a point or two are within noise. Read the verdicts with the seed "
          "spread next to them.",
          "- Tiny-ImageNet captions are generated from the labels (a class synonym, definition or "
          "parent concept), so they are more informative than web alt-text: a best case for M3AE.",
          "- The probe's training images are also pre-training images (as in the paper, where the "
          "probe trains on ImageNet train); val images were never seen.",
          "- Far OOD mixes in a resolution cue in 64 px modes (CIFAR-10 is 32 px, upsampled); at "
          "32 px both datasets are at their native or reduced size.",
          "- An AUROC below 50 % means the score ranks the OOD set as *more* in-distribution than the "
          "in-distribution test set; an untrained-looking encoder can do that (e.g. smooth, low-contrast "
          "images lying close to the class means), so it says the features are not yet semantic.",
          "- Resuming: every checkpoint holds the data position (for shard streams too), so an "
          "interrupted and resumed run continues the same data order as its partner.",
          "- The text mask ratio ablation with one seed cannot separate ratios whose effect is smaller "
          "than the seed spread.", ""]
    L += _other_pages(docs, s["mode"], rel)
    atomic_write(path, "\n".join(L))
    return path


def _other_pages(docs: Path, mode_name: str, rel) -> list[str]:
    """Links between the generated pages (the standard mode's and the others')."""
    pages = [p for p in sorted((docs / "results").glob("*.md")) if p.stem in MODES and p.stem != mode_name]
    if mode_name != "standard" and (docs / "results.md").is_file():
        pages.insert(0, docs / "results.md")
    if not pages:
        return []
    return ["## Other modes", ""] + [f"- [{'standard' if p.name == 'results.md' else p.stem}]({rel(p)})"
                                      for p in pages] + [""]


def report(out: Path, docs: Path, mode_name: str, mode: dict | None = None) -> Path:
    """Summary JSON, plots and docs/results.md (the standard mode; other modes
    docs/results/<mode>.md) from the runs' result.json files (or, when the run folders are
    gone, from the summary saved by an earlier report)."""
    mode = mode or MODES[mode_name]
    plan_file = out / "plan.json"
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
    summary_path = docs / "results" / f"{mode_name}.json"
    pictures = []
    if plan_file.is_file():
        p = json.loads(plan_file.read_text())
        mode = dict(mode, steps=p["steps"], warmup=p["warmup"])
    if results and mode["steps"] == "plan":  # no plan.json beside them: the runs say
        r0 = next(iter(results.values()))
        mode = dict(mode, steps=r0["steps"], warmup=r0.get("config", {}).get("train", {}).get("warmup_steps"))
    if results:
        s = summarize(results, mode_name, mode)
        if plan_file.is_file():
            s["plan"] = p
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(summary_path, s)
        for name, r in sorted(results.items()):
            for p in r.get("pictures", []):
                if Path(p).is_file():
                    dst = docs / "results" / f"{mode_name}_{name}_{Path(p).name}"
                    shutil.copyfile(p, dst)
    elif summary_path.is_file():
        s = json.loads(summary_path.read_text())
    else:
        raise FileNotFoundError(f"no results in {out} and no {summary_path}; run the experiment first")
    pictures = make_plots(s, docs) + sorted(str(p) for p in (docs / "results").glob(f"{mode_name}_*_*.png"))
    return write_markdown(s, docs, pictures)


# --------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--smoke", action="store_true",
                   help="the mode's code path at smoke size (seconds on a CPU; the numbers mean nothing)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="planned modes: wall-clock seconds every run and its evaluation must fit in")
    p.add_argument("--processes", type=int, default=1,
                   help="planned modes: how many processes (started alike) share out the runs")
    p.add_argument("--data", default=os.environ.get("M3AE_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
                   help="folder holding tiny-imagenet-captions/ and cifar10/ (default ../shared/data)")
    p.add_argument("--out", default=None, help="run folders (default runs/reproduce/<mode>)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md and results/ go")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; 1 is much faster on a machine other jobs share")
    p.add_argument("--runs", nargs="*", default=None, help="only these run names (default: all of the mode)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the JSON results")
    p.add_argument("--no-report", action="store_true", help="run, but do not write docs/")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode, name = MODES[args.mode], args.mode
    if args.smoke:
        mode, name = smoke_of(mode), f"{args.mode}-smoke"
    out = Path(args.out or ROOT / "runs" / "reproduce" / name)
    docs = Path(args.docs)
    if not args.report:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        data = Path(args.data)
        out.mkdir(parents=True, exist_ok=True)
        if mode.get("classes"):
            data = class_subset(data, out, mode["classes"])
        mode, tokenizer, specs = prepare(mode, data, out, device, args)
        specs = [s for s in specs if args.runs is None or s.name in args.runs]
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            r = do_run(spec, mode, data, out, tokenizer, device, progress=not args.no_progress)
            if r is None:
                print(f"[{i + 1}/{len(specs)}] {spec.name}: another process is running it; skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(specs)}] {spec.name}: probe top-1 {100 * r['probe']['top1']:.2f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_report:
        path = report(out, docs, name, mode)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
