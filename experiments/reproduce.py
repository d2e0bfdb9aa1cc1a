#!/usr/bin/env python
"""Reproduce the M3AE paper's four claims at small scale, with one command.

    python experiments/reproduce.py --mode quick            # ~35 min on 2 busy CPU cores
    python experiments/reproduce.py --mode full --device cuda
    python experiments/reproduce.py --mode quick --report   # tables and plots from the JSON only

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
into ``docs/results.md``, ``docs/results/<mode>.json`` and the PNG plots; no number in the
report is typed by hand.
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
    # 64 px with 8 px patches (the same 8x8 token grid), all 40k pairs, ~20 epochs, full eval sets.
    "full": dict(preset="tiny", model=dict(image_size=64, patch_size=8), text_len=32, vocab=8192,
                 caption_limit=None, train_shards=8, steps=6000, batch_size=128, lr=1.5e-3, warmup=300,
                 probe_train=40000, val=10000, cifar_test=10000, cifar_train=25000, probe_epochs=90,
                 seeds=(0, 1, 2), ablations=True, pictures=True, attention_rows=4),
}

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
        for p in PAIRED_FRACTIONS:
            specs.append(RunSpec(f"m3ae_paired{p}_s{seed}", seed, [f"data.paired_fraction={p}"],
                                 paired_fraction=p))
        for r in TEXT_MASK_RATIOS:
            specs.append(RunSpec(f"m3ae_textmask{r}_s{seed}", seed, [f"model.text_mask_ratio={r}"],
                                 text_mask_ratio=r))
    return specs


# ------------------------------------------------------------------------------ helpers
def shards(data: Path, name: str, split: str, n: int | None = None) -> str:
    files = sorted((data / name).glob(f"{split}-*.tar.gz"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {data / name}; pass --data (the shared data folder)")
    return "::".join(str(f) for f in files[:n])


def train_tokenizer(out: Path, data: Path, mode: dict) -> Path:
    """One WordPiece vocabulary from the pre-training captions, shared by every run (so all
    M3AE runs see the same token ids); trained once, since retraining can reorder ids."""
    from m3ae.tokenizer import train_wordpiece

    path = out / "tokenizer.json"
    if path.is_file():
        return path
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
    tok = train_wordpiece(captions, vocab_size=mode["vocab"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    try:
        os.link(tmp, path)  # never replaces: a second process started alongside keeps the first file
    except FileExistsError:
        pass
    tmp.unlink()
    return path


def build_run_config(spec: RunSpec, mode: dict, data: Path, tokenizer: Path, device: str):
    from m3ae.config import build_config
    from m3ae.tokenizer import load_tokenizer

    m, steps = mode, mode["steps"]
    overrides = [f"model.{k}={v}" for k, v in m["model"].items()] + [
        f"model.vocab_size={load_tokenizer(tokenizer).get_vocab_size()}",
        "data.source=webdataset", f"data.urls={shards(data, TIN, 'train', m['train_shards'])}",
        f"data.tokenizer={tokenizer}", f"data.text_len={m['text_len']}",
        # The webdataset reader's shuffle buffer draws from an unseeded RNG; reading the shards
        # in order (they were shuffled when built) gives every run the same data order.
        "data.shuffle_buffer=0",
        f"train.steps={steps}", f"train.batch_size={m['batch_size']}", f"train.lr={m['lr']}",
        f"train.warmup_steps={m['warmup']}", f"train.seed={spec.seed}", f"train.device={device}",
        f"train.log_every={max(1, min(10, steps // 10))}", "train.recon_every=0",
        f"train.ckpt_every={max(1, steps // 4)}", "train.keep_last=1",
    ] + spec.overrides
    return build_config(m["preset"], None, overrides)


def _subset(f, keep: np.ndarray):
    from m3ae.evaluation import Features

    return Features(f.features[keep], f.labels[keep], [k for k, ok in zip(f.keys, keep) if ok], f.class_names)


# ---------------------------------------------------------------------------- one run
def evaluate_run(spec: RunSpec, mode: dict, data: Path, run_dir: Path, device: str, progress: bool) -> dict:
    """Linear probe (+ kNN) on Tiny-ImageNet val; for the main runs also OOD AUROCs."""
    from m3ae.evaluation import cached_features, linear_probe, load_labelled, load_model, ood_scores

    model_dir = run_dir / "final"
    model, text_encoder = load_model(model_dir, device)
    size = model.config.image_size
    cache = run_dir / "features"

    def feats(name: str, spec_: str, limit: int):
        return cached_features(model_dir, load_labelled(spec_, size, limit=limit), model=model,
                               cache_dir=cache, progress=progress, device=device, desc=name)

    tin_train = feats("tin-train", shards(data, TIN, "train"), mode["probe_train"])
    tin_val = feats("tin-val", shards(data, TIN, "val"), mode["val"])
    probe = linear_probe(tin_train, tin_val, epochs=mode["probe_epochs"], seed=spec.seed)
    out = {"probe": probe.as_dict()}
    n_images = len(tin_train) + len(tin_val)
    if spec.ood:
        c_test = feats("cifar-test", shards(data, "cifar10", "test"), mode["cifar_test"])
        far = ood_scores(tin_train, tin_val, c_test, probe=probe.probe)
        c_train = feats("cifar-train", shards(data, "cifar10", "train"), mode["cifar_train"])
        near = ood_scores(_subset(c_train, c_train.labels < 5), _subset(c_test, c_test.labels < 5),
                          _subset(c_test, c_test.labels >= 5), probe_epochs=mode["probe_epochs"], seed=spec.seed)
        out["ood_far"] = {"metrics": far.metrics, "id_accuracy": far.id_accuracy,
                          "n_id": len(tin_val), "n_ood": len(c_test)}
        out["ood_near"] = {"metrics": near.metrics, "id_accuracy": near.id_accuracy,
                           "n_id": int((c_test.labels < 5).sum()), "n_ood": int((c_test.labels >= 5).sum())}
        n_images += len(c_test) + len(c_train)
    out["eval_images"] = n_images
    return out


def save_pictures(spec: RunSpec, mode: dict, data: Path, run_dir: Path, device: str) -> list[str]:
    """Reconstructions of validation images (no captions there) and, for M3AE, of captioned
    training images plus cross-modal attention."""
    import torch

    from m3ae.evaluation import load_labelled, load_model, make_loader
    from m3ae.visualize import save_reconstruction_grid

    model, text_encoder = load_model(run_dir / "final", device)
    size = model.config.image_size
    pics = run_dir / "pictures"
    made = []
    g = torch.Generator(device=device).manual_seed(1234)  # the same masks for every model
    val = next(iter(make_loader(load_labelled(shards(data, TIN, "val"), size, limit=6), None, 6)))
    made.append(str(save_reconstruction_grid(model, val, pics / "recon_val.png", text_encoder, generator=g)))
    if spec.kind == "m3ae" and text_encoder is not None:
        from m3ae.evaluation.attention import save_attention_figure

        train = load_labelled(shards(data, TIN, "train", 1), size, limit=6)
        batch = next(iter(make_loader(train, text_encoder, 6)))
        g = torch.Generator(device=device).manual_seed(1234)
        made.append(str(save_reconstruction_grid(model, batch, pics / "recon_train_captions.png", text_encoder,
                                                 generator=g)))
        made.append(str(save_attention_figure(model, text_encoder, batch, pics / "attention.png",
                                             n=mode["attention_rows"])))
    return made


def _take(run_dir: Path) -> bool:
    """Mark ``run_dir`` as being worked on by this process; False when another live process
    on this machine has it. So the same command started twice shares out the runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "running.pid"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)  # raises when no such process: the lock is stale
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return _take(run_dir)
        except PermissionError:  # alive, someone else's
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def do_run(spec: RunSpec, mode: dict, data: Path, out: Path, tokenizer: Path, device: str,
           progress: bool) -> dict | None:
    """Pre-train and evaluate one run, or read its result; None when another process has it."""
    run_dir = out / spec.name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
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
    cfg = build_run_config(spec, mode, data, tokenizer, device)
    started = time.time()
    t0 = time.perf_counter()
    # Re-running after an interruption continues from the newest checkpoint.
    res = pretrain(cfg, run_dir, resume="latest", progress=progress)
    t_pre = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    t0 = time.perf_counter()
    ev = evaluate_run(spec, mode, data, run_dir, device, progress)
    t_eval = time.perf_counter() - t0
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
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, result_path)  # a result file is complete or absent
    return result


