"""Decoded + augmented samples per second: per stage for one worker, or through the loader.

Per-stage mode (one process, one thread: what one data-loader worker does per sample):

    python benchmarks/data_throughput.py --urls '../shared/data/coco-mini/all-000000.tar.gz' \\
        --image-size 256 --stages --rounds 5 --target 3700

reads the shards' raw samples into memory, then times, for each ``data.image_backend``
(rounds interleaved, medians reported), the library's own objects as the training loader
builds them: the source's ``decode`` (JPEG bytes -> image, caption cleaned), the transform's
``augment`` (RandomResizedCrop at ``data.crop_scale`` + flip) and ``finish`` (to a normalised
float tensor), the text encoder on a batch of captions (tokenise) and the collator without
text (stack); then the whole per-sample function as the loader runs it (decode, transform,
collate with tokenising) as a check on the sum. Times are CPU time of this process (on a busy
machine, wall time measures the other jobs too) and wall time. ``--target`` samples/s (what
the GPU consumes) divided by the per-worker figure gives the workers needed. Reading the
shards (gunzip + untar) is reported apart: ``.tar.gz`` costs what plain ``.tar`` shards do not.

Loader mode (``--workers 0 2 4``): samples/s through ``build_pretrain_loader`` itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker = one thread

import torch  # noqa: E402

from m3ae.config import DataConfig  # noqa: E402
from m3ae.data import (BadSample, Collator, build_dataset, build_pretrain_loader,  # noqa: E402
                       build_text_tokenizer, build_transform)
from m3ae.data.loader import process  # noqa: E402

STAGES = ("decode", "crop+resize+flip", "to float+normalise", "tokenise", "stack")


def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def since(t0: tuple[float, float], n: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per item since ``t0``."""
    cpu, wall = clock()
    return (cpu - t0[0]) / n * 1e6, (wall - t0[1]) / n * 1e6


def read_raw(cfg: DataConfig, samples: int) -> tuple[list[dict], tuple[float, float]]:
    """Up to ``samples`` raw (undecoded) samples of the shards, and the cost of reading one."""
    src = build_dataset(dataclasses.replace(cfg, shuffle_buffer=0), 32).components[0][0]
    t0 = clock()
    raws = [r for r in itertools.islice(src.items(0, 0, 1, 0), samples) if "__skip__" not in r]
    return raws, since(t0, max(len(raws), 1))


def stage_times(cfg: DataConfig, image_size: int, raws: list[dict], text_tokenizer, batch_size: int,
                seed: int = 0) -> dict[str, tuple[float, float]]:
    """(CPU, wall) microseconds per sample of each stage, and of the whole per-sample path."""
    ds = build_dataset(cfg, image_size, train=True, batch_size=batch_size)
    src, per_sample, _ = ds.components[0]  # the loader's source and its sample function
    transform = build_transform(cfg, image_size, train=True)
    n, out = len(raws), {}
    torch.manual_seed(seed)  # the same crops and flips for every backend
    t0 = clock()
    samples = []
    for r in raws:
        try:
            samples.append(src.decode(r))
        except BadSample:
            pass
    out["decode"] = since(t0, n)
    t0 = clock()
    augmented = [transform.augment(s["image"])[0] for s in samples]
    out["crop+resize+flip"] = since(t0, n)
    t0 = clock()
    images = [transform.finish(a) for a in augmented]
    out["to float+normalise"] = since(t0, n)
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    t0 = clock()
    for b in batches:
        text_tokenizer([samples[i]["caption"] or "" for i in b])
    out["tokenise"] = since(t0, n)
    done = [dict(samples[i], image=images[i]) for i in range(len(images))]
    stack = Collator(None)
    t0 = clock()
    for b in batches:
        stack([done[i] for i in b])
    out["stack"] = since(t0, n)
    out["sum of stages"] = tuple(sum(out[s][k] for s in STAGES) for k in (0, 1))
    collate = Collator(text_tokenizer)
    t0 = clock()
    for i in range(0, n, batch_size):  # the loader's per-sample call (seeded), then its collate
        collate([process(src.decode, r, per_sample, seed + j) for j, r in enumerate(raws[i:i + batch_size], i)])
    out["whole (as the loader)"] = since(t0, n)
    return out


