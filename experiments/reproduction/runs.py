"""One run of the reproduction: its data (shards, class subset, image caches, tokenizer), its
pre-training config, its evaluation (linear probe and kNN on every pool, the probe curve over
the kept checkpoints, OOD, the caption diagnostic, pictures) and its result.json; and the
pid files that let the same command, started twice, share out the runs."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from m3ae.io import atomic_write, write_json_atomic
from m3ae.ops import POOLS
from m3ae.training.runlock import RunLock

from .modes import Mode, RunSpec

TIN = "tiny-imagenet-captions"

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


def train_tokenizer(out: Path, data: Path, mode: Mode) -> Path:
    """One WordPiece vocabulary from the pre-training captions, shared by every run (so all
    M3AE runs see the same token ids); trained once and kept in the run folder (training is
    deterministic: the same captions give the same file, so this only saves the time)."""
    from m3ae.config import DataConfig
    from m3ae.data import source_captions
    from m3ae.tokenizer import train_wordpiece

    path = out / "tokenizer.json"
    if path.is_file():
        return path
    # The library's reader: the captions cleaned as pre-training sees them, in source order.
    cfg = (DataConfig(source="cache", urls=str(cache_path(out, "tin-train", mode))) if mode.cache else
           DataConfig(source="webdataset", urls=shards(data, TIN, "train", mode.train_shards)))
    captions = list(source_captions(cfg, limit=mode.caption_limit or 10**9))
    return _save_once(train_wordpiece(captions, vocab_size=mode.vocab), path)


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


def cache_path(out: Path, name: str, mode: Mode) -> Path:
    return out / "caches" / f"{name}-{mode.model.image_size}px"


def build_caches(data: Path, out: Path, mode: Mode, progress: bool) -> None:
    """Each dataset decoded once, at the model's image size, into ``out/caches`` (reused by
    every run and every later call)."""
    from m3ae.data.cache import build_cache, is_cache, source_config

    for name, (folder, split, size_key) in CACHE_SETS.items():
        path = cache_path(out, name, mode)
        if is_cache(path):
            continue
        n = mode.train_shards if split == "train" and folder == TIN else None
        limit = getattr(mode, size_key) if size_key else None
        build_cache([source_config(shards(data, folder, split, n))], path, mode.model.image_size,
                    progress=progress, limit=limit)


def build_run_config(spec: RunSpec, mode: Mode, data: Path, tokenizer: Path, device: str, out: Path | None = None):
    from m3ae.config import build_config
    from m3ae.tokenizer import load_tokenizer

    m, steps = mode, mode.steps
    overrides = [f"model.image_size={m.model.image_size}", f"model.patch_size={m.model.patch_size}",
        f"model.vocab_size={load_tokenizer(tokenizer).get_vocab_size()}",
        *(["data.source=cache", f"data.urls={cache_path(out or tokenizer.parent, 'tin-train', m)}"]
          if m.cache else
          ["data.source=webdataset", f"data.urls={shards(data, TIN, 'train', m.train_shards)}"]),
        f"data.tokenizer={tokenizer}", f"data.text_len={m.text_len}",
        # The shards were shuffled when built, so they are read in order without a shuffle buffer
        # (cheaper). MAE and M3AE see the same order either way: a buffer is seeded too, from
        # (seed, epoch, slot); the cache source draws its order from (seed, epoch).
        "data.shuffle_buffer=0",
        f"train.steps={steps}", f"train.batch_size={m.batch_size}", f"train.lr={m.lr}",
        f"train.warmup_steps={m.warmup}", f"train.seed={spec.seed}", f"train.device={device}",
        f"train.log_every={max(1, min(10, steps // 10))}", "train.recon_every=0",
        # Checkpoints at every quarter are kept: the probe curve is measured on them.
        f"train.ckpt_every={max(1, steps // 4)}", "train.keep_last=1", f"train.keep_every={max(1, steps // 4)}",
        f"train.precision={m.precision}",
    ] + spec.overrides
    return build_config(m.preset, None, overrides)


def _subset(f, keep: np.ndarray):
    from m3ae.evaluation import Features

    return Features(f.features[keep], f.labels[keep], [k for k, ok in zip(f.keys, keep) if ok], f.class_names)


# ---------------------------------------------------------------------------- one run
def eval_images(data: Path, out: Path, mode: Mode, size: int) -> dict:
    """The evaluation images of every run, decoded and normalised once (by the library's
    evaluation path) and kept as float16 tensors in ``out/eval_cache``: every checkpoint of
    every run is then one encoder pass over tensors, not a fresh JPEG decode."""
    import torch

    from m3ae.evaluation import load_labelled, make_loader

    sets = {"tin-train": (TIN, "train", mode.probe_train), "tin-val": (TIN, "val", mode.val),
            "cifar-test": ("cifar10", "test", mode.cifar_test),
            "cifar-train": ("cifar10", "train", mode.cifar_train)}
    where = {name: str(cache_path(out, name, mode)) if mode.cache else shards(data, folder, split)
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


def encode(model, blob: dict, batch_size: int = 500, blocks: str | None = None) -> dict:
    """Image-only encoder features of a cached set, every pool from one forward (the library's
    :func:`m3ae.evaluation.features.encode_batch` on the cached tensors, not a fresh decode):
    ``{pool: Features}``, or with ``blocks`` (e.g. ``"all"``) ``{block: {pool: Features}}``."""
    import torch

    from m3ae.evaluation import Features
    from m3ae.evaluation.features import encode_batch
    from m3ae.ops import resolve_blocks

    model.eval()
    layers = resolve_blocks(blocks or [None], model.config.depth)
    feats = {(b, p): [] for b in layers for p in POOLS}
    with torch.no_grad():
        for i in range(0, len(blob["images"]), batch_size):
            out = encode_batch(model, {"image": blob["images"][i:i + batch_size].float()}, "image", POOLS,
                               list(layers))
            for b, p in feats:
                feats[b, p].append(out[b][p].cpu())
    labels = blob["labels"].numpy()
    keys = [str(i) for i in range(len(labels))]
    out = {b: {p: Features(torch.cat(feats[b, p]).numpy(), labels, keys, blob["classes"]) for p in POOLS}
           for b in layers}
    return out if blocks else out[None]


def few_shot(f, k: int, seed: int):
    """``k`` labelled examples per class of ``f`` (drawn with ``seed``, the same for every model)."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(f.labels), dtype=bool)
    for c in np.unique(f.labels):
        idx = np.flatnonzero(f.labels == c)
        keep[rng.choice(idx, size=min(k, len(idx)), replace=False)] = True
    return _subset(f, keep)


