"""``m3ae pretrain`` end to end against its own step: what users get, and how far from the step.

Runs ``m3ae pretrain`` (a subprocess, as a user would) on the Tiny-ImageNet caption shards
at the bench-cpu size, reads the samples/s it logs (``metrics.jsonl``, every ``--log-every``
steps; the first window, with start-up, is left out), then times the
same configuration's :class:`m3ae.training.step.TrainStep` on synthetic batches with
``train_throughput.py``. Prints both figures and their ratio; the gap is data loading
(decode, augmentation, tokenisation), logging and checkpointing.

    python benchmarks/pretrain_e2e.py --threads 2 --steps 60
    python benchmarks/pretrain_e2e.py --threads 2 --workers 1 train.precision=bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tiny-imagenet-captions"
SHARDS = DATA / "train-{000000..000007}.tar.gz"


def tokenizer_file(args, folder: Path) -> str:
    """``--tokenizer``, or WordPiece trained on the captions of one shard (not timed)."""
    if args.tokenizer:
        return args.tokenizer
    sys.path.insert(0, str(HERE.parent / "src"))
    from m3ae.config import DataConfig
    from m3ae.data import source_captions
    from m3ae.tokenizer import train_wordpiece

    path = folder / "tokenizer.json"
    caps = list(source_captions(DataConfig(source="webdataset", urls=str(DATA / "train-000000.tar.gz"))))
    train_wordpiece(caps, vocab_size=8192).save(str(path))
    return str(path)


def end_to_end(args, out: Path) -> dict:
    overrides = ["data.source=webdataset", f"data.urls={args.shards}", f"data.tokenizer={tokenizer_file(args, out.parent)}",
                 f"data.num_workers={args.workers}", f"train.steps={args.steps}",
                 f"train.log_every={args.log_every}", "train.recon_every=0", "train.ckpt_every=0",
                 "train.device=cpu", *args.overrides]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "m3ae", "pretrain", "--config", str(HERE / "bench-cpu.yaml"),
           "--out", str(out), "--no-progress", *overrides]
    subprocess.run(cmd, check=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["samples_per_s"] for r in rows[1:]]  # the first window holds the start-up
    if not windows:
        raise SystemExit(f"need at least two log windows: raise --steps above --log-every={args.log_every}")
    return {"command": " ".join(cmd), "samples_per_s": statistics.median(windows), "windows": windows}


def step_only(args, folder: Path) -> dict:
    """train_throughput.py on the same config, in a fresh process like the end-to-end run."""
    out = folder / "step.json"
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--steps", str(args.step_steps), "--warmup", "3",
           "--device", "cpu", "--json", str(out), *args.overrides]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="section.field=value for both runs")
    p.add_argument("--shards", default=str(SHARDS))
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: trained on one shard's captions)")
    p.add_argument("--steps", type=int, default=60, help="steps of the end-to-end run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-steps", type=int, default=10, help="timed steps of the step-only run")
    p.add_argument("--workers", type=int, default=0, help="data.num_workers of the end-to-end run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        e2e = end_to_end(args, Path(tmp) / "run")
        step = step_only(args, Path(tmp))
    r = {"end_to_end_samples_per_s": e2e["samples_per_s"], "step_samples_per_s": step["samples_per_s"],
         "ratio": e2e["samples_per_s"] / step["samples_per_s"], "end_to_end": e2e,
         "step": {k: step[k] for k in ("command", "samples_per_s", "step_time_median_s", "mfu", "train")},
         "threads": args.threads, "workers": args.workers}
    print(f"m3ae pretrain end to end: {r['end_to_end_samples_per_s']:.1f} samples/s "
          f"(median of {len(e2e['windows'])} windows of {args.log_every} steps)")
    print(f"TrainStep alone:          {r['step_samples_per_s']:.1f} samples/s")
    print(f"ratio:                    {100 * r['ratio']:.0f}%")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
