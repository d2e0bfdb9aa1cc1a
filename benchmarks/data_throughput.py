"""Decoded + augmented samples per second: one process, then N data-loader workers.

    python benchmarks/data_throughput.py --urls '../shared/data/coco-mini/all-000000.tar.gz' \
        --image-size 224 --samples 200 --workers 0 2

Reads WebDataset shards through the same loader as `m3ae pretrain` (robust decoding, reduced-
size JPEG decoding, RandomResizedCrop + flip, collation without a tokenizer) and prints
samples/s. A GPU needs `batch/step_time` samples/s; divide by the per-worker figure to get
the number of workers that keeps it fed.
"""
from __future__ import annotations

import argparse
import time

import torch

from m3ae.config import DataConfig
from m3ae.data import build_pretrain_loader


def measure(cfg: DataConfig, image_size: int, samples: int, batch_size: int) -> tuple[float, int]:
    loader = build_pretrain_loader(cfg, image_size, None, batch_size)
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
    a = p.parse_args()
    # A data-loader worker runs torch with one thread; the main-process figure does the same so
    # that it measures one worker's share (several threads on tiny per-image ops only contend).
    torch.set_num_threads(1)
    for w in a.workers:
        cfg = DataConfig(source="webdataset", urls=a.urls, num_workers=w, shuffle_buffer=100,
                         reduced_decode=not a.no_reduced_decode, resample=a.resample or w > 1)
        sps, n = measure(cfg, a.image_size, a.samples, a.batch_size)
        label = "main process" if w == 0 else f"{w} workers"
        print(f"{label:>14}: {sps:8.1f} samples/s ({n} samples, {a.image_size}px, "
              f"reduced_decode={cfg.reduced_decode}, {sps / max(w, 1):.1f} per worker)")


if __name__ == "__main__":
    main()