def probe_checkpoint(model, sets: dict, mode: Mode, seed: int, blocks=None) -> tuple[dict, dict]:
    """Linear probe (+ kNN) of every pool on Tiny-ImageNet val, and with ``mode.fewshot``
    a linear probe trained on that many images per class -> (results, features). With
    ``blocks`` (e.g. ``"all"``) the features of those layers come from the same encoder pass,
    as ``features["layers"] = {block: (train, val)}``, so a layer sweep costs no second pass."""
    from m3ae.evaluation import linear_probe
    from m3ae.ops import resolve_blocks

    asked = () if blocks is None else resolve_blocks(blocks, model.config.depth)
    # The final layer (None) is what the probes below read, whatever else is asked.
    tr, va = (encode(model, sets[k], blocks=[*asked, None]) for k in ("tin-train", "tin-val"))
    train, val = tr[None], va[None]
    layers = {b: (tr[b], va[b]) for b in asked}
    probes = {p: linear_probe(train[p], val[p], epochs=mode.probe_epochs, seed=seed) for p in POOLS}
    if mode.fewshot:
        for p in POOLS:  # the same images for every model and checkpoint (seed 0)
            probes[f"{p}/fewshot"] = linear_probe(few_shot(train[p], mode.fewshot, 0), val[p],
                                                  epochs=mode.probe_epochs, seed=seed)
    return probes, {"train": train, "val": val, **({"layers": layers} if layers else {})}


def ood_eval(model, sets: dict, feats: dict, probe, mode: Mode, seed: int) -> dict:
    """Far OOD (Tiny-ImageNet val vs CIFAR-10 test) and near OOD (CIFAR-10 classes 0-4 vs 5-9)."""
    from m3ae.evaluation import ood_scores

    pool = mode.pool
    c = {k: encode(model, sets[k])[pool] for k in ("cifar-test", "cifar-train")}
    far = ood_scores(feats["train"][pool], feats["val"][pool], c["cifar-test"], probe=probe)
    near = ood_scores(_subset(c["cifar-train"], c["cifar-train"].labels < 5),
                      _subset(c["cifar-test"], c["cifar-test"].labels < 5),
                      _subset(c["cifar-test"], c["cifar-test"].labels >= 5),
                      probe_epochs=mode.probe_epochs, seed=seed)
    return {"ood_far": {"metrics": far.metrics, "id_accuracy": far.id_accuracy,
                        "n_id": len(feats["val"][pool]), "n_ood": len(c["cifar-test"])},
            "ood_near": {"metrics": near.metrics, "id_accuracy": near.id_accuracy,
                         "n_id": int((c["cifar-test"].labels < 5).sum()),
                         "n_ood": int((c["cifar-test"].labels >= 5).sum())}}