def run_stages(a, cfg: DataConfig) -> None:
    raws, read = read_raw(cfg, a.samples)
    sizes = sorted(len(r.get("jpg", b"")) for r in raws)
    print(f"{len(raws)} samples from {a.urls}, JPEG bytes median {sizes[len(sizes) // 2] / 1e3:.0f} kB; "
          f"image size {a.image_size}, crop_scale {cfg.crop_scale}; torch threads {torch.get_num_threads()}")
    text_tokenizer = build_text_tokenizer(dataclasses.replace(cfg, tokenizer=a.tokenizer))
    backends = a.backends
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for r in range(a.rounds):
        for b in (backends if r % 2 == 0 else backends[::-1]):  # interleaved, order alternating
            runs[b].append(stage_times(dataclasses.replace(cfg, image_backend=b), a.image_size, raws,
                                       text_tokenizer, a.batch_size, seed=r))
    print(f"\nmicroseconds per sample, median of {a.rounds} interleaved rounds (CPU time | wall time)")
    rows = list(STAGES) + ["sum of stages", "whole (as the loader)"]
    print(f"{'stage':>22} " + " ".join(f"{b + ' CPU':>11} {b + ' wall':>11}" for b in backends))
    med = {b: {s: tuple(statistics.median(x[s][k] for x in runs[b]) for k in (0, 1)) for s in rows}
           for b in backends}
    for s in rows:
        print(f"{s:>22} " + " ".join(f"{med[b][s][0]:11.0f} {med[b][s][1]:11.0f}" for b in backends))
    print(f"{'read shard (apart)':>22} {read[0]:11.0f} {read[1]:11.0f}  (gunzip + untar; once, not per round)")
    print(f"\nper worker (whole path, CPU time) and workers for {a.target:.0f} samples/s:")
    for b in backends:
        whole = [1e6 / x["whole (as the loader)"][0] for x in runs[b]]
        sps = 1e6 / med[b]["whole (as the loader)"][0]
        print(f"  {b:>6}: {sps:6.1f} samples/s per worker (rounds: {', '.join(f'{x:.0f}' for x in whole)}) "
              f"-> {math.ceil(a.target / sps)} workers; with shard reading "
              f"{1e6 / (med[b]['whole (as the loader)'][0] + read[0]):.1f}/s -> "
              f"{math.ceil(a.target * (med[b]['whole (as the loader)'][0] + read[0]) / 1e6)} workers")
    if len(backends) == 2:
        x, y = (med[b]["whole (as the loader)"][0] for b in backends)
        print(f"  {backends[1]} / {backends[0]} speed: {x / y:.2f}x")


def measure(cfg: DataConfig, image_size: int, samples: int, batch_size: int, text_tokenizer) -> tuple[float, int]:
    loader = build_pretrain_loader(cfg, image_size, text_tokenizer, batch_size)
    n, it = 0, iter(loader)
    first = next(it)  # worker start-up and shuffle-buffer fill are not throughput
    t0 = time.perf_counter()
    del first
    for batch in it:
        n += len(batch["key"])
        if n >= samples:
            break
    return n / (time.perf_counter() - t0), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", required=True, help="shard pattern (as data.urls)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--samples", type=int, default=500, help="samples to time per setting")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--no-reduced-decode", action="store_true", help="always decode JPEGs at full size")
    p.add_argument("--resample", action="store_true", help="for fewer shards than workers")
    p.add_argument("--tokenizer", default="from-data",
                   help="data.tokenizer (default: WordPiece trained on the shards' captions)")
    p.add_argument("--stages", action="store_true", help="per-stage times for one worker (see above)")
    p.add_argument("--backends", nargs="+", default=["pil", "tensor"], help="data.image_backend values")
    p.add_argument("--rounds", type=int, default=5, help="--stages: interleaved rounds")
    p.add_argument("--target", type=float, default=3700.0, help="--stages: samples/s the GPU needs")
    a = p.parse_args()
    # A data-loader worker runs torch with one thread; the main-process figure does the same so
    # that it measures one worker's share (several threads on tiny per-image ops only contend).
    torch.set_num_threads(1)
    base = DataConfig(source="webdataset", urls=a.urls, shuffle_buffer=100, reduced_decode=not a.no_reduced_decode)
    if a.stages:
        return run_stages(a, base)
    text_tokenizer = build_text_tokenizer(dataclasses.replace(base, tokenizer=a.tokenizer))
    for w in a.workers:
        for b in a.backends:
            cfg = dataclasses.replace(base, num_workers=w, resample=a.resample or w > 1, image_backend=b)
            sps, n = measure(cfg, a.image_size, a.samples, a.batch_size, text_tokenizer)
            label = "main process" if w == 0 else f"{w} workers"
            print(f"{label:>14}: {sps:8.1f} samples/s ({n} samples, {a.image_size}px, image_backend={b}, "
                  f"reduced_decode={cfg.reduced_decode}, {sps / max(w, 1):.1f} per worker)")


if __name__ == "__main__":
    main()
