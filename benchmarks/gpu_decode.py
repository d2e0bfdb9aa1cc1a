"""JPEG decode + augmentation samples/s for data.decode_device: the per-sample CPU path one
loader worker runs, against the device path's two halves: what a worker still does (read the
header, draw crop and flip) and the batched decode + crop/resize/flip on the device.

    python benchmarks/gpu_decode.py --urls '../shared/data/coco-mini/all-000000.tar.gz' --device cuda

The photos are read into memory first (repeated up to --samples when the shard has fewer) (no disk or tar time in any figure); every figure is the
median of --rounds timed passes over the same photos after one untimed pass.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from m3ae.data.decode import decode_image
from m3ae.data.device_decode import DeferredPretrainTransform, DeviceDecoder, collate_pending, pending_image
from m3ae.data.transforms import PretrainTransform
from m3ae.data.webdataset import IMAGE_EXTS, ShardSource


def _timed(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", required=True, help="shard pattern (as data.urls)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # one loader worker's view of the CPU side
    src = ShardSource(args.urls, shuffle_shards=False)
    blobs = []
    for raw in src.items(0, 0, 1, 0):
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext:
            blobs.append(raw[ext])
        if len(blobs) >= args.samples:
            break
    if not blobs:
        raise SystemExit(f"error: no images in {args.urls}")
    blobs = (blobs * (args.samples // len(blobs) + 1))[:args.samples]  # a small payload's photos, repeated
    n, size, dev = len(blobs), args.image_size, torch.device(args.device)
    per_sample = PretrainTransform(size)
    deferred = DeferredPretrainTransform(size)
    min_side = int(size / 0.2 ** 0.5) + 1  # data.reduced_decode's rule for crop_scale (0.2, 1)

    def cpu_path():
        for b in blobs:
            per_sample({"image": decode_image(b, "k", min_side, fast_jpeg=True), "caption": None})

    pending = []

    def worker_half():
        pending.clear()
        pending.extend(deferred({"image": pending_image(b, "k"), "caption": None})["image"] for b in blobs)

    decoder = DeviceDecoder(size, dev)

    def device_half():
        for i in range(0, n, args.batch):
            chunk = pending[i:i + args.batch]
            batch = {"key": [""] * len(chunk), "image_valid": None, "data_events": [], **collate_pending(chunk)}
            decoder(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cpu_s = _timed(cpu_path, args.rounds)
    worker_s = _timed(worker_half, args.rounds)
    device_s = _timed(device_half, args.rounds)
    rec = {"samples": n, "image_size": size, "batch": args.batch, "device": str(dev),
           "cpu_per_sample_samples_per_s": round(n / cpu_s, 1),
           "worker_half_samples_per_s": round(n / worker_s, 1),
           "device_half_samples_per_s": round(n / device_s, 1),
           "mean_source_pixels": round(sum(p.height * p.width for p in pending) / n)}
    print(f"{n} photos -> {size} px: CPU per-sample path {rec['cpu_per_sample_samples_per_s']} samples/s per core; "
          f"device path: worker half {rec['worker_half_samples_per_s']} samples/s per core, "
          f"{dev} half {rec['device_half_samples_per_s']} samples/s (batch {args.batch})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