def evaluate_run(spec: RunSpec, mode: Mode, data: Path, run_dir: Path, device: str, progress: bool,
                 out: Path | None = None) -> dict:
    """Linear probe on Tiny-ImageNet val of the final model (every pool) and of the kept
    checkpoints (the probe curve); for the main runs also OOD AUROCs."""
    from m3ae import load_pretrained

    model = load_pretrained(run_dir / "final", device, need_tokenizer=False)[0]
    sets = eval_images(data, out or run_dir.parent, mode, model.config.image_size)
    pool = mode.pool
    probes, feats = probe_checkpoint(model, sets, mode, spec.seed)
    res = {"probe": probes[pool].as_dict(), "probes": {p: r.as_dict() for p, r in probes.items()}, "pool": pool}
    final_step = mode.steps
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        step = int(ckpt.name.split("_")[1])
        if step == final_step:
            ps = probes  # the final checkpoint holds the same weights as final/
        else:
            ps, _ = probe_checkpoint(load_pretrained(ckpt, device, need_tokenizer=False)[0], sets, mode, spec.seed)
        curve.append({"step": step, **{p: {"top1": r.top1, "knn_top1": r.knn_top1} for p, r in ps.items()}})
    res["curve"] = curve
    n_images = (len(sets["tin-train"]["labels"]) + len(sets["tin-val"]["labels"])) * max(1, len(curve))
    if spec.ood:
        res.update(ood_eval(model, sets, feats, probes[pool].probe, mode, spec.seed))
        n_images += len(sets["cifar-test"]["labels"]) + len(sets["cifar-train"]["labels"])
    res["eval_images"] = n_images
    return res


def save_pictures(spec: RunSpec, mode: Mode, data: Path, run_dir: Path, device: str) -> list[str]:
    """Reconstructions of validation images (no captions there) and, for M3AE, of captioned
    training images plus cross-modal attention."""
    import torch

    from m3ae import load_pretrained
    from m3ae.evaluation import load_labelled, make_loader
    from m3ae.visualize import save_reconstruction_grid

    model, text_tokenizer, _ = load_pretrained(run_dir / "final", device, need_tokenizer=False)
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
                                             n=mode.attention_rows)))
    return made


def caption_diagnostic(model_dir: Path, data: Path, device: str, n: int = 2000) -> dict:
    """Masked caption words predicted with the image and with it removed (same captions, same
    text masks), on captioned training images: how much of what the text head knows comes
    through the image tokens, i.e. whether cross-modal learning happened at all."""
    import torch

    from m3ae import M3AELoss, load_pretrained
    from m3ae.evaluation import load_labelled, make_loader

    model, text_tokenizer, _ = load_pretrained(model_dir, device, need_tokenizer=True)
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


def claim_run_dir(run_dir: Path) -> RunLock | None:
    """This process's hold on ``run_dir`` (its ``running.pid``; release it when done), or None
    when another live process has it (a dead one's is taken over). So the same command started
    twice shares out the runs."""
    lock = RunLock(run_dir, name="running.pid")
    return lock if lock.try_acquire() else None


def run_or_read(spec: RunSpec, mode: Mode, data: Path, out: Path, tokenizer: Path, device: str,
                progress: bool) -> dict | None:
    """Pre-train and evaluate one run, or read its result; None when another process has it."""
    run_dir = out / spec.name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        lock = claim_run_dir(run_dir) if spec.kind == "m3ae" and "caption_diag" not in result else None
        if lock is not None:
            try:  # a result written before the diagnostic existed is completed, not redone
                result["caption_diag"] = caption_diagnostic(run_dir / "final", data, device)
                write_json_atomic(result_path, result)  # a result file is complete or absent
            finally:
                lock.release()
        return result
    lock = claim_run_dir(run_dir)
    if lock is None:
        return None
    try:
        return pretrain_and_evaluate(spec, mode, data, run_dir, tokenizer, device, progress)
    finally:
        lock.release()


def pretrain_and_evaluate(spec: RunSpec, mode: Mode, data: Path, run_dir: Path, tokenizer: Path, device: str,
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
        ev["caption_diag"] = caption_diagnostic(run_dir / "final", data, device, mode.caption_check)
    pictures = save_pictures(spec, mode, data, run_dir, device) if mode.pictures and spec.ood and \
        spec.seed == mode.seeds[0] else []
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