# ------------------------------------------------------------------------------ report
def _mean(xs):
    return float(np.mean(xs)) if xs else float("nan")


def compare(a: list[float], b: list[float]) -> str:
    """Verdict for "a beats b" across seeds: every a above every b -> reproduced; every a
    below every b -> not reproduced; overlapping ranges -> inconclusive."""
    if not a or not b:
        return "not run"
    if min(a) > max(b):
        return "reproduced in direction"
    if max(a) < min(b):
        return "not reproduced (opposite direction)"
    return "inconclusive (seed ranges overlap)"


def compare_noise(diff: float, noise: float) -> str:
    """Verdict for a single-seed difference, against the seed-to-seed spread as noise."""
    if diff != diff:
        return "not run"
    if diff > noise:
        return "reproduced in direction"
    if diff < -noise:
        return "not reproduced (opposite direction)"
    return "inconclusive (difference within seed spread)"


def summarize(results: dict[str, dict], mode_name: str, mode: dict) -> dict:
    """The numbers the report shows, from the per-run results."""
    def by(kind=None, pf=None, tm=None, seed=None):
        return [r for r in results.values() if (kind is None or r["kind"] == kind)
                and (pf is None or abs(r["paired_fraction"] - pf) < 1e-9)
                and (tm is None or abs(r["text_mask_ratio"] - tm) < 1e-9)
                and (seed is None or r["seed"] == seed)]

    def top1(rs):
        return [100 * r["probe"]["top1"] for r in rs]

    mae, m3ae = by("mae"), by("m3ae", pf=1.0, tm=0.75)
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
        "verdict": compare(m3ae_acc, mae_acc)}
    curve2 = {0.0: _mean(top1(by("mae", seed=s0)))}
    for p in PAIRED_FRACTIONS + (1.0,):
        curve2[p] = _mean(top1(by("m3ae", pf=p, tm=0.75, seed=s0)))
    noise = 0.0 if spread != spread else spread
    small = [curve2[p] - curve2[0.0] for p in PAIRED_FRACTIONS]
    if any(d != d for d in small):
        verdict2 = "not run"
    elif min(small) > 0 or max(small) < 0:  # both fractions on the same side of MAE
        verdict2 = compare_noise(min(small) if min(small) > 0 else max(small), noise)
    else:
        verdict2 = "inconclusive (10 % and 30 % fall on different sides of MAE)"
    s["claim2"] = {"top1": {str(k): v for k, v in curve2.items()}, "verdict": verdict2}
    curve3 = {r: _mean(top1(by("m3ae", pf=1.0, tm=r, seed=s0))) for r in sorted(TEXT_MASK_RATIOS + (0.75,))}
    high = [curve3[r] for r in curve3 if r >= 0.5 and curve3[r] == curve3[r]]
    best = max(curve3, key=lambda r: -1e9 if curve3[r] != curve3[r] else curve3[r])
    s["claim3"] = {"top1": {str(k): v for k, v in curve3.items()}, "best_ratio": best,
                   "verdict": compare_noise(_mean(high) - curve3[0.15], noise)}
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


def _fmt(xs, digits=1) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} (" + ", ".join(f"{x:.{digits}f}" for x in xs) + ")"


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
    return [str(path)]


def write_markdown(s: dict, docs: Path, pictures: list[str]) -> Path:
    m = s["settings"]
    c1, c2, c3, c4 = s["claim1"], s["claim2"], s["claim3"], s["claim4"]
    rel = lambda p: os.path.relpath(p, docs)  # noqa: E731
    seeds = ", ".join(str(x) for x in m["seeds"])
    arch = PRESETS[m["preset"]]
    L = []
    L += ["# Reproducing the M3AE paper's claims at small scale", "",
          "Generated by `experiments/reproduce.py --report` from the JSON results "
          f"(`docs/results/{s['mode']}.json`); do not edit by hand.", "",
          f"**Mode: `{s['mode']}`.** Numbers are Tiny-ImageNet / CIFAR-10 measurements of a "
          f"{m['preset']}-preset model after {m['steps']} steps; the paper's are ViT-B/16 after "
          "50 epochs on CC12M, so only the *direction* of each claim is comparable. "
          "Values with several seeds are shown as mean (seed values).", "",
          "## Verdicts", "",
          "| claim | paper | here | verdict |", "|---|---|---|---|",
          f"| 1. M3AE transfers better than MAE (linear probe top-1) | 61.3 vs 44.6 | "
          f"{_fmt(c1['m3ae_top1'])} vs {_fmt(c1['mae_top1'])} | {c1['verdict']} |",
          f"| 2. a small paired fraction helps (10 %, 30 % vs MAE) | 53.3, 54.5 vs 44.6 | "
          f"{_fmt([c2['top1']['0.1']])}, {_fmt([c2['top1']['0.3']])} vs {_fmt([c2['top1']['0.0']])} | {c2['verdict']} |",
          f"| 3. high text mask ratio (50–90 %) beats 15 % | 75 % best | best {c3['best_ratio']:.0%}; "
          f"15 %: {_fmt([c3['top1']['0.15']])}, mean of ≥50 %: "
          f"{_fmt([np.mean([v for k, v in c3['top1'].items() if float(k) >= 0.5])])} | {c3['verdict']} |"]
    for metric, paper in (("mahalanobis", PAPER["claim4"]["mahalanobis"]), ("msp", PAPER["claim4"]["msp"])):
        for setting, what in (("ood_near", "near OOD, CIFAR-10 0–4 vs 5–9"), ("ood_far", "Tiny-ImageNet vs CIFAR-10")):
            v = c4[f"{setting}/{metric}"]
            L.append(f"| 4. M3AE detects OOD better ({metric}, {what}) | {paper['m3ae']} vs {paper['mae']} "
                     f"(CIFAR-100 vs CIFAR-10) | {_fmt(v['m3ae'])} vs {_fmt(v['mae'])} | {v['verdict']} |")
    L += ["", "How a verdict is decided (in `experiments/reproduce.py`): with several seeds, *reproduced in "
          "direction* when every seed of the claimed-better model beats every seed of the other, "
          "*not reproduced* when every one is below, otherwise *inconclusive*. The ablations "
          "(claims 2, 3) have one seed; their difference counts only when it exceeds the seed-to-seed "
          f"spread of the main comparison ({_fmt([s['seed_spread_top1']], 2)} top-1 points).", ""]
    L += ["## Setup", "",
          f"- Pre-training data: the first {m['train_shards']} of 8 Tiny-ImageNet-captions train shards "
          f"({5000 * m['train_shards']:,} image–caption pairs), images resized to "
          f"{m['model']['image_size']} px, patch {m['model']['patch_size']}, caption length {m['text_len']} tokens.",
          f"- Model: preset `{m['preset']}` (ViT encoder {arch['emb_dim']} wide, {arch['depth']} blocks; decoder "
          f"{arch['dec_emb_dim']} wide, {arch['dec_depth']} blocks), "
          f"image mask ratio 0.75, text mask ratio 0.75 unless varied; {m['steps']} steps of batch "
          f"{m['batch_size']}, AdamW, LR {m['lr']} with {m['warmup']} warm-up steps; seeds {seeds}.",
          f"- Tokenizer: WordPiece (vocabulary ≤ {m['vocab']}) trained once on the pre-training captions, "
          "shared by all runs.",
          "- **MAE baseline** = the same config and seed with `data.paired_fraction=0`: every caption is "
          "dropped, batches are image-only, the loss is the pixel loss alone. Same encoder, image mask "
          "ratio, number of steps, data order and augmentation (the shards are read in order; the crops "
          "and flips come from per-sample seeds), and the same image masks: the trainer draws image and "
          "text masking noise from separate streams seeded by (seed, step).",
          f"- Linear probe: BatchNorm (no affine) + linear layer on frozen CLS features, trained "
          f"{m['probe_epochs']} epochs on the labels of {m['probe_train']:,} Tiny-ImageNet train images, "
          f"evaluated on {m['val']:,} val images (200 classes; chance {_fmt([c1['chance']], 2)} %). kNN (k=20) beside it.",
          f"- OOD: Mahalanobis (class means + shared covariance, fitted on the probe's training "
          "features) and max-softmax of the probe. *Far*: Tiny-ImageNet val (in) vs "
          f"{m['cifar_test']:,} CIFAR-10 test images (out). *Near*: probe and Mahalanobis fitted on "
          f"CIFAR-10 train classes 0–4 (of the first {m['cifar_train']:,}), in = test classes 0–4, "
          "out = test classes 5–9. The paper's near-OOD case is CIFAR-100 vs CIFAR-10, which needs data "
          "we do not have.", "",
          "## Claim 1: linear probe, M3AE vs MAE", "",
          "| model | paper (ImageNet, ViT-B, CC12M) | top-1 here | top-5 here | kNN top-1 here |",
          "|---|---|---|---|---|",
          f"| MAE | {PAPER['claim1']['mae']} | {_fmt(c1['mae_top1'])} | {_fmt(c1['mae_top5'])} | {_fmt(c1['mae_knn'])} |",
          f"| M3AE | {PAPER['claim1']['m3ae']} | {_fmt(c1['m3ae_top1'])} | {_fmt(c1['m3ae_top5'])} | {_fmt(c1['m3ae_knn'])} |",
          "", "## Claim 2: fraction of paired captions", "",
          "| paired fraction | paper top-1 | top-1 here |", "|---|---|---|"]
    for k, v in c2["top1"].items():
        paper = PAPER["claim2"].get(float(k), PAPER["claim1"]["mae"] if float(k) == 0 else None)
        L.append(f"| {float(k):.0%}{' (MAE)' if float(k) == 0 else ''} | {paper if paper else '–'} | {_fmt([v])} |")
    L += ["", "## Claim 3: text mask ratio", "", "| text mask ratio | top-1 here |", "|---|---|"]
    for k, v in c3["top1"].items():
        L.append(f"| {float(k):.0%} | {_fmt([v])} |")
    L += ["", f"Paper: {PAPER['claim3']}.", "", "## Claim 4: OOD detection (AUROC %)", "",
          "| setting | score | paper MAE | paper M3AE | MAE here | M3AE here |", "|---|---|---|---|---|---|"]
    for setting, what in (("ood_near", "near: CIFAR-10 0–4 vs 5–9"), ("ood_far", "far: Tiny-ImageNet vs CIFAR-10")):
        for metric in ("mahalanobis", "msp"):
            v = c4[f"{setting}/{metric}"]
            p = PAPER["claim4"][metric]
            L.append(f"| {what} | {metric} | {p['mae']} | {p['m3ae']} | {_fmt(v['mae'])} | {_fmt(v['m3ae'])} |")
        acc = c4[f"{setting}/id_accuracy"]
        L.append(f"| {what} | (probe accuracy on in-dist. test) | | | {_fmt(acc['mae'])} | {_fmt(acc['m3ae'])} |")
    L += ["", "## Plots and pictures", "", f"![claims]({rel(pictures[0])})", ""]
    for p in pictures[1:]:
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
          f"python experiments/reproduce.py --mode {s['mode']} --threads 1   # what produced this page",
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
    path = docs / "results.md"
    path.write_text("\n".join(L))
    return path


def report(out: Path, docs: Path, mode_name: str) -> Path:
    """Summary JSON, plots and docs/results.md from the runs' result.json files (or, when the
    run folders are gone, from the summary saved by an earlier report)."""
    mode = MODES[mode_name]
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
    summary_path = docs / "results" / f"{mode_name}.json"
    pictures = []
    if results:
        s = summarize(results, mode_name, mode)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(s, indent=2))
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
    mode = MODES[args.mode]
    out = Path(args.out or ROOT / "runs" / "reproduce" / args.mode)
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
        tokenizer = train_tokenizer(out, data, mode)
        specs = [s for s in run_specs(mode) if args.runs is None or s.name in args.runs]
        for i, spec in enumerate(specs):
            t0 = time.perf_counter()
            r = do_run(spec, mode, data, out, tokenizer, device, progress=not args.no_progress)
            if r is None:
                print(f"[{i + 1}/{len(specs)}] {spec.name}: another process is running it; skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(specs)}] {spec.name}: probe top-1 {100 * r['probe']['top1']:.2f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_report:
        path = report(out, docs, args.mode)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
